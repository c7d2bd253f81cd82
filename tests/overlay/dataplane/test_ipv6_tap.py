"""The IPv6 half shows an attached `overlay trace` what the IPv4 path does (issue 20):
inner and outer packets both ways, drops with their reason, the ICMPv6 error it writes
back; and counts its own share (``*6``, ``drops6``) for /metrics' family split; over
real UDP sockets on ::1 and a TUN stand-in. ``set_tap`` on the vxlan dataplane reaches
the IPv6 half."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6

from control.lease import Lease
from control.peer_table import PeerTable
from encap import vxlan
from overlay.dataplane.counters import Counters
from overlay.dataplane.ipv6 import Ipv6Path
from overlay.dataplane.rate_limiter import RateLimiter
from overlay.dataplane.vxlan import VxlanDataplane, vxlan6_prefix_for
from tests.helpers.fake_tun import FakeTun
from tests.helpers.observe import TapRecorder

MAC, PEER_MAC = bytes.fromhex("0a0000000001"), bytes.fromhex("0a0000000002")
OWN6, PEER_NET6 = IPv6Network("fd00:10:0:1::/64"), IPv6Network("fd00:10:0:2::/64")
POD, REMOTE = "fd00:10:0:1::5", "fd00:10:0:2::9"
MTU = 1450


@pytest.fixture
def half() -> Iterator[tuple[Ipv6Path, FakeTun, socket.socket]]:
    """Our IPv6 half on ::1 and the peer's socket on ::1 (the peer's PublicIPv6)."""
    peer = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    ours = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    peer.bind(("::1", 0))
    ours.bind(("::1", 0))
    ours.setblocking(False)
    peer.settimeout(2)
    peers = PeerTable(peer.getsockname()[1], prefix6_for=vxlan6_prefix_for(1, MAC))
    peers.upsert(
        Lease(
            IPv4Network("198.18.2.0/24"),
            IPv4Address("192.0.2.2"),
            ipv6_subnet=PEER_NET6,
            public_ipv6=IPv6Address("::1"),
            backend_v6_data={"VNI": 1, "VtepMAC": "0a:00:00:00:00:02"},
        )
    )
    tun = FakeTun(False)
    path = Ipv6Path(
        tun,  # type: ignore[arg-type]
        ours,
        peers,
        OWN6,
        Counters(),
        vni=1,
        mac=MAC,
        port=ours.getsockname()[1],
        icmp_limit=RateLimiter(),
    )
    try:
        yield path, tun, peer
    finally:
        peer.close()
        ours.close()


def _to_peer(path: Ipv6Path, packet: bytes) -> None:
    path.send(bytes(10) + packet, MTU)  # the drains hand over the virtio_net_hdr too


def _from_peer(path: Ipv6Path, peer: socket.socket, datagram: bytes) -> None:
    peer.sendto(datagram, path.sock.getsockname()[:2])
    path.on_socket_readable(MTU)


def test_both_directions_and_the_drops_are_shown_to_the_tap(half: Any) -> None:
    path, tun, peer = half
    tap = TapRecorder()
    path.tap = tap
    ping = bytes(IPv6(src=POD, dst=REMOTE) / ICMPv6EchoRequest(id=3) / b"x")
    _to_peer(path, ping)
    datagram, _ = peer.recvfrom(2048)
    peer_addr = ("::1", peer.getsockname()[1])
    assert tap.seen == [("inner", "tx", ping), ("outer", "tx", datagram, peer_addr)]

    tap.seen.clear()
    reply = bytes(IPv6(src=REMOTE, dst=POD) / ICMPv6EchoReply(id=3) / b"x")
    good = vxlan.prefix(1, MAC, PEER_MAC, vxlan.ETHERTYPE_IPV6) + reply
    _from_peer(path, peer, good)
    assert tun.raw_written() == [reply]
    (outer, inner) = tap.seen
    assert outer[:3] == ("outer", "rx", good) and outer[3][0] == "::1"
    assert inner == ("inner", "rx", reply)

    tap.seen.clear()
    wrong_vni = vxlan.prefix(9, MAC, PEER_MAC, vxlan.ETHERTYPE_IPV6) + reply
    _from_peer(path, peer, wrong_vni)
    assert [s[:3] for s in tap.seen] == [
        ("outer", "rx", wrong_vni),
        ("drop", "rx_vxlan_wrong_vni", wrong_vni),
    ]
    assert tap.seen[1][3] == outer[3]  # the sender, as the IPv4 path gives it

    tap.seen.clear()
    nowhere = bytes(IPv6(src=POD, dst="fd00:10:0:9::1") / ICMPv6EchoRequest())
    _to_peer(path, nowhere)
    (dropped, error) = tap.seen
    assert dropped == ("drop", "tx_no_route", nowhere, None)
    assert error[:2] == ("inner", "rx") and ICMPv6DestUnreach in IPv6(error[2])
    counters = path.counters
    assert (
        dict(counters.drops) == dict(counters.drops6) == {"rx_vxlan_wrong_vni": 1, "tx_no_route": 1}
    )
    # the IPv6 half's own share of the node's counts, for the family split of /metrics
    assert (
        (counters.tx_packets6, counters.rx_packets6)
        == (counters.tx_packets, counters.rx_packets)
        == (1, 1)
    )
    assert (counters.tx_bytes6, counters.rx_bytes6) == (len(datagram), len(good))


def test_without_a_tap_nothing_is_shown_and_everything_counted(half: Any) -> None:
    path, tun, peer = half
    tap = TapRecorder()
    path.tap = tap
    path.tap = None
    _to_peer(path, bytes(IPv6(src=POD, dst=REMOTE) / ICMPv6EchoRequest()))
    peer.recvfrom(2048)
    reply = bytes(IPv6(src=REMOTE, dst=POD) / ICMPv6EchoReply())
    _from_peer(path, peer, vxlan.prefix(1, MAC, PEER_MAC, vxlan.ETHERTYPE_IPV6) + reply)
    assert tun.raw_written() == [reply]
    assert tap.seen == []
    assert (path.counters.tx_packets, path.counters.rx_packets) == (1, 1)


def test_set_tap_on_the_vxlan_dataplane_reaches_its_ipv6_half(half: Any) -> None:
    path, tun, _ = half
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        plane = VxlanDataplane(
            tun,
            sock,
            path.peers,
            IPv4Network("198.18.1.0/24"),
            path.counters,
            vni=1,
            mac=MAC,
            vtep_ip=bytes((198, 18, 1, 0)),
            port=8472,
        )
        plane.attach_ipv6(path)
        tap = TapRecorder()
        plane.set_tap(tap)
        assert plane.tap is tap and path.tap is tap
        plane.set_tap(None)
        assert plane.tap is None and path.tap is None
    finally:
        sock.close()
