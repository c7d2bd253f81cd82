"""The testbed's IPv6 and dual-stack beds (``ip-family``), end to end.

- ``examples/dual-stack.yaml``: three nodes with every datapath mixed (a userspace vxlan
  and a kernel vxlan node on segment a, DirectRouting's plain routes between them; a
  userspace vxlan node on segment b behind the router, VXLAN both ways): every pod pair
  pings and moves 100 MB over TCP, SHA-256 checked, over IPv4 and over IPv6, both ways.
- ``--ip-family ipv6`` (EnableIPv4 false): an underlay with IPv6 alone, etcd on it, kernel
  and userspace vxlan nodes: every pod pair pings and moves data both ways.
"""

from __future__ import annotations

import itertools
import uuid

import pytest

from overlay.lab.testbed import Testbed
from overlay.lab.topology import load_topology
from overlay.lab.transfer import transfer
from tests.helpers.paths import ROOT
from tests.helpers.polling import poll

pytestmark = pytest.mark.netns

TRANSFER_BYTES = 100 * 1000 * 1000


def reaches(bed: Testbed, source: str, target: str, version: int) -> bool:
    address = bed.pod_ip(target, version)
    proc = bed.exec(source, ["ping", "-c", "1", "-W", "1", address], capture_output=True)
    return proc.returncode == 0


def every_pair_pings(bed: Testbed, pods: list[str], versions: tuple[int, ...]) -> None:
    pairs = [(a, b, v) for a, b in itertools.permutations(pods, 2) for v in versions]
    unreached = [
        (a, b, v) for a, b, v in pairs if not poll(lambda a=a, b=b, v=v: reaches(bed, a, b, v), 10)
    ]
    assert unreached == [], f"{len(unreached)} of {len(pairs)} (pod, pod, IP version) unreached"


def test_dual_stack_file_mixed_datapaths_100mb_every_pair_both_families() -> None:
    example = ROOT / "examples" / "dual-stack.yaml"
    topology = load_topology(example.read_text(), example.name)
    with Testbed.from_topology(topology, "t" + uuid.uuid4().hex[:6]) as bed:
        bed.up()
        status = bed.status()
        assert [n["backend"] for n in status["nodes"]] == [
            "vxlan-user",
            "vxlan-kernel",
            "vxlan-user",
        ]
        assert status["ip_family"] == "dual" and status["network6"] == "fd00:10::/48"
        for node in status["nodes"]:
            assert node["underlay_ip"].startswith("192.0.2.")
            assert node["underlay_ip6"].startswith("2001:db8:")
            assert len(node["subnets"]) == 2 and node["subnets"][1].startswith("fd00:10:")
        pods = [p["name"] for p in status["pods"]]
        for pod in status["pods"]:  # both addresses, from the CNI's dual-stack delegation
            assert [":" in ip for ip in pod["ips"]] == [False, True], pod
        every_pair_pings(bed, pods, (4, 6))
        # Plain routes between n1 and n2 (DirectRouting, same segment), VXLAN to n3.
        n2 = bed.plan.node(2)
        routes6 = bed.exec("n1", ["ip", "-6", "route"], capture_output=True, text=True).stdout
        assert f"via {n2.address6} dev eth0" in routes6, routes6
        for version in (4, 6):
            for port, (a, b) in enumerate(itertools.permutations(pods, 2), 5201):
                transfer(bed, a, b, TRANSFER_BYTES, port=port, timeout=60, version=version)


def test_ipv6_only_quick_bed_with_etcd_over_ipv6() -> None:
    with Testbed(
        "t" + uuid.uuid4().hex[:6],
        nodes=3,
        pods_per_node=1,
        backend="vxlan",
        kernel_nodes=(2,),
        ip_family="ipv6",
    ) as bed:
        bed.up()
        status = bed.status()
        assert status["network"] is None and status["etcd_endpoints"][0].startswith("http://[")
        assert status["underlay"] == "2001:db8::/64" and status["network6"] == "fd00:10::/48"
        for node in status["nodes"]:
            assert node["underlay_ip"] is None and node["subnets"] == [node["subnet"]]
            assert node["subnet"].startswith("fd00:10:")
        # No IPv4 anywhere on the nodes' eth0 (IPv6-only underlay).
        shown = bed.exec("n1", ["ip", "-4", "addr", "show", "eth0"], capture_output=True, text=True)
        assert shown.stdout == ""
        pods = [p["name"] for p in status["pods"]]
        every_pair_pings(bed, pods, (6,))
        for port, (a, b) in enumerate(itertools.permutations(pods, 2), 5301):
            transfer(bed, a, b, 10 * 1000 * 1000, port=port, timeout=60, version=6)
