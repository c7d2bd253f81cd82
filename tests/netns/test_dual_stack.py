"""Dual stack end to end, one daemon per node namespace on one IPv4 + IPv6 underlay
(192.0.2.0/24 and 2001:db8::/64), each node with a pod namespace behind a veth holding
the lease's gateway addresses (what the CNI bridge does): pods ping each other over IPv4
and IPv6, both ways, on host-gw and on the kernel's vxlan devices (flannel.1 and
flannel-v6.1 made and programmed as flanneld makes them); a node of ours against a
flannel-v6.1 made by hand the way flanneld makes it; --ip-blackhole-route; and what is
refused, in one line."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from ipaddress import ip_interface
from pathlib import Path
from typing import Any

import pytest

from control.file_registry import FileRegistry
from control.subnet_env import parse_subnet_env
from encap import vxlan as vxlan_codec
from overlay.observe import status_socket as status
from overlay.observe.drop_log import SAMPLE_WAIT
from tests.helpers.cni import invoke, netconf
from tests.helpers.dual_stack import (
    DATAPATH_IDS,
    DATAPATHS,
    DUAL,
    SUBNETS,
    in_ns,
    ip,
    ip_out,
    kernel_exact,
    kernel_of,
    leases,
    peer_seen,
    pings,
    pod,
    seed,
    serving,
    start_nodes,
    tcp_transfer,
    underlay,
)
from tests.helpers.polling import poll

pytestmark = pytest.mark.netns


@pytest.mark.parametrize(("backend", "flags"), DATAPATHS, ids=DATAPATH_IDS)
def test_pods_ping_over_ipv4_and_ipv6_both_ways(
    netns: Callable[[str], str],
    daemons: Any,
    tmp_path: Path,
    backend: dict[str, Any],
    flags: tuple[str, ...],
) -> None:
    nodes, started, registry = start_nodes(
        netns, daemons, tmp_path, {**DUAL, "Backend": backend}, *flags, "--ip-blackhole-route"
    )
    envs = [parse_subnet_env(d.subnet_file.read_text()) for d in started]
    for n, (env, daemon) in enumerate(zip(envs, started, strict=True), 1):
        assert env.ipv6_network is not None and str(env.ipv6_network) == "fd00:10::/56"
        assert env.ipv6_subnet is not None and env.ipv6_subnet.network.prefixlen == 64
        lease = status.query(daemon.socket)["lease"]
        assert lease["ipv6_subnet"] == str(env.ipv6_subnet.network)
        assert lease["public_ipv6"] == f"2001:db8::{n}"
    pods = [netns("p1"), netns("p2")]
    addresses = [pod(node, p, env) for node, p, env in zip(nodes, pods, envs, strict=True)]
    for src, dst in ((0, 1), (1, 0)):
        for address in addresses[dst]:
            assert poll(lambda a=address, s=src: pings(pods[s], a), timeout=10), (
                f"pod {src + 1} cannot reach {address}: "
                + ip(nodes[src], "-6", "route")
                + ip(nodes[src], "route")
            )
    for daemon in started:  # reconciled: what the kernel has is exactly what we programmed
        assert poll(lambda d=daemon: kernel_exact(d), timeout=15), kernel_of(daemon)
    # The records: flanneld's keys and values, with PublicIPv6 (and BackendV6Data).
    records = leases(registry)
    assert len(records) == 2
    for n, (key, value) in enumerate(sorted(records.items(), key=lambda kv: kv[1]["PublicIP"]), 1):
        assert "&fd00:10:0:" in key and key.endswith("::-64")
        assert value["PublicIP"] == f"192.0.2.{n}" and value["PublicIPv6"] == f"2001:db8::{n}"
        if backend["Type"] == "vxlan" and flags:
            mac6 = json.loads(ip(nodes[n - 1], "-j", "link", "show", "flannel-v6.1"))[0]["address"]
        elif backend["Type"] == "vxlan":  # userspace: the TUN has no MAC; status shows it
            mac6 = status.query(started[n - 1].socket)["vtep_mac6"]
        if backend["Type"] == "vxlan":
            assert value["BackendV6Data"] == {"VNI": 1, "VtepMAC": mac6}
            assert list(value) == [
                "PublicIP",
                "PublicIPv6",
                "BackendType",
                "BackendData",
                "BackendV6Data",
            ]
        else:
            assert list(value) == ["PublicIP", "PublicIPv6", "BackendType"]
    # --ip-blackhole-route: one per family, for the lease's subnets.
    for node, env in zip(nodes, envs, strict=True):
        assert env.ipv6_subnet is not None
        assert f"blackhole {env.subnet.network}" in ip(node, "route", "show", "type", "blackhole")
        shown6 = ip(node, "-6", "route", "show", "type", "blackhole")
        assert f"blackhole {env.ipv6_subnet.network}" in shown6


def test_kernel_vxlan_v6_device_as_flanneld_makes_it(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    nodes, started, registry = start_nodes(
        netns, daemons, tmp_path, {**DUAL, "Backend": {"Type": "vxlan"}}, "--kernel-vxlan"
    )
    env = parse_subnet_env(started[0].subnet_file.read_text())
    peer = parse_subnet_env(started[1].subnet_file.read_text())
    assert env.ipv6_subnet is not None and peer.ipv6_subnet is not None
    details = ip(nodes[0], "-d", "link", "show", "flannel-v6.1")
    assert "vxlan id 1 local 2001:db8::1 dev eth0" in details and "dstport 8472" in details
    assert "nolearning" in details and "mtu 1430" in details, details
    shown = ip(nodes[0], "-6", "addr", "show", "dev", "flannel-v6.1")
    assert f"inet6 {env.ipv6_subnet.network.network_address}/128" in shown, shown
    vtep = peer.ipv6_subnet.network.network_address
    peer_mac = json.loads(ip(nodes[1], "-j", "link", "show", "flannel-v6.1"))[0]["address"]

    def programmed() -> bool:
        neigh = ip_out(nodes[0], "-6", "neigh", "show", "dev", "flannel-v6.1")
        fdb = subprocess.run(
            ["bridge", "-n", nodes[0], "fdb", "show", "dev", "flannel-v6.1"],
            capture_output=True,
            text=True,
        ).stdout
        routes = ip_out(nodes[0], "-6", "route", "show", "dev", "flannel-v6.1")
        return (
            f"{vtep} lladdr {peer_mac} PERMANENT" in neigh
            and f"{peer_mac} dst 2001:db8::2 self permanent" in fdb
            and f"{peer.ipv6_subnet.network} via {vtep}" in routes
            and "onlink" in routes
        )

    assert poll(programmed, timeout=10)
    assert poll(lambda: kernel_exact(started[0]), timeout=15), kernel_of(started[0])
    # Deleted, it comes back (reconciled like the IPv4 device).
    ip(nodes[0], "link", "del", "flannel-v6.1")
    assert poll(programmed, timeout=15)
    assert len(leases(registry)) == 2


def link_mtu(ns: str, dev: str) -> int:
    return int(json.loads(ip(ns, "-j", "link", "show", dev))[0]["mtu"])


def test_flannel_v6_follows_the_underlays_mtu(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    """eth0 lowered under a running dual-stack kernel-vxlan node: flannel.1 takes
    underlay - 50, flannel-v6.1 underlay - 70, subnet.env is rewritten with the new MTU
    and keeps its IPv6 lines, the kernel state stays exact; raised, both come back."""
    nodes, started, _ = start_nodes(
        netns, daemons, tmp_path, {**DUAL, "Backend": {"Type": "vxlan"}}, "--kernel-vxlan"
    )
    node, daemon = nodes[0], started[0]
    assert (link_mtu(node, "flannel.1"), link_mtu(node, "flannel-v6.1")) == (1450, 1430)
    before = parse_subnet_env(daemon.subnet_file.read_text())
    assert before.ipv6_network is not None and before.ipv6_subnet is not None
    for underlay_mtu in (1400, 1500):
        ip(node, "link", "set", "eth0", "mtu", str(underlay_mtu))

        def devices(wanted: tuple[int, int] = (underlay_mtu - 50, underlay_mtu - 70)) -> bool:
            return (link_mtu(node, "flannel.1"), link_mtu(node, "flannel-v6.1")) == wanted

        def rewritten(mtu: int = underlay_mtu - 50) -> bool:
            return parse_subnet_env(daemon.subnet_file.read_text()).mtu == mtu

        assert poll(devices, timeout=5), (
            link_mtu(node, "flannel.1"),
            link_mtu(node, "flannel-v6.1"),
        )
        assert poll(rewritten, timeout=5), daemon.subnet_file.read_text()
        env = parse_subnet_env(daemon.subnet_file.read_text())
        assert (env.ipv6_network, env.ipv6_subnet) == (before.ipv6_network, before.ipv6_subnet)
        assert poll(lambda: kernel_exact(daemon), timeout=15), kernel_of(daemon)
    assert status.query(daemon.socket)["mtu_changes"] == 2


def test_our_node_against_a_flannel_v6_made_by_hand(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    """Interop: node 2 is no daemon of ours but the kernel config flanneld makes for a
    dual-stack vxlan node (flannel.1 and flannel-v6.1, its lease written in flanneld's
    JSON); our node 1 reaches its addresses over IPv4 and IPv6, and it reaches ours."""
    nodes = [netns("n1"), netns("n2")]
    underlay(nodes)
    registry = seed(tmp_path, {**DUAL, "Backend": {"Type": "vxlan"}})
    hand, mac4, mac6 = nodes[1], "0e:00:00:00:02:04", "0e:00:00:00:02:06"
    for dev, local, mac in (
        ("flannel.1", "192.0.2.2", mac4),
        ("flannel-v6.1", "2001:db8::2", mac6),
    ):
        ip(hand, "link", "add", dev, "address", mac, "type", "vxlan", "id", "1", "local", local,
           "dev", "eth0", "dstport", "8472", "nolearning")  # fmt: skip
        ip(hand, "link", "set", dev, "up")
    ip(hand, "addr", "add", "198.18.77.0/32", "dev", "flannel.1")
    ip(hand, "addr", "add", "fd00:10:0:77::/128", "dev", "flannel-v6.1", "nodad")
    value = (
        '{"PublicIP":"192.0.2.2","PublicIPv6":"2001:db8::2","BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{mac4}"}},'
        f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}'
    )
    FileRegistry(registry).put_sync(
        f"{SUBNETS}198.18.77.0-24&fd00:10:0:77::-64", value.encode(), 3600
    )
    work = tmp_path / "n1"
    work.mkdir()
    ours = daemons(
        nodes[0], work, "--registry-file", str(registry), "--iface", "eth0", "--kernel-vxlan",
        lo=False,
    )  # fmt: skip
    ours.wait_event("started")
    env = parse_subnet_env(ours.subnet_file.read_text())
    assert env.ipv6_subnet is not None
    record = leases(registry)
    our_value = next(v for k, v in record.items() if v["PublicIP"] == "192.0.2.1")
    # flanneld's programming on the hand-made node, for our lease.
    vtep4 = env.subnet.network.network_address
    vtep6 = env.ipv6_subnet.network.network_address
    mac4_ours = our_value["BackendData"]["VtepMAC"]
    mac6_ours = our_value["BackendV6Data"]["VtepMAC"]
    for dev, vtep, mac, public, subnet, six in (
        ("flannel.1", vtep4, mac4_ours, "192.0.2.1", env.subnet.network, []),
        ("flannel-v6.1", vtep6, mac6_ours, "2001:db8::1", env.ipv6_subnet.network, ["-6"]),
    ):
        ip(hand, *six, "neigh", "replace", str(vtep), "lladdr", mac, "dev", dev, "nud", "permanent")
        subprocess.run(
            ["bridge", "-n", hand, "fdb", "replace", mac, "dev", dev, "dst", public, "self",
             "permanent"],
            check=True,
        )  # fmt: skip
        ip(hand, *six, "route", "replace", str(subnet), "via", str(vtep), "dev", dev, "onlink")
    # Our node's TUN-less kernel datapath: ping the hand node's VTEP addresses from ours,
    # sourced from our gateway addresses (held on a pod veth, as cni0 holds them).
    pod_ns = netns("p1")
    pod(nodes[0], pod_ns, env)
    for address in ("198.18.77.0", "fd00:10:0:77::"):
        assert poll(lambda a=address: pings(pod_ns, a), timeout=10), (
            address,
            ip(nodes[0], "-6", "neigh"),
            ip(nodes[0], "-6", "route"),
        )


@pytest.mark.parametrize(
    ("backend", "flags", "message"),
    [({"Type": "udp"}, (), "EnableIPv6: flannel's udp backend is IPv4 only")],
    ids=["udp"],
)
def test_ipv6_on_an_ipv4_only_datapath_is_refused_in_one_line(
    netns: Callable[[str], str],
    daemons: Any,
    tmp_path: Path,
    backend: dict[str, Any],
    flags: tuple[str, ...],
    message: str,
) -> None:
    ns = netns("v6")
    underlay([ns])
    registry = seed(tmp_path, {**DUAL, "Backend": backend})
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry), "--iface", "eth0", *flags,
                     lo=False)  # fmt: skip
    assert daemon.proc.wait(timeout=15) == 1
    (fatal,) = [e for e in daemon.events() if e.get("level") == "fatal"]
    assert message in fatal["event"] and "\n" not in fatal["event"]
    assert leases(registry) == {}  # refused before any lease was taken


def test_enable_ipv6_without_an_ipv6_address_says_so(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    ns = netns("nov6")
    ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    ip(ns, "addr", "add", "192.0.2.1/24", "dev", "eth0")
    ip(ns, "link", "set", "eth0", "up")
    in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")
    registry = seed(tmp_path, {**DUAL, "Backend": {"Type": "host-gw"}})
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry), "--iface", "eth0", lo=False)
    assert daemon.proc.wait(timeout=15) == 1
    (fatal,) = [e for e in daemon.events() if e.get("level") == "fatal"]
    assert "EnableIPv6: eth0 has no IPv6 address to publish" in fatal["event"]


@pytest.mark.parametrize(
    "random_fully", [True, False], ids=["random-fully", "fully-random-disable"]
)
def test_ip6tables_masq_and_forward_rules_as_flanneld(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path, random_fully: bool
) -> None:
    flags = ["--ip-masq", *([] if random_fully else ["--ip-masq-fully-random-disable"])]
    nodes, started, _ = start_nodes(
        netns, daemons, tmp_path, {**DUAL, "Backend": {"Type": "host-gw"}}, *flags
    )
    envs = [parse_subnet_env(d.subnet_file.read_text()) for d in started]
    assert envs[0].ipv6_subnet is not None
    lease6 = envs[0].ipv6_subnet.network
    masq6 = in_ns(nodes[0], "ip6tables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
    fully = " --random-fully" if random_fully else ""
    comment = '-m comment --comment "flanneld masq"'
    for rule in (
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {comment} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {lease6} -d fd00:10::/56 {comment} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd00:10::/56 -d {lease6} {comment} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s fd00:10::/56 -d {lease6} {comment} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd00:10::/56 ! -d ff00::/8 {comment} -j MASQUERADE{fully}",
        f"-A FLANNEL-POSTRTG ! -s fd00:10::/56 -d fd00:10::/56 {comment} -j MASQUERADE{fully}",
    ):
        assert rule in masq6.splitlines(), (rule, masq6)
    masq4 = in_ns(nodes[0], "iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
    assert ("--random-fully" in masq4) is random_fully, masq4
    forward6 = in_ns(nodes[0], "ip6tables", "-S", "FLANNEL-FWD").stdout
    assert '-A FLANNEL-FWD -s fd00:10::/56 -m comment --comment "flanneld forward" -j ACCEPT' in (
        forward6
    )
    pods = [netns("p1"), netns("p2")]
    addresses = [pod(node, p, env) for node, p, env in zip(nodes, pods, envs, strict=True)]
    assert poll(lambda: pings(pods[0], addresses[1][1]), timeout=10)
    # Leaving the overlay (to node 2's underlay address): masqueraded to node 1's.
    assert peer_seen(nodes[1], "2001:db8::2", pods[0]) == "2001:db8::1"
    # Pod to pod: the pod's own address.
    assert peer_seen(pods[1], addresses[1][1], pods[0]) == addresses[0][1]
    assert started[0].stop()[0] == 0
    gone = in_ns(nodes[0], "ip6tables", "-t", "nat", "-S", "FLANNEL-POSTRTG", check=False)
    assert gone.returncode != 0 and "FLANNEL" not in in_ns(nodes[0], "ip6tables-save").stdout


def test_pods_added_by_the_cni_plugin_get_both_families_and_talk(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    """The real bridge + host-local plugins behind ours: each pod gets an address from
    both leases (flannel's plugin's two ranges) and reaches the other pod over both."""
    nodes, started, _ = start_nodes(
        netns, daemons, tmp_path, {**DUAL, "Backend": {"Type": "vxlan"}}, "--kernel-vxlan"
    )
    pods = [netns("p1"), netns("p2")]
    addresses: list[dict[int, str]] = []
    for n, (node, pod_ns, daemon) in enumerate(zip(nodes, pods, started, strict=True), 1):
        conf = netconf(tmp_path / f"n{n}", subnetFile=str(daemon.subnet_file))
        added = invoke("ADD", conf, node=node, pod=pod_ns, container=f"c{n}")
        assert added.returncode == 0, added.stdout + added.stderr
        ips = json.loads(added.stdout)["ips"]
        addresses.append(
            {ip_interface(x["address"]).version: str(ip_interface(x["address"]).ip) for x in ips}
        )
    assert all(set(found) == {4, 6} for found in addresses), addresses
    for src, dst in ((0, 1), (1, 0)):
        for address in addresses[dst].values():
            assert poll(lambda a=address, s=src: pings(pods[s], a), timeout=15), address


# -- IPv6 on the userspace vxlan datapath (issue 20) --------------------------------------


def start_pair(
    netns: Callable[[str], str],
    daemons: Any,
    tmp_path: Path,
    flags: tuple[tuple[str, ...], tuple[str, ...]],
    env: dict[str, str] | None = None,
) -> tuple[list[str], list[Any], list[str], list[tuple[str, str]]]:
    """Two dual-stack vxlan nodes (each with its own flags) and a pod on each: nodes,
    daemons, pods, the pods' (IPv4, IPv6) addresses."""
    nodes = [netns("n1"), netns("n2")]
    underlay(nodes)
    registry = seed(tmp_path, {**DUAL, "Backend": {"Type": "vxlan"}})
    started = []
    for n, (ns, extra) in enumerate(zip(nodes, flags, strict=True), 1):
        work = tmp_path / f"n{n}"
        work.mkdir()
        started.append(
            daemons(ns, work, "--registry-file", str(registry), "--iface", "eth0", *extra,
                    lo=False, env=env)
        )  # fmt: skip
    for daemon in started:
        daemon.wait_event("started")
    envs = [parse_subnet_env(d.subnet_file.read_text()) for d in started]
    pods = [netns("p1"), netns("p2")]
    addresses = [pod(node, p, e) for node, p, e in zip(nodes, pods, envs, strict=True)]
    for src, dst in ((0, 1), (1, 0)):
        v6 = addresses[dst][1]
        assert poll(lambda a=v6, s=src: pings(pods[s], a), timeout=10), (
            f"pod {src + 1} cannot reach {v6}: " + ip(nodes[src], "-6", "route")
        )
    return nodes, started, pods, addresses


@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "reference"])
def test_userspace_vxlan_ipv6_tcp_both_ways_and_unreachable(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path, native: str
) -> None:
    """Two userspace-vxlan nodes, with the native drains and with the pure reference:
    the TUN holds the lease's IPv6 address and the route for IPv6Network, 20 MB cross
    over TCP/IPv6 intact each way, and a destination no peer owns gets ICMPv6
    destination unreachable (no route) from the node's TUN address."""
    nodes, started, pods, addresses = start_pair(
        netns, daemons, tmp_path, ((), ()), env={"OVERLAY_NATIVE": native}
    )
    assert status.query(started[0].socket)["features"]["native"] is (native == "1")
    env = parse_subnet_env(started[0].subnet_file.read_text())
    assert env.ipv6_subnet is not None
    shown = ip(nodes[0], "-6", "addr", "show", "dev", "flannel0")
    assert f"inet6 {env.ipv6_subnet.network.network_address}/128" in shown, shown
    assert "fe80" not in shown  # no link-local: nothing of the kernel's own in the TUN
    assert "fd00:10::/56 dev flannel0" in ip(nodes[0], "-6", "route")
    # A first connection's first segments are too big for IPv6 (tx_too_big, until PMTU
    # discovery): a reason counted for the first time has the drop log attach a sampling
    # trace for up to SAMPLE_WAIT s, the IPv6 half going one datagram at a time meanwhile.
    for src, dst in ((0, 1), (1, 0)):
        tcp_transfer(pods[src], pods[dst], addresses[dst][1], megabytes=1)
    time.sleep(SAMPLE_WAIT + 0.5)
    for src, dst in ((0, 1), (1, 0)):
        tcp_transfer(pods[src], pods[dst], addresses[dst][1])
    for daemon in started:
        shown = status.query(daemon.socket)
        counts = shown["counters"]
        assert counts["rx_packets"] > 10000 and counts["tx_packets"] > 10000, counts
        # The fast path did it: TSO6 super-packets read and cut, their segments sent with
        # UDP GSO, the peer's GSO sends received whole (GRO) and written as GSO_TCPV6.
        for key in ("tx_tun_super_packets", "tx_gso_sends", "rx_gro_receives"):
            assert shown[f"ipv6_{key}"] > 100, (key, shown)
        assert shown["ipv6_rx_tun_super_packets"] > 100, shown
    unreachable = in_ns(pods[0], "ping", "-6", "-c", "1", "-W", "2", "fd00:10:0:ff::1", check=False)
    gateway = env.ipv6_subnet.network.network_address
    assert f"From {gateway} icmp_seq=1 Destination unreachable: No route" in unreachable.stdout, (
        unreachable.stdout
    )
    assert status.query(started[0].socket)["counters"]["drops"]["tx_no_route"] >= 1


# A UDP socket that sends without a checksum over IPv6 (udp6zerocsumtx's way):
# UDP_NO_CHECK6_TX. argv: bind address, destination, hex payload.
ZERO_CSUM_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_UDP, 101, int(sys.argv[4]))
s.bind((sys.argv[1], 0))
s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[2], 8472))
"""
# Waits up to 3 s for one datagram on [argv[1]]:9999; prints it (hex) or "none".
UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9999))
print("ready", flush=True)
s.settimeout(3)
try:
    print(s.recv(2048).hex(), flush=True)
except TimeoutError:
    print("none", flush=True)
"""


def inner_udp6(src: str, dst: str, payload: bytes) -> bytes:
    """An IPv6 UDP packet to port 9999 with a valid checksum."""
    from ipaddress import IPv6Address

    from encap import ipv6 as codec
    from encap.checksum import internet_checksum

    s, d = IPv6Address(src).packed, IPv6Address(dst).packed
    udp = bytearray((4321).to_bytes(2, "big") + (9999).to_bytes(2, "big"))
    udp += (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    pseudo = s + d + len(udp).to_bytes(4, "big") + bytes((0, 0, 0, 17))
    udp[6:8] = internet_checksum(pseudo + udp + b"\0" * (len(udp) % 2)).to_bytes(2, "big")
    return codec.build_packet(s, d, 17, bytes(udp), 64)


def delivered(
    sender_ns: str, bind: str, to: str, datagram: bytes, sink_ns: str, sink: str, zero: bool
) -> bool:
    """Whether ``datagram`` sent to [to]:8472 from [bind] (``zero``: without a UDP
    checksum) brings its inner UDP payload to [sink]:9999 in ``sink_ns``."""
    with serving(sink_ns, UDP_SINK, sink) as line:
        in_ns(sender_ns, "python3", "-c", ZERO_CSUM_SEND, bind, to, datagram.hex(), str(int(zero)))
        return line() != "none"


def outer_checksums(capture: Path) -> list[tuple[str, str]]:
    """(source, UDP checksum) of every VXLAN-over-IPv6 datagram in ``capture``."""
    fields = subprocess.run(
        ["tshark", "-r", str(capture), "-Y", "ipv6 && udp.port == 8472", "-T", "fields",
         "-e", "ipv6.src", "-e", "udp.checksum"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [tuple(line.split("\t")) for line in fields.splitlines() if line]  # type: ignore[misc]


def test_userspace_vxlan_ipv6_against_kernel_vxlan_with_default_offloads(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    """Interop: node 1 on our userspace datapath, node 2 on the kernel's flannel-v6.1
    (programmed as flanneld does, offloads at their defaults everywhere). Pods ping and
    move 20 MB over TCP/IPv6 intact both ways. On the wire both send outer UDP checksums
    over IPv6 (the kernel's udp6zerocsumtx is off by default), and both drop a datagram
    without one (udp6zerocsumrx off) while the same datagram with one is delivered."""
    nodes, started, pods, addresses = start_pair(
        netns, daemons, tmp_path, ((), ("--kernel-vxlan",))
    )
    details = ip(nodes[1], "-d", "link", "show", "flannel-v6.1")
    assert "noudp6zerocsumtx noudp6zerocsumrx" in details, details  # the kernel's defaults
    capture = tmp_path / "outer.pcap"
    dump = subprocess.Popen(
        ["ip", "netns", "exec", nodes[0], "tcpdump", "-i", "eth0", "-w", str(capture),
         "-U", "-c", "400", "ip6 and udp port 8472"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1)
        for src, dst in ((0, 1), (1, 0)):
            tcp_transfer(pods[src], pods[dst], addresses[dst][1])
    finally:
        dump.terminate()
        dump.wait()
    seen = outer_checksums(capture)
    assert {source for source, _ in seen} == {"2001:db8::1", "2001:db8::2"}, seen[:5]
    assert all(int(checksum, 16) != 0 for _, checksum in seen), seen
    # Without a checksum: dropped by both (the kernel's device, our socket); with one,
    # the same datagram arrives (the test can fail).
    mac6 = json.loads(ip(nodes[1], "-j", "link", "show", "flannel-v6.1"))[0]["address"]
    ours = status.query(started[0].socket)["vtep_mac6"]
    for sender, bind, to, mac, sink_ns, src, dst in (
        (nodes[0], "2001:db8::1", "2001:db8::2", mac6, pods[1], addresses[0][1], addresses[1][1]),
        (nodes[1], "2001:db8::2", "2001:db8::1", ours, pods[0], addresses[1][1], addresses[0][1]),
    ):
        frame = vxlan_codec.prefix(
            1, vxlan_codec.parse_mac(mac), bytes(6), vxlan_codec.ETHERTYPE_IPV6
        ) + inner_udp6(src, dst, b"zero-checksum probe")
        assert not delivered(sender, bind, to, frame, sink_ns, dst, zero=True), to
        assert delivered(sender, bind, to, frame, sink_ns, dst, zero=False), to


# A fake peer on [2001:db8::2]:8472: sends each hex datagram of argv[1] (comma-separated)
# to our node, then prints (hex) the first datagram that comes back within 2 s, or "none".
FAKE_PEER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("2001:db8::2", 8472))
for frame in sys.argv[1].split(","):
    s.sendto(bytes.fromhex(frame), ("2001:db8::1", 8472))
s.settimeout(2)
try:
    print(s.recv(2048).hex(), flush=True)
except TimeoutError:
    print("none", flush=True)
"""


def hostile_frames(src: bytes, dst: bytes) -> dict[str, bytes]:
    """Inner IPv6 packets that must not reach the TUN, by the reason they are counted
    under; ``src`` inside the fake peer's subnet, ``dst`` inside ours."""
    from encap import ipv6 as codec

    good = codec.build_packet(src, dst, 59, b"", 64)  # no next header, no payload

    def ext(next_header: int, chain: list[int], tail: bytes = b"") -> bytes:
        """A chain of 8-byte extension headers of the kinds in ``chain``."""
        body = b""
        for i, kind in enumerate(chain):
            follows = chain[i + 1] if i + 1 < len(chain) else next_header
            body += bytes((follows, 0)) + bytes(6) if kind != 44 else bytes((follows, 0)) + bytes(6)
        return codec.build_packet(src, dst, chain[0], body + tail, 64)

    jumbo = bytearray(codec.build_packet(src, dst, 0, bytes((59, 0)) + bytes(6), 64))
    jumbo[4:6] = b"\0\0"
    bad_tcp = bytearray(codec.build_packet(src, dst, 6, bytes(20), 64))
    bad_tcp[40 + 12] = 0x50
    bad_tcp[40 + 16 : 40 + 18] = b"\x12\x34"
    zero_udp = codec.build_packet(src, dst, 17, bytes((0, 1, 0, 2, 0, 8, 0, 0)), 64)
    return {
        "rx_ipv6_truncated": good[:39],
        "rx_ipv6_bad_version": bytes((0x40,)) + good[1:],
        "rx_ipv6_jumbo": bytes(jumbo),
        "rx_ipv6_bad_length": good + b"\0\0\0\0",
        "rx_ipv6_ext_chain_too_long": ext(59, [60] * 9),
        "rx_ipv6_bad_ext_header": codec.build_packet(src, dst, 60, bytes((59, 4)) + bytes(6), 64),
        "rx_ipv6_bad_next_header": ext(255, [60]),
        "rx_bad_l4_checksum": bytes(bad_tcp),
        "rx_foreign_source": codec.build_packet(dst, dst, 59, b"", 64),
        "rx_not_our_subnet": codec.build_packet(src, src, 59, b"", 64),
    } | {"rx_bad_l4_checksum_udp": zero_udp}


def neighbor_solicitation(src: bytes, target: bytes) -> bytes:
    """An NS for ``target`` from ``src`` (RFC 4861 7.1.1), its checksum right."""
    from encap import ipv6 as codec
    from encap.checksum import internet_checksum

    dst = bytes.fromhex("ff0200000000000000000001ff") + target[13:]
    message = bytearray((135, 0, 0, 0, 0, 0, 0, 0)) + target + bytes((1, 1)) + bytes(6)
    pseudo = src + dst + len(message).to_bytes(4, "big") + bytes((0, 0, 0, 58))
    message[2:4] = internet_checksum(pseudo + message).to_bytes(2, "big")
    return codec.build_packet(src, dst, 58, bytes(message), 255)


# As nobody, tries to bind [argv[1]]:8472 and [::]:8472 with each combination of
# SO_REUSEADDR and SO_REUSEPORT; prints what happened to each.
BIND6_AS_NOBODY = """
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
for options in ([], [socket.SO_REUSEADDR], [socket.SO_REUSEPORT],
                [socket.SO_REUSEADDR, socket.SO_REUSEPORT]):
    for host in (sys.argv[1], "::"):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        for option in options:
            s.setsockopt(socket.SOL_SOCKET, option, 1)
        try:
            s.bind((host, 8472))
            print(host, options, "BOUND")
        except OSError as e:
            print(host, options, "errno", e.errno)
        s.close()
"""


def test_userspace_vxlan_ipv6_answers_solicitations_and_counts_hostile_input(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    """Node 2 is a fake peer (a lease written by hand, a socket on its 8472): a neighbour
    solicitation for our IPv6 VTEP address gets an advertisement with our IPv6 VTEP MAC;
    hostile inner IPv6 (truncated, wrong version, jumbo, length beyond the frame, an
    extension-header chain too long or running past the end, a reserved next header,
    corrupt and missing L4 checksums, foreign addresses) is dropped and counted by
    reason, the daemon runs on, and a good packet after them is delivered."""
    from ipaddress import IPv6Address

    nodes = [netns("n1"), netns("n2")]
    underlay(nodes)
    registry = seed(tmp_path, {**DUAL, "Backend": {"Type": "vxlan"}})
    value = (
        '{"PublicIP":"192.0.2.2","PublicIPv6":"2001:db8::2","BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:02:04"},'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:02:06"}}'
    )
    FileRegistry(registry).put_sync(
        f"{SUBNETS}198.18.77.0-24&fd00:10:0:77::-64", value.encode(), 3600
    )
    work = tmp_path / "n1"
    work.mkdir()
    ours = daemons(nodes[0], work, "--registry-file", str(registry), "--iface", "eth0", lo=False)
    ours.wait_event("started")
    env = parse_subnet_env(ours.subnet_file.read_text())
    assert env.ipv6_subnet is not None
    pod_ns = netns("p1")
    _, pod6 = pod(nodes[0], pod_ns, env)
    # The IPv6 socket is exclusive to the daemon, as the IPv4 one (test_hardening.py).
    attempts = in_ns(nodes[0], "python3", "-c", BIND6_AS_NOBODY, "2001:db8::1").stdout
    assert len(attempts.splitlines()) == 8, attempts
    assert all(line.endswith("errno 98") for line in attempts.splitlines()), attempts
    our_mac6 = vxlan_codec.parse_mac(status.query(ours.socket)["vtep_mac6"])
    vtep6 = env.ipv6_subnet.network.network_address.packed
    peer_src = IPv6Address("fd00:10:0:77::5").packed

    def to_us(packet: bytes, mac: bytes = our_mac6) -> bytes:
        return vxlan_codec.prefix(1, mac, bytes.fromhex("0e0000000206"), 0x86DD) + packet

    def exchange(*frames: bytes) -> str:
        joined = ",".join(frame.hex() for frame in frames)
        return in_ns(nodes[1], "python3", "-c", FAKE_PEER, joined).stdout.strip()

    # A solicitation to the solicited-node group (multicast MAC), as the kernel sends it.
    solicitation = neighbor_solicitation(peer_src, vtep6)
    reply = bytes.fromhex(exchange(to_us(solicitation, b"\x33\x33\xff" + vtep6[13:])))
    assert reply[8:14] == bytes.fromhex("0e0000000206") and reply[14:20] == our_mac6
    assert reply[20:22] == b"\x86\xdd"
    advert = reply[22:]
    assert advert[6] == 58 and advert[7] == 255 and advert[24:40] == peer_src
    assert advert[40] == 136 and advert[48:64] == vtep6 and advert[64:72] == b"\x02\x01" + our_mac6
    assert status.query(ours.socket)["ndp_replies"] == 1
    # Hostile input, one datagram per reason; then a good packet still arrives.
    frames = hostile_frames(peer_src, IPv6Address(pod6).packed)
    before = status.query(ours.socket)["counters"]["drops"]
    exchange(*(to_us(frame) for frame in frames.values()))
    expected: dict[str, int] = {}
    for reason in frames:
        key = reason.removesuffix("_udp")
        expected[key] = expected.get(key, 0) + 1

    def counted() -> bool:
        drops = status.query(ours.socket)["counters"]["drops"]
        return all(drops.get(k, 0) - before.get(k, 0) == n for k, n in expected.items())

    assert poll(counted, timeout=5), (expected, status.query(ours.socket)["counters"]["drops"])
    assert ours.proc.poll() is None
    probe = inner_udp6("fd00:10:0:77::5", pod6, b"still forwarding")
    with serving(pod_ns, UDP_SINK, pod6) as line:
        exchange(to_us(probe))
        assert line() == b"still forwarding".hex()
