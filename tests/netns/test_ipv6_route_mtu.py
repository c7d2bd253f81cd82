"""The IPv6 route MTU of userspace vxlan: vxlan over an IPv6 underlay costs 20 bytes more
than over IPv4, so the TUN's route for IPv6Network carries the IPv6 half's MTU (the
TUN's less 20, flannel-v6.<VNI>'s underlay - 70). The kernel sizes a node's IPv6 TCP
segments to it from the first one: the first IPv6 transfer through the overlay meets no
packet-too-big, neither from our dataplane nor from the kernel."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from overlay.lab.testbed import Testbed
from overlay.lab.transfer import transfer
from tests.helpers.polling import poll
from tests.helpers.testbed import node_status

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    tb = Testbed("m6" + uuid.uuid4().hex[:6], nodes=2, pods_per_node=1, backend="vxlan",
                 ip_family="dual")  # fmt: skip
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def snmp6(bed: Testbed, node: str, name: str) -> int:
    """One counter of the node's /proc/net/snmp6 (its namespace's IPv6 stack)."""
    text = bed.exec(node, ["cat", "/proc/net/snmp6"], capture_output=True, text=True).stdout
    return int(dict(line.split() for line in text.splitlines())[name])


def too_big(bed: Testbed, node: str) -> tuple[int, int, int, int]:
    """Packet-too-big as the node saw it: received and sent by its kernel, and refused
    (and answered) by our dataplane."""
    counters = node_status(bed, node)["counters"]
    return (
        snmp6(bed, node, "Icmp6InPktTooBigs"),
        snmp6(bed, node, "Icmp6OutPktTooBigs"),
        counters["drops6"].get("tx_too_big", 0),
        counters["icmp_frag_needed_sent"],
    )


def test_the_tun_route_for_the_ipv6_network_has_the_ipv6_halfs_mtu(bed: Testbed) -> None:
    for node in ("n1", "n2"):
        link = bed.exec(node, ["ip", "-j", "link", "show", "flannel0"], capture_output=True)
        tun_mtu = json.loads(link.stdout)[0]["mtu"]
        routes = bed.exec(node, ["ip", "-j", "-6", "route", "show", "dev", "flannel0"],
                          capture_output=True)  # fmt: skip
        network = [r for r in json.loads(routes.stdout) if r["dst"] == bed.status()["network6"]]
        assert [r.get("metrics") for r in network] == [[{"mtu": tun_mtu - 20}]], network
        assert node_status(bed, node)["mtu"] == tun_mtu  # IPv4 keeps the TUN's


@pytest.mark.parametrize(("client", "server"), [("n1", "n2-p1"), ("n2", "n1-p1")])
def test_the_first_ipv6_tcp_transfer_meets_no_packet_too_big(
    bed: Testbed, client: str, server: str
) -> None:
    bed.exec(client, ["ip", "-6", "route", "flush", "cache"], check=True)  # no learnt PMTU
    before = too_big(bed, client)
    transfer(bed, client, server, 8 * 1024 * 1024, port=5311, version=6)
    assert too_big(bed, client) == before, "(kernel in, kernel out, dataplane, answered)"


def route_mtu(bed: Testbed, node: str) -> int | None:
    routes = bed.exec(node, ["ip", "-j", "-6", "route", "show", "dev", "flannel0"],
                      capture_output=True)  # fmt: skip
    network = bed.status()["network6"]
    metrics = [r.get("metrics") for r in json.loads(routes.stdout) if r["dst"] == network]
    return metrics[0][0]["mtu"] if metrics and metrics[0] else None


def test_the_route_mtu_follows_the_underlays(bed: Testbed) -> None:
    """n1's eth0 lowered to 1400 and raised back: the route follows (1400 - 70)."""
    link = bed.exec("n1", ["ip", "-j", "link", "show", "eth0"], capture_output=True)
    underlay = json.loads(link.stdout)[0]["mtu"]
    try:
        bed.exec("n1", ["ip", "link", "set", "eth0", "mtu", "1400"], check=True)
        assert poll(lambda: route_mtu(bed, "n1") == 1330, timeout=15), route_mtu(bed, "n1")
    finally:
        bed.exec("n1", ["ip", "link", "set", "eth0", "mtu", str(underlay)], check=True)
    assert poll(lambda: route_mtu(bed, "n1") == underlay - 70, timeout=15)
