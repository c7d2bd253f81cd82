"""The host-gw backend end to end on a 3-node namespace testbed: plain kernel routes via
each peer's underlay IP, no encapsulation, no TUN."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay.lab.testbed import Testbed
from overlay.lab.transfer import transfer, udp_transfer
from tests.helpers.polling import poll
from tests.helpers.segments import snmp
from tests.helpers.testbed import node_status

pytestmark = pytest.mark.netns
SUBNETS = "/coreos.com/network/subnets"
NODES = (1, 2, 3)
FAKE_IP = "192.0.2.77"  # on the underlay segment, no node has it
FAR_IP = "192.0.2.201"  # made "behind a router" for n1 only, see the last test


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    tb = Testbed("h" + uuid.uuid4().hex[:7], nodes=3, pods_per_node=1, backend="host-gw")
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def _subnet(bed: Testbed, i: int) -> str:
    return str(next(n for n in bed.status()["nodes"] if n["name"] == f"n{i}")["subnet"])


def _routes(bed: Testbed, i: int, dst: str | None = None) -> list[dict[str, Any]]:
    argv = ["ip", "-j", "route", "show", *([dst] if dst else [])]
    out = bed.exec(f"n{i}", argv, capture_output=True, text=True, check=True).stdout
    return list(json.loads(out or "[]"))


def _has_route(bed: Testbed, i: int, subnet: str, via: str) -> bool:
    return any(
        r.get("dst") == subnet and r.get("gateway") == via and r.get("dev") == "eth0"
        for r in _routes(bed, i, subnet)
    )


def _ping(bed: Testbed, src: str, dst_ip: str, count: int = 3) -> None:
    result = bed.exec(
        src,
        ["ping", "-c", str(count), "-i", "0.2", "-W", "2", dst_ip],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, f"{src} -> {dst_ip}: {result.stdout}{result.stderr}"
    assert " 0% packet loss" in result.stdout, result.stdout


def _free_subnet(bed: Testbed, start: int) -> str:
    owned = {_subnet(bed, i) for i in NODES}
    return next(f"198.18.{i}.0/24" for i in range(start, 0, -1) if f"198.18.{i}.0/24" not in owned)


def _key(subnet: str) -> str:
    return f"{SUBNETS}/{subnet.replace('/', '-')}"


def _put_hostgw_lease(bed: Testbed, subnet: str, public_ip: str) -> None:
    value = {"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "host-gw"}
    bed.etcd.etcdctl("put", _key(subnet), json.dumps(value, separators=(",", ":")))


def _skipped(bed: Testbed, i: int, subnet: str) -> list[dict[str, Any]]:
    found = []
    for line in bed.log_file(i).read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "peer_skipped" and entry.get("subnet") == subnet:
            found.append(entry)
    return found


def test_leases_are_host_gw(bed: Testbed) -> None:
    out = bed.etcd.etcdctl("get", "--prefix", SUBNETS, "--print-value-only").stdout.split()
    leases = [json.loads(v) for v in out]
    assert sorted(x["PublicIP"] for x in leases) == [str(bed.node_ip(i)) for i in NODES]
    assert all(x["BackendType"] == "host-gw" and "BackendData" not in x for x in leases)
    for i in NODES:
        assert node_status(bed, i)["mtu"] == 1500  # no encapsulation overhead


def test_every_node_routes_every_other_subnet_via_its_underlay_ip(bed: Testbed) -> None:
    for here in NODES:
        for there in NODES:
            if there == here:
                continue
            subnet, via = _subnet(bed, there), str(bed.node_ip(there))
            assert poll(lambda here=here, s=subnet, v=via: _has_route(bed, here, s, v)), (
                here,
                _routes(bed, here),
            )
        st = node_status(bed, here)
        assert sorted(st["programmed"]) == sorted(_subnet(bed, i) for i in NODES if i != here)
        assert st["netlink_errors"] == 0


def test_no_tun_and_no_vxlan_device(bed: Testbed) -> None:
    for i in NODES:
        links = json.loads(
            bed.exec(
                f"n{i}", ["ip", "-j", "-d", "link"], capture_output=True, text=True, check=True
            ).stdout
        )
        kinds = {link.get("linkinfo", {}).get("info_kind") for link in links}
        assert not kinds & {"tun", "vxlan"}, (i, kinds)
        assert "tun" not in node_status(bed, i)
        # Nothing for the whole network through a device of ours: only per-peer routes.
        assert not any(r.get("dst") == "198.18.0.0/16" for r in _routes(bed, i))


def test_status_has_the_underlay_links_counters(bed: Testbed) -> None:
    """host-gw has no device of its own: status and metrics show eth0's statistics,
    labelled as such, and no overlay totals or per-peer counts pretending to be zero."""
    from overlay.observe import metrics

    st = node_status(bed, 1)
    assert st["kernel_counters"]["device"] == "eth0"
    assert st["kernel_counters"]["rx_packets"] > 0
    text = metrics.render(st).decode()
    assert 'overlay_kernel_link_transmit_packets_total{device="eth0"}' in text
    assert "overlay_sent_packets_total" not in text
    assert "overlay_peer_sent_packets_total" not in text


def test_pods_ping_across_without_encapsulation(bed: Testbed) -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.utils import rdpcap

    pcap = Path(f"/tmp/{bed.prefix}-hostgw.pcap")
    p1, p2, p3 = (bed.pod_ip(f"n{i}-p1") for i in NODES)
    cap = bed.popen(
        "n1",
        ["tcpdump", "-i", "eth0", "-U", "-n", "-c", "4", "-w", str(pcap), "ip"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cap.stderr is not None
        assert "listening on" in cap.stderr.readline()
        _ping(bed, "n1-p1", p2, count=2)
        cap.wait(10)
        packets = rdpcap(str(pcap))
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
        pcap.unlink(missing_ok=True)
    # On the wire between the nodes: the pods' own ICMP, not wrapped in anything.
    assert len(packets) == 4
    assert all(ICMP in p for p in packets), [p.summary() for p in packets]
    assert {(p[IP].src, p[IP].dst) for p in packets} == {(p1, p2), (p2, p1)}
    for a, b in (("n1-p1", p3), ("n3-p1", p1), ("n2-p1", p3), ("n3-p1", p2)):
        _ping(bed, a, b)


def test_tcp_and_udp_between_host_gw_nodes_with_default_offloads(bed: Testbed) -> None:
    """No encapsulation and no userspace on the way: the kernel's own checksum offload
    across the veths, both ways, with the nodes' eth0 as the testbed leaves it (default
    offloads)."""
    features = bed.exec("n1", ["ethtool", "-k", "eth0"], capture_output=True, text=True)
    assert "tx-checksumming: on" in features.stdout
    transfer(bed, "n1-p1", "n2-p1", 20 * 1024 * 1024, 5211)
    transfer(bed, "n2-p1", "n1-p1", 20 * 1024 * 1024, 5212)
    before = snmp(bed, "n2-p1")
    intact, damaged = udp_transfer(bed, "n1-p1", "n2-p1", 5000, 1400, 5413)
    assert damaged == 0 and intact >= 5000 * 0.98, (intact, damaged)
    assert snmp(bed, "n2-p1")["Udp.InCsumErrors"] == before["Udp.InCsumErrors"]


def test_routes_follow_leases(bed: Testbed) -> None:
    fake = _free_subnet(bed, 250)
    try:
        _put_hostgw_lease(bed, fake, FAKE_IP)
        for i in NODES:
            assert poll(lambda i=i: _has_route(bed, i, fake, FAKE_IP)), (i, _routes(bed, i))
            assert fake in node_status(bed, i)["programmed"]
    finally:
        bed.etcd.etcdctl("del", _key(fake))
    for i in NODES:
        assert poll(lambda i=i: not _routes(bed, i, fake)), (i, _routes(bed, i))
        assert fake not in node_status(bed, i)["programmed"]
    # The real peers' routes are untouched.
    test_every_node_routes_every_other_subnet_via_its_underlay_ip(bed)


def test_peer_behind_a_router_gets_no_route(bed: Testbed) -> None:
    """flanneld's test: a peer is on our segment when the kernel's route to its PublicIP
    has no gateway. To stay inside the underlay 192.0.2.0/24, n1 (only) is told that
    192.0.2.200/29 is behind the router n3, which is exactly how a peer on another L2
    segment looks to it; n2 and n3 still see 192.0.2.201 on the segment."""
    far = _free_subnet(bed, 240)
    n3 = str(bed.node_ip(3))
    bed.exec("n1", ["ip", "route", "add", "192.0.2.200/29", "via", n3, "dev", "eth0"], check=True)
    try:
        _put_hostgw_lease(bed, far, FAR_IP)
        for i in (2, 3):
            assert poll(lambda i=i: _has_route(bed, i, far, FAR_IP)), (i, _routes(bed, i))
        assert poll(lambda: len(_skipped(bed, 1, far)) == 1), _skipped(bed, 1, far)
        assert _skipped(bed, 1, far)[0]["public_ip"] == FAR_IP
        assert not _routes(bed, 1, far)
        assert far not in node_status(bed, 1)["programmed"]
        assert node_status(bed, 1)["netlink_errors"] == 0
    finally:
        bed.etcd.etcdctl("del", _key(far))
        bed.exec("n1", ["ip", "route", "del", "192.0.2.200/29"], check=False)
    for i in (2, 3):
        assert poll(lambda i=i: not _routes(bed, i, far)), (i, _routes(bed, i))
    _ping(bed, "n1-p1", bed.pod_ip("n3-p1"))
