"""The vxlan backend end to end: userspace <-> userspace and userspace <-> kernel vxlan.

One 3-node testbed: n1 and n2 run our userspace VXLAN datapath, n3 the kernel's vxlan
device (``flannel.1``, programmed as flanneld does). A second, 2-node testbed checks
DirectRouting.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from encap import arp, vxlan
from encap.ipv4 import build_header
from overlay.lab.testbed import Testbed
from overlay.lab.transfer import transfer, udp_transfer
from tests.helpers.polling import poll
from tests.helpers.segments import RAW_SEND, snmp, tcp_segment
from tests.helpers.testbed import node_status

pytestmark = pytest.mark.netns
SUBNETS = "/coreos.com/network/subnets"
PORT = vxlan.PORT
FAKE_IP = "192.0.2.77"  # on the underlay segment, but no node has it
MB100 = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    tb = Testbed(
        "v" + uuid.uuid4().hex[:7],
        nodes=3,
        pods_per_node=1,
        backend="vxlan",
        kernel_nodes=(3,),
    )
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


# -- helpers ------------------------------------------------------------------------------


def _node(bed: Testbed, node: str) -> dict[str, Any]:
    return next(n for n in bed.status()["nodes"] if n["name"] == node)


def _subnet(bed: Testbed, node: str) -> IPv4Network:
    return IPv4Network(_node(bed, node)["subnet"])


def _leases(bed: Testbed) -> dict[str, dict[str, Any]]:
    """The registry's leases, by subnet ("198.18.7.0/24")."""
    out = bed.etcd.etcdctl("get", "--prefix", SUBNETS).stdout.splitlines()
    return {
        out[k].rsplit("/", 1)[1].replace("-", "/"): json.loads(out[k + 1])
        for k in range(0, len(out) - 1, 2)
    }


def _vtep_mac(bed: Testbed, node: str) -> str:
    """The VtepMAC node publishes in its lease in etcd."""
    return str(_leases(bed)[str(_subnet(bed, node))]["BackendData"]["VtepMAC"])


def _ping(bed: Testbed, src: str, dst_ip: str, count: int = 3, size: int | None = None) -> None:
    argv = ["ping", "-c", str(count), "-i", "0.2", "-W", "2"]
    if size is not None:
        argv += ["-s", str(size), "-M", "do"]
    result = bed.exec(src, [*argv, dst_ip], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{src} -> {dst_ip}: {result.stdout}{result.stderr}"
    assert " 0% packet loss" in result.stdout, result.stdout


def _ping_both_ways(bed: Testbed, a: str, b: str) -> None:
    _ping(bed, a, bed.pod_ip(b))
    _ping(bed, b, bed.pod_ip(a))


def _counter(bed: Testbed, node: str, name: str) -> int:
    return int(node_status(bed, node)["counters"][name])


def _transfer(bed: Testbed, server_pod: str, client_pod: str, port: int) -> None:
    """100 MB over TCP from client_pod to server_pod, byte-identical, and every userspace
    node on the way counts at least the 100 MB it carried."""
    src, dst = client_pod.split("-")[0], server_pod.split("-")[0]
    userspace = [
        (node, name)
        for node, name in ((src, "tx_bytes"), (dst, "rx_bytes"))
        if int(node[1:]) not in bed.kernel_nodes
    ]
    before = {key: _counter(bed, *key) for key in userspace}
    transfer(bed, client_pod, server_pod, MB100, port)
    for key in userspace:
        assert _counter(bed, *key) - before[key] >= MB100, key


class Capture:
    """tcpdump -w in a node's namespace, started and known to be listening."""

    def __init__(self, bed: Testbed, node: str, bpf: str, count: int) -> None:
        fd, name = tempfile.mkstemp(prefix=f"{bed.prefix}-{node}-", suffix=".pcap")
        os.close(fd)
        self.file = Path(name)
        self.proc = bed.popen(
            node,
            ["tcpdump", "-i", "eth0", "-U", "-n", "-c", str(count), "-w", str(self.file), bpf],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on eth0, ..." once capturing
        assert "listening on" in line, line

    def wait(self, timeout: float = 10.0) -> Path:
        """Until ``count`` packets were captured (or the timeout: then what was caught)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)  # tcpdump flushes the file and exits
            self.proc.wait(5)
        return self.file

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.file.unlink(missing_ok=True)


def _send_udp(bed: Testbed, where: str, dst: str, payloads: list[bytes], dport: int = PORT) -> int:
    """Send datagrams from ``where``'s underlay IP (a known peer) to dst:dport; returns
    the source port used."""
    source = bed.node_ip(int(where[1:]))
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"s.bind(('{source}',0))\n"
        f"for p in {[p.hex() for p in payloads]!r}:\n"
        f"    s.sendto(bytes.fromhex(p),('{dst}',{dport}))\n"
        "print(s.getsockname()[1])\n"
    )
    result = bed.exec(where, [sys.executable, "-c", code], check=True, capture_output=True)
    return int(result.stdout)


def _drops(bed: Testbed, node: str) -> dict[str, int]:
    return dict(node_status(bed, node)["counters"]["drops"])


def _free_subnet(bed: Testbed, start: int = 250) -> IPv4Network:
    owned = set(_leases(bed))
    return next(
        IPv4Network(f"198.18.{i}.0/24")
        for i in range(start, 0, -1)
        if f"198.18.{i}.0/24" not in owned
    )


def _put_lease(bed: Testbed, subnet: IPv4Network, value: dict[str, Any]) -> None:
    key = f"{SUBNETS}/{subnet.network_address}-{subnet.prefixlen}"
    bed.etcd.etcdctl("put", key, json.dumps(value, separators=(",", ":")))


def _del_lease(bed: Testbed, subnet: IPv4Network) -> None:
    bed.etcd.etcdctl("del", f"{SUBNETS}/{subnet.network_address}-{subnet.prefixlen}")


def _vxlan_lease(public_ip: str) -> dict[str, Any]:
    mac = vxlan.format_mac(vxlan.vtep_mac(public_ip, 1))
    return {
        "PublicIP": public_ip,
        "PublicIPv6": None,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": mac},
    }


def _peer_subnets(bed: Testbed, node: str) -> set[str]:
    return {p["subnet"] for p in node_status(bed, node)["peers"]}


def _icmp_echo(src: str, dst: str) -> bytes:
    """An inner IPv4 ICMP echo request (checksums are not what is under test here)."""
    body = bytes.fromhex("0800f7ff00000000")
    header = build_header(
        src=socket.inet_aton(src), dst=socket.inet_aton(dst), protocol=1, payload_length=8
    )
    return header + body


# -- userspace <-> userspace --------------------------------------------------------------


def test_nodes_publish_vxlan_leases(bed: Testbed) -> None:
    leases = _leases(bed)
    assert len(leases) == 3
    for i in (1, 2, 3):
        lease = leases[str(_subnet(bed, f"n{i}"))]
        assert lease["PublicIP"] == str(bed.node_ip(i))
        assert lease["BackendType"] == "vxlan"
        assert lease["BackendData"]["VNI"] == 1
        assert vxlan.parse_mac(lease["BackendData"]["VtepMAC"])
    for node in ("n1", "n2"):
        st = node_status(bed, node)
        assert st["datapath"] == "vxlan (userspace datapath)"
        assert st["vtep_mac"] == _vtep_mac(bed, node)
        assert st["mtu"] == 1450
    assert node_status(bed, "n3")["datapath"] == "vxlan (kernel datapath)"


def test_userspace_pods_ping_both_ways(bed: Testbed) -> None:
    _ping_both_ways(bed, "n1-p1", "n2-p1")


def test_userspace_100mb_transfer_is_byte_identical(bed: Testbed) -> None:
    _transfer(bed, "n2-p1", "n1-p1", 5201)


# -- userspace <-> kernel -----------------------------------------------------------------


def test_userspace_kernel_pods_ping_both_ways(bed: Testbed) -> None:
    _ping_both_ways(bed, "n1-p1", "n3-p1")


def test_userspace_to_kernel_100mb_transfer(bed: Testbed) -> None:
    _transfer(bed, "n3-p1", "n1-p1", 5202)


def test_kernel_to_userspace_100mb_transfer(bed: Testbed) -> None:
    _transfer(bed, "n1-p1", "n3-p1", 5203)


# A kernel vxlan node as users run it: its eth0 keeps the default offloads (a veth's, like
# a virtio NIC's: tx checksumming and TSO on), so the inner TCP/UDP checksums of what it
# sends us are partial and its TCP super-packets reach our socket unsegmented.


def test_kernel_node_keeps_its_default_offloads(bed: Testbed) -> None:
    features = bed.exec("n3", ["ethtool", "-k", "eth0"], capture_output=True, text=True)
    assert "tx-checksumming: on" in features.stdout, features.stdout
    assert "tcp-segmentation-offload: on" in features.stdout, features.stdout


@pytest.mark.parametrize(
    ("client", "server", "port"), [("n3-p1", "n1-p1", 5402), ("n1-p1", "n3-p1", 5403)]
)
def test_udp_between_userspace_and_kernel_is_intact(
    bed: Testbed, client: str, server: str, port: int
) -> None:
    before = snmp(bed, server)
    intact, damaged = udp_transfer(bed, client, server, 15000, 1400, port)
    after = snmp(bed, server)
    assert damaged == 0 and intact >= 15000 * 0.98, (intact, damaged)
    assert after["Udp.InCsumErrors"] == before["Udp.InCsumErrors"]


def test_kernel_peer_checksums_partial_complete_and_corrupt(bed: Testbed) -> None:
    """Segments crafted in the kernel node's pod (raw socket, through flannel.1): a
    complete and a partial checksum are delivered (the pod answers each with a RST), a
    corrupt one is counted and never reaches the pod."""
    src, dst = bed.pod_ip("n3-p1"), bed.pod_ip("n1-p1")
    segments = [tcp_segment(src, dst, kind) for kind in ("complete", "partial", "corrupt")]
    pod_before = snmp(bed, "n1-p1")
    drops_before = _drops(bed, "n1").get("rx_bad_l4_checksum", 0)
    bed.exec(
        "n3-p1", [sys.executable, "-c", RAW_SEND, dst, *(s.hex() for s in segments)], check=True
    )
    assert _wait_drop(bed, "n1", "rx_bad_l4_checksum", drops_before) == 1
    assert poll(lambda: snmp(bed, "n1-p1")["Tcp.OutRsts"] - pod_before["Tcp.OutRsts"] >= 2)
    pod_after = snmp(bed, "n1-p1")
    assert pod_after["Tcp.OutRsts"] - pod_before["Tcp.OutRsts"] == 2
    assert pod_after["Tcp.InCsumErrors"] == pod_before["Tcp.InCsumErrors"]
    assert pod_after["Tcp.InSegs"] - pod_before["Tcp.InSegs"] == 2


# -- the wire -----------------------------------------------------------------------------


def test_frames_we_send_decode_as_vxlan(bed: Testbed) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import rdpcap

    n1_ip, n2_ip = str(bed.node_ip(1)), str(bed.node_ip(2))
    n1_mac, n2_mac = _vtep_mac(bed, "n1"), _vtep_mac(bed, "n2")
    assert node_status(bed, "n2")["vtep_mac"] == n2_mac
    target = bed.pod_ip("n2-p1")
    # 3 small pings and 2 full-size ones (inner IPv4 total length 1450 = the TUN MTU).
    cap = Capture(bed, "n1", f"udp dst port {PORT} and src host {n1_ip} and dst host {n2_ip}", 5)
    try:
        _ping(bed, "n1-p1", target, count=3)
        _ping(bed, "n1-p1", target, count=2, size=1450 - 28)
        pcap = cap.wait()

        packets = rdpcap(str(pcap))
        assert len(packets) == 5
        sizes = []
        for pkt in packets:
            payload = bytes(pkt[UDP].payload)
            frame = VXLAN(payload)
            assert frame.flags & 0x08, frame.show(dump=True)
            assert frame.vni == 1
            inner = frame[Ether]
            assert inner.dst == n2_mac
            assert inner.src == n1_mac
            assert inner.type == 0x0800
            assert inner[IP].dst == target
            assert len(payload) == 22 + inner[IP].len
            assert len(payload) == pkt[UDP].len - 8
            assert len(payload) <= 1450 + 22
            sizes.append(len(payload))
        assert max(sizes) == 1450 + 22

        fields = subprocess.run(
            [
                "tshark",
                "-r",
                str(pcap),
                "-d",
                f"udp.port=={PORT},vxlan",
                "-T",
                "fields",
                "-e",
                "vxlan.vni",
                "-e",
                "eth.dst",
                "-e",
                "eth.src",
                "-e",
                "ip.dst",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.splitlines()
        assert len(fields) == 5, fields
        for line in fields:
            vni, eth_dst, eth_src, ip_dst = line.split("\t")
            # Two Ethernet and two IP headers: the outer first, then the inner ones.
            assert vni == "1"
            assert eth_dst.split(",")[-1] == n2_mac
            assert eth_src.split(",")[-1] == n1_mac
            assert ip_dst.split(",") == [n2_ip, target]
    finally:
        cap.close()


def _wait_drop(bed: Testbed, node: str, reason: str, before: int) -> int:
    return int(poll(lambda: max(_drops(bed, node).get(reason, 0) - before, 0)))


def test_malformed_vxlan_is_counted_and_dropped(bed: Testbed) -> None:
    n1_ip = str(bed.node_ip(1))
    n1_mac = vxlan.parse_mac(_vtep_mac(bed, "n1"))
    n2_mac = vxlan.parse_mac(_vtep_mac(bed, "n2"))
    inner = _icmp_echo(bed.pod_ip("n2-p1"), bed.pod_ip("n1-p1"))
    good = vxlan.prefix(1, n1_mac, n2_mac) + inner
    cases = {
        "rx_vxlan_wrong_vni": vxlan.prefix(2, n1_mac, n2_mac) + inner,
        "rx_vxlan_truncated": good[:30],
        "rx_vxlan_bad_ethertype": vxlan.prefix(1, n1_mac, n2_mac, 0x86DD) + bytes(40),
        "rx_vxlan_foreign_mac": vxlan.prefix(1, bytes.fromhex("020000000099"), n2_mac) + inner,
        "rx_vxlan_bad_flags": b"\x00" + good[1:],
    }
    for reason, frame in cases.items():
        before = _drops(bed, "n1")
        _send_udp(bed, "n2", n1_ip, [frame])
        assert _wait_drop(bed, "n1", reason, before.get(reason, 0)) == 1, (
            reason,
            _drops(bed, "n1"),
        )
        after = _drops(bed, "n1")
        changed = {k for k in after if after[k] != before.get(k, 0)}
        assert changed == {reason}, (reason, before, after)
    # Forwarding goes on, with the userspace and the kernel peer.
    _ping_both_ways(bed, "n1-p1", "n2-p1")
    _ping_both_ways(bed, "n1-p1", "n3-p1")


def test_arp_for_our_vtep_address_is_answered(bed: Testbed) -> None:
    from scapy.layers.inet import UDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import rdpcap

    n1_ip, n2_ip = str(bed.node_ip(1)), str(bed.node_ip(2))
    n1_mac, n2_mac = _vtep_mac(bed, "n1"), _vtep_mac(bed, "n2")
    n1_vtep = str(_subnet(bed, "n1").network_address)
    n2_vtep = str(_subnet(bed, "n2").network_address)
    request = vxlan.prefix(
        1, vxlan.BROADCAST, vxlan.parse_mac(n2_mac), vxlan.ETHERTYPE_ARP
    ) + arp.build(
        arp.REQUEST,
        vxlan.parse_mac(n2_mac),
        socket.inet_aton(n2_vtep),
        bytes(6),
        socket.inet_aton(n1_vtep),
    )
    before = node_status(bed, "n1")["arp_replies"]
    # The daemon answers to (source IP, its configured port): n2's daemon socket, so
    # the reply is seen on n2's eth0 rather than by our sending socket.
    cap = Capture(bed, "n2", f"udp dst port {PORT} and src host {n1_ip} and dst host {n2_ip}", 1)
    try:
        _send_udp(bed, "n2", n1_ip, [request])
        assert poll(lambda: node_status(bed, "n1")["arp_replies"] == before + 1)
        packets = rdpcap(str(cap.wait()))
    finally:
        cap.close()
    assert len(packets) == 1
    frame = VXLAN(bytes(packets[0][UDP].payload))
    assert frame.vni == 1
    assert frame[Ether].dst == n2_mac and frame[Ether].src == n1_mac
    reply = frame[ARP]
    assert reply.op == 2  # is-at
    assert reply.hwsrc == n1_mac and reply.psrc == n1_vtep
    assert reply.hwdst == n2_mac and reply.pdst == n2_vtep

    # A request for someone else's address is not answered.
    other = request[:-4] + socket.inet_aton(str(_subnet(bed, "n3").network_address))
    drops = _drops(bed, "n1").get("rx_arp_not_for_us", 0)
    _send_udp(bed, "n2", n1_ip, [other])
    assert _wait_drop(bed, "n1", "rx_arp_not_for_us", drops) == 1
    assert node_status(bed, "n1")["arp_replies"] == before + 1


# Run in n3's netns: an ARP request out of flannel.1 (so the kernel's vxlan device does
# the encapsulation, via its fdb entry for the target MAC), then the first ARP reply the
# kernel decapsulates back onto flannel.1, as hex.
_KERNEL_ARP = """
import socket, sys, time
frame = bytes.fromhex(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("flannel.1", 0))
s.settimeout(0.2)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    s.send(frame)
    end = time.monotonic() + 1
    while time.monotonic() < end:
        try:
            data = s.recv(2048)
        except TimeoutError:
            continue
        if data[0:6] == frame[6:12] and data[20:22] == b"\\x00\\x02":
            print(data.hex())
            sys.exit(0)
sys.exit(1)
"""


def test_kernel_peer_resolves_our_vtep_by_arp(bed: Testbed) -> None:
    """What the ARP answer is for: the kernel's flannel.1 asks "who has <n1's VTEP
    address>" (unicast to the MAC it last knew, as a stale neighbour entry is probed)."""
    n1_mac, n3_mac = _vtep_mac(bed, "n1"), _vtep_mac(bed, "n3")
    n1_vtep = str(_subnet(bed, "n1").network_address)
    n3_vtep = str(_subnet(bed, "n3").network_address)
    frame = (
        vxlan.parse_mac(n1_mac)
        + vxlan.parse_mac(n3_mac)
        + b"\x08\x06"
        + arp.build(
            arp.REQUEST,
            vxlan.parse_mac(n3_mac),
            socket.inet_aton(n3_vtep),
            bytes(6),
            socket.inet_aton(n1_vtep),
        )
    )
    before = node_status(bed, "n1")["arp_replies"]
    result = bed.exec(
        "n3",
        [sys.executable, "-c", _KERNEL_ARP, frame.hex()],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert result.returncode == 0, (result.stderr, _drops(bed, "n1"))
    reply = arp.parse(bytes.fromhex(result.stdout.strip())[14:])
    assert reply.operation == arp.REPLY
    assert reply.sender_mac == vxlan.parse_mac(n1_mac)
    assert reply.sender_ip == socket.inet_aton(n1_vtep)
    assert reply.target_mac == vxlan.parse_mac(n3_mac)
    assert reply.target_ip == socket.inet_aton(n3_vtep)
    assert node_status(bed, "n1")["arp_replies"] > before


# -- the control plane --------------------------------------------------------------------


def _skipped_lines(bed: Testbed, node: int, subnet: IPv4Network) -> list[dict[str, Any]]:
    lines = []
    for line in bed.log_file(node).read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "peer_skipped" and entry.get("subnet") == str(subnet):
            lines.append(entry)
    return lines


def test_lease_of_another_backend_is_skipped_once(bed: Testbed) -> None:
    other = _free_subnet(bed, 250)
    marker = _free_subnet(bed, 240)
    value = {"PublicIP": "192.0.2.78", "PublicIPv6": None, "BackendType": "host-gw"}
    try:
        for _ in range(3):  # put, then re-put twice
            _put_lease(bed, other, value)
        # A vxlan lease put afterwards: once every node has it, it has seen the three puts.
        _put_lease(bed, marker, _vxlan_lease(FAKE_IP))
        for i in (1, 2, 3):
            assert poll(lambda i=i: str(marker) in _peer_subnets(bed, f"n{i}")), i
            assert str(other) not in _peer_subnets(bed, f"n{i}")
            skipped = _skipped_lines(bed, i, other)
            assert len(skipped) == 1, skipped
            assert skipped[0]["backend"] == "host-gw"
        assert str(other) not in node_status(bed, "n3")["programmed"]
    finally:
        _del_lease(bed, other)
        _del_lease(bed, marker)
    for i in (1, 2, 3):
        assert poll(lambda i=i: str(marker) not in _peer_subnets(bed, f"n{i}")), i


def _kernel_state(bed: Testbed, node: str) -> dict[str, Any]:
    def j(argv: list[str]) -> Any:
        out = bed.exec(node, argv, capture_output=True, text=True, check=True).stdout
        return json.loads(out or "[]")

    return {
        "link": j(["ip", "-j", "-d", "link", "show", "flannel.1"])[0],
        "neigh": j(["ip", "-j", "neigh", "show", "dev", "flannel.1"]),
        "fdb": j(["bridge", "-j", "fdb", "show", "dev", "flannel.1"]),
        "routes": j(["ip", "-j", "route", "show"]),
    }


def _peer_programmed(state: dict[str, Any], subnet: IPv4Network, public_ip: str, mac: str) -> bool:
    vtep = str(subnet.network_address)
    neigh = any(
        n.get("dst") == vtep and n.get("lladdr") == mac and "PERMANENT" in n.get("state", [])
        for n in state["neigh"]
    )
    fdb = any(
        f.get("mac") == mac
        and f.get("dst") == public_ip
        and "self" in f.get("flags", [])
        and f.get("state") == "permanent"
        for f in state["fdb"]
    )
    route = any(
        r.get("dst") == str(subnet)
        and r.get("gateway") == vtep
        and r.get("dev") == "flannel.1"
        and "onlink" in r.get("flags", [])
        for r in state["routes"]
    )
    return neigh and fdb and route


def _peer_gone(state: dict[str, Any], subnet: IPv4Network, public_ip: str, mac: str) -> bool:
    vtep = str(subnet.network_address)
    return (
        not any(n.get("dst") == vtep for n in state["neigh"])
        and not any(f.get("mac") == mac or f.get("dst") == public_ip for f in state["fdb"])
        and not any(r.get("dst") == str(subnet) for r in state["routes"])
    )


def test_kernel_node_is_programmed_like_flanneld(bed: Testbed) -> None:
    state = _kernel_state(bed, "n3")
    link = state["link"]
    assert link["address"] == _vtep_mac(bed, "n3")
    assert link["mtu"] == 1450
    data = link["linkinfo"]["info_data"]
    assert link["linkinfo"]["info_kind"] == "vxlan"
    assert data["id"] == 1 and data["port"] == PORT and data["learning"] is False
    assert data["local"] == str(bed.node_ip(3))
    for peer in ("n1", "n2"):
        subnet = _subnet(bed, peer)
        ip = str(bed.node_ip(int(peer[1:])))
        assert _peer_programmed(state, subnet, ip, _vtep_mac(bed, peer)), (peer, state)
    assert sorted(node_status(bed, "n3")["programmed"]) == sorted(
        str(_subnet(bed, p)) for p in ("n1", "n2")
    )

    fake = _free_subnet(bed, 230)
    lease = _vxlan_lease(FAKE_IP)
    mac = lease["BackendData"]["VtepMAC"]
    try:
        _put_lease(bed, fake, lease)
        assert poll(lambda: _peer_programmed(_kernel_state(bed, "n3"), fake, FAKE_IP, mac)), (
            _kernel_state(bed, "n3")
        )
        assert str(fake) in node_status(bed, "n3")["programmed"]
    finally:
        _del_lease(bed, fake)
    assert poll(lambda: _peer_gone(_kernel_state(bed, "n3"), fake, FAKE_IP, mac)), _kernel_state(
        bed, "n3"
    )
    assert str(fake) not in node_status(bed, "n3")["programmed"]
    # The real peers are untouched.
    state = _kernel_state(bed, "n3")
    for peer in ("n1", "n2"):
        ip = str(bed.node_ip(int(peer[1:])))
        assert _peer_programmed(state, _subnet(bed, peer), ip, _vtep_mac(bed, peer))
    assert node_status(bed, "n3")["netlink_errors"] == 0
    _ping(bed, "n3-p1", bed.pod_ip("n1-p1"))


def test_trace_of_a_ping_decodes_as_vxlan(bed: Testbed, tmp_path: Path) -> None:
    from tests.helpers.commands import overlay_cmd

    capture = tmp_path / "v.pcapng"
    sock = str(bed.node_dir(1) / "status.sock")
    tracer = subprocess.Popen(
        overlay_cmd("trace", "--status-socket", sock, "-c", "2", "-w", str(capture), "outer icmp"),
        stderr=subprocess.PIPE,
    )
    assert tracer.stderr is not None and b"capturing on" in tracer.stderr.readline()
    _ping(bed, "n1-p1", bed.pod_ip("n2-p1"), count=1)
    _, err = tracer.communicate(timeout=20)
    assert tracer.returncode == 0, err
    fields = ["udp.dstport", "vxlan.vni", "eth.dst", "eth.src", "icmp.type"]
    result = subprocess.run(
        ["tshark", "-r", str(capture), "-d", "udp.port==8472,vxlan", "-T", "fields"]
        + [a for f in fields for a in ("-e", f)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [r[0] for r in rows] == ["8472", "8472"] and [r[1] for r in rows] == ["1", "1"]
    assert rows[0][2] == _vtep_mac(bed, "n2") and rows[0][3] == _vtep_mac(bed, "n1")
    assert [r[4] for r in rows] == ["8", "0"]  # the ICMP inside the VXLAN frame


def test_kernel_node_reports_the_kernels_counters(bed: Testbed) -> None:
    """n3 forwards in the kernel: its status and metrics are flannel.1's link statistics
    (moving with traffic), not zeros; a trace there says to use tcpdump."""
    from overlay.cli import status
    from overlay.observe import metrics
    from tests.helpers.commands import overlay_cmd

    before = node_status(bed, "n3")["kernel_counters"]
    _ping(bed, "n3-p1", bed.pod_ip("n1-p1"), count=3)
    st = node_status(bed, "n3")
    kernel = st["kernel_counters"]
    assert kernel["device"] == "flannel.1" and st["counters"] == {}
    assert kernel["tx_packets"] >= before["tx_packets"] + 3
    assert kernel["rx_packets"] >= before["rx_packets"] + 3
    link = json.loads(
        bed.exec(
            "n3", ["ip", "-s", "-j", "link", "show", "flannel.1"], capture_output=True, text=True
        ).stdout
    )[0]["stats64"]
    assert kernel["tx_packets"] <= link["tx"]["packets"]
    text = metrics.render(st).decode()
    assert f'overlay_sent_packets_total{{family="ipv4"}} {float(kernel["tx_packets"])}' in text
    assert 'overlay_kernel_link_receive_packets_total{device="flannel.1"}' in text
    assert "overlay_peer_sent_packets_total" not in text  # no per-peer counts, not zeros
    table = status.format_table(st)
    assert "kernel     flannel.1: sent" in table
    refused = subprocess.run(
        overlay_cmd("trace", "--status-socket", str(bed.node_dir(3) / "status.sock")),
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "tcpdump -i flannel.1" in refused.stderr


def test_no_unexpected_drops(bed: Testbed) -> None:
    """The traffic of the tests above went through without drops we did not cause."""
    for node in ("n1", "n2"):
        drops = _drops(bed, node)
        provoked = {
            "rx_vxlan_wrong_vni",
            "rx_vxlan_truncated",
            "rx_vxlan_bad_ethertype",
            "rx_vxlan_foreign_mac",
            "rx_vxlan_bad_flags",
            "rx_arp_not_for_us",
            "rx_bad_l4_checksum",
        }
        unexpected = {k: v for k, v in drops.items() if v and k not in provoked}
        assert not unexpected, (node, drops)


def _routes(bed: Testbed, node: str, dst: str) -> list[dict[str, Any]]:
    out = bed.exec(node, ["ip", "-j", "route", "show", dst], capture_output=True, text=True)
    return list(json.loads(out.stdout or "[]"))


# -- DirectRouting --------------------------------------------------------------------------


def test_direct_routing_uses_plain_routes() -> None:
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.utils import rdpcap

    tb = Testbed(
        "d" + uuid.uuid4().hex[:7],
        nodes=2,
        pods_per_node=1,
        backend="vxlan",
        kernel_nodes=(2,),
        direct_routing=True,
    )
    try:
        tb.up()
        for here, there in ((1, 2), (2, 1)):
            subnet = str(_subnet(tb, f"n{there}"))
            want = {"dst": subnet, "gateway": str(tb.node_ip(there)), "dev": "eth0"}
            assert poll(
                lambda here=here, subnet=subnet, want=want: any(
                    {k: r.get(k) for k in want} == want for r in _routes(tb, f"n{here}", subnet)
                )
            ), (here, _routes(tb, f"n{here}", subnet))
        # The kernel node programs no vxlan neighbour for a directly reachable peer.
        fdb = tb.exec("n2", ["bridge", "fdb", "show", "dev", "flannel.1"], capture_output=True)
        assert str(tb.node_ip(1)).encode() not in fdb.stdout, fdb.stdout
        via_vxlan = tb.exec(
            "n2", ["ip", "route", "show", "dev", "flannel.1"], capture_output=True, text=True
        )
        assert via_vxlan.stdout.strip() == "", via_vxlan.stdout
        p1, p2 = tb.pod_ip("n1-p1"), tb.pod_ip("n2-p1")
        cap = Capture(tb, "n1", f"icmp or udp port {PORT}", 8)
        try:
            _ping(tb, "n1-p1", p2, count=2)
            _ping(tb, "n2-p1", p1, count=2)
            packets = rdpcap(str(cap.wait()))
        finally:
            cap.close()
        assert len(packets) == 8
        assert all(ICMP in p for p in packets), [p.summary() for p in packets]
        assert {(p[IP].src, p[IP].dst) for p in packets} == {(p1, p2), (p2, p1)}
        assert not any(UDP in p for p in packets)
        # TCP both ways over the plain routes, the kernel node with its default offloads.
        transfer(tb, "n1-p1", "n2-p1", 20 * 1024 * 1024, 5204)
        transfer(tb, "n2-p1", "n1-p1", 20 * 1024 * 1024, 5205)
        assert node_status(tb, "n1")["counters"]["tx_packets"] == 0
    finally:
        tb.down()
