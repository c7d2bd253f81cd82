"""vxlan's IPv6 half in the native drains (issue 20): ``Drains.tx`` sends the TUN's IPv6
packets itself and ``Drains.rx6`` is the IPv6 socket's reader, each equal to the Python
reference (``Ipv6Path``) on real sockets: every byte on the wire and into the TUN, every
count, drop and status field. Hypothesis draws the traffic; a few cases are spelled out
(no route, beyond the MTU, a neighbour solicitation: the rare events the drains hand to
the reference)."""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import (
    ICMPv6ND_NS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)

from encap import ipv6, native, vxlan
from overlay.dataplane.vxlan import VxlanDataplane
from tests.overlay.dataplane.test_ipv6 import (
    MAC,
    MTU,
    OWN6,
    PEER_MAC,
    Pair,
    pair,
    peer_segments,
    tcp6,
)

__all__ = ["pair"]  # the fixture, imported for the tests below

OWN = IPv4Network("198.18.1.0/24")
GSO_TCPV6 = struct.pack("=BBHHHH", 1, 4, 60, 1370, 40, 16)  # NEEDS_CSUM, GSO_TCPV6
UDP_PARTIAL = struct.pack("=BBHHHH", 1, 0, 0, 0, 40, 6)  # NEEDS_CSUM at the UDP checksum

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="needs encap._native")


@dataclass
class Node:
    """A vxlan dataplane with its IPv6 half on a Pair's sockets."""

    pair: Pair
    plane: VxlanDataplane
    ipv4: socket.socket

    def tx(self, native_drains: bool) -> None:
        if native_drains:
            self.plane._native_drains().tx()
        else:
            self.plane.on_tun_readable()

    def rx(self, native_drains: bool) -> None:
        select.select([self.pair.ours], [], [], 1)
        if native_drains:
            self.plane._native_drains().rx6()
        else:
            self.pair.path.on_socket_readable(self.plane.mtu)

    def outcome(self) -> dict[str, Any]:
        """Everything observable: counts, drops, status, peers' stats."""
        drains = self.plane._drains
        if drains is not None:
            drains.flush()
        counters = self.pair.path.counters
        stats = self.pair.path.peers.by_public_ipv6("::1")
        assert stats is not None
        return {
            "counts": {
                name: getattr(counters, name)
                for name in (
                    "tx_packets tx_bytes tx_packets6 tx_bytes6 rx_packets rx_bytes rx_packets6"
                    " rx_bytes6 tx_gso_sends tx_tun_super_packets rx_gro_receives"
                    " rx_tun_super_packets icmp_unreachable_sent icmp_frag_needed_sent"
                ).split()
            },
            "drops": dict(counters.drops),
            "drops6": dict(counters.drops6),
            "status": self.pair.path.status(),
            "peer": (
                stats.stats.tx_packets,
                stats.stats.tx_bytes,
                stats.stats.rx_packets,
                stats.stats.rx_bytes,
            ),
        }

    def close(self) -> None:
        self.ipv4.close()


@pytest.fixture
def node(pair: Callable[[bool], Pair]) -> Iterator[Callable[[bool], Node]]:
    made: list[Node] = []

    def make(native_drains: bool) -> Node:
        p = pair(True)
        ipv4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        plane = VxlanDataplane(
            p.tun,  # type: ignore[arg-type]
            ipv4,
            p.path.peers,
            OWN,
            p.path.counters,
            vni=1,
            mac=MAC,
            vtep_ip=OWN.network_address.packed,
            port=8472,
            mtu=MTU,
        )
        plane.native = native_drains
        plane.attach_ipv6(p.path)
        made.append(Node(p, plane, ipv4))
        return made[-1]

    yield make
    for n in made:
        n.close()


def counting(handed: list[str], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, each call noted in ``handed`` as ``name``."""

    def counted(*args: Any) -> Any:
        handed.append(name)
        return method(*args)

    return counted


def both(node: Callable[[bool], Node], run: Callable[[Node, bool], Any]) -> list[str]:
    """``run`` on a reference node and a native one: the same result, the same counts.
    What the native one handed to the reference (``Ipv6Path.send``, ``_receive_run``)."""
    outcomes = []
    handed: list[str] = []
    for native_drains in (False, True):
        n = node(native_drains)
        path = n.pair.path
        if native_drains:  # instance attributes: this node's path only
            path.send = counting(handed, "send", path.send)  # type: ignore[method-assign]
            path._receive_run = counting(handed, "receive", path._receive_run)  # type: ignore[method-assign]
        outcomes.append((run(n, native_drains), n.outcome()))
    assert outcomes[1] == outcomes[0]
    return handed


def sent(n: Node) -> list[tuple[bytes, int]]:
    return n.pair.received()


def frames(packets: list[tuple[bytes, bytes]]) -> Callable[[Node, bool], Any]:
    """Inject (vnet header, packet) into the TUN, run the send drain: what the peer got,
    and what went back into the TUN (ICMPv6 errors)."""

    def run(n: Node, native_drains: bool) -> Any:
        for vnet, packet in packets:
            n.pair.tun.inject(packet, vnet)
        n.tx(native_drains)
        return sent(n), n.pair.tun.raw_written()

    return run


def datagrams(groups: list[list[bytes]]) -> Callable[[Node, bool], Any]:
    """The peer sends each group (one GSO send when it has more than one datagram of one
    size), the receive drain runs: every TUN write, as written."""

    def run(n: Node, native_drains: bool) -> Any:
        to = n.pair.ours.getsockname()[:2]
        for group in groups:
            if len(group) > 1:
                size = len(group[0])
                n.pair.peer.sendmsg([b"".join(group)], [(17, 103, struct.pack("=H", size))], 0, to)
            else:
                n.pair.peer.sendto(group[0], to)
        n.rx(native_drains)
        return n.pair.tun.raw_written(), sent(n)

    return run


def super_packet(payload: bytes, seq: int = 1000) -> tuple[bytes, bytes]:
    packet = bytearray(bytes(tcp6(payload, seq=seq)))
    packet[56:58] = b"\x12\x34"  # the kernel's partial sum
    return GSO_TCPV6, bytes(packet)


@pytest.mark.underlay
def test_tx_super_packets_acks_and_rare_events_as_the_reference(node: Any) -> None:
    """Super-packets cut and sent in GSO groups, ACKs and UDP with partial checksums, a
    packet without a route (ICMPv6 unreachable), one beyond the MTU (packet too big), a
    super-packet the cut refuses: the same datagrams, replies and counts."""
    udp = bytes(IPv6(src="fd00:10:0:1::5", dst="fd00:10:0:2::9", nh=17, plen=12)) + bytes(
        struct.pack("!HHHH", 1, 2, 12, 0x4321) + b"abcd"
    )
    no_route = bytes(tcp6(b"n" * 10))[:24] + bytes.fromhex("fd00000a000000990000000000000009")
    no_route += bytes(tcp6(b"n" * 10))[40:]
    packets = [
        super_packet(bytes(range(256)) * 120),
        (bytes(10), bytes(tcp6(b"", "A"))),
        (UDP_PARTIAL, udp),
        (bytes(10), no_route),
        (bytes(10), bytes(tcp6(b"b" * 1500))),  # beyond the MTU (1430 for IPv6)
        (GSO_TCPV6, bytes(tcp6(b"short"))),  # a cut it refuses: gso_bad_size
        super_packet(b"z" * 65000),  # two GSO sends: 65000 bytes at most in one
    ]
    # only the rare ones went to the reference: no route, beyond the MTU
    assert both(node, frames(packets)) == ["send", "send"]


@pytest.mark.underlay
def test_rx_gro_receives_singles_and_ndp_as_the_reference(node: Any) -> None:
    """A GSO send of segments (one corrupt), single datagrams, a neighbour solicitation
    for our VTEP address (answered through the reference), one for another address,
    junk: the same TUN writes, advertisements, counts and drops."""
    ns = bytes(
        IPv6(src="fd00:10:0:2::", dst="ff02::1:ff00:0", hlim=255)
        / ICMPv6ND_NS(tgt="fd00:10:0:1::")
        / ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:00:02")
    )
    other = bytes(
        IPv6(src="fd00:10:0:2::", dst="ff02::1:ff00:7", hlim=255)
        / ICMPv6ND_NS(tgt="fd00:10:0:1::7")
    )
    solicited = ipv6.solicited_node_mac(OWN6.network_address.packed)
    to_solicited = vxlan.prefix(1, solicited, PEER_MAC, vxlan.ETHERTYPE_IPV6)
    groups = [
        peer_segments(bytes(range(251)) * 109, corrupt=3),
        [peer_segments(b"s" * 1000)[0]],
        [to_solicited + ns],
        [to_solicited + other],
        [b"\x08" + bytes(30)],
        [b""],
    ]
    assert both(node, datagrams(groups)) == []  # the solicitations: _native_ndp


segment_payloads = st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=4)


@pytest.mark.underlay
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payloads=segment_payloads,
    corrupt=st.lists(st.integers(0, 60), max_size=3),
    flip=st.integers(0, 2000),
)
def test_tx_and_rx_equal_the_reference_on_drawn_traffic(
    node: Any, payloads: list[bytes], corrupt: list[int], flip: int
) -> None:
    """Drawn super-packets and plain packets out; drawn GRO receives with corrupt
    datagrams (a flipped byte) in: the native drains and the reference agree."""
    packets = []
    seq = 1000
    for payload in payloads:
        if len(payload) > 1370:
            packets.append(super_packet(payload, seq))
        else:
            packets.append((bytes(10), bytes(tcp6(payload, seq=seq))))
        seq += len(payload)
    both(node, frames(packets))
    group = peer_segments(b"".join(payloads) or b"e")
    for i in corrupt:
        if i < len(group):
            d = bytearray(group[i])
            d[flip % len(d)] ^= 0x20
            group[i] = bytes(d)
    both(node, datagrams([group]))


def acks(count: int, first_seq: int = 1000, payload: bytes = b"") -> list[tuple[bytes, bytes]]:
    """``count`` TCP packets of one size (pure ACKs by default), as the TUN gives them."""
    return [(bytes(10), bytes(tcp6(payload, "A", seq=first_seq + i))) for i in range(count)]


@pytest.mark.underlay
@pytest.mark.parametrize("native_drains", [False, True])
def test_small_packets_of_one_size_to_one_peer_leave_in_one_gso_send(
    node: Any, native_drains: bool
) -> None:
    """Five ACKs read in one drain: one sendmsg with UDP_SEGMENT (the peer's GRO socket
    gets them as one receive of five datagrams), as the IPv4 drains send theirs."""
    n = node(native_drains)
    packets = acks(5)
    for vnet, packet in packets:
        n.pair.tun.inject(packet, vnet)
    n.tx(native_drains)
    prefix = vxlan.prefix(1, PEER_MAC, MAC, vxlan.ETHERTYPE_IPV6)
    datagrams_sent = [prefix + packet for _, packet in packets]
    assert sent(n) == [(b"".join(datagrams_sent), len(datagrams_sent[0]))]
    outcome = n.outcome()
    assert outcome["status"]["ipv6_tx_gso_sends"] == 1
    assert outcome["counts"]["tx_packets6"] == 5


@pytest.mark.underlay
def test_tx_groups_end_where_the_reference_ends_them(node: Any) -> None:
    """Groups of small packets broken by a shorter one, another size, a packet without a
    route (answered by the reference), a super-packet (sent after what came before it)
    and the 64-datagram limit: the same receives, segment sizes and counts."""
    no_route = bytes(tcp6(b""))[:24] + bytes.fromhex("fd00000a000000990000000000000009")
    no_route += bytes(tcp6(b"", "A"))[40:]
    packets = [
        *acks(3),
        (bytes(10), bytes(tcp6(b"xy", "PA"))),  # longer: a group of its own
        *acks(2, 2000),
        (bytes(10), no_route),
        *acks(2, 3000),
        super_packet(bytes(range(256)) * 20, 5000),
        *acks(70, 6000),
        *acks(3, 9000, b"p" * 100),
    ]
    # only the packet without a route went to the reference
    assert both(node, frames(packets)) == ["send"]


@pytest.mark.underlay
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sizes=st.lists(st.sampled_from([0, 0, 0, 7, 100, 1300, 3000]), min_size=1, max_size=40))
def test_tx_drawn_small_packets_and_super_packets_equal_the_reference(
    node: Any, sizes: list[int]
) -> None:
    """Drawn runs of ACKs and small packets (a few sizes, so groups form and break) mixed
    with super-packets: the native drains group and send as the reference does."""
    packets = []
    seq = 1000
    for size in sizes:
        if size > 1370:
            packets.append(super_packet(b"s" * size, seq))
        else:
            packets.append((bytes(10), bytes(tcp6(b"d" * size, "A", seq=seq))))
        seq += size
    assert both(node, frames(packets)) == []
