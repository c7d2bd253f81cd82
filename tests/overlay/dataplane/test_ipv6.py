"""The send drain's IPv6 hand-over (issue 20): an IPv6 packet read from the TUN reaches
``_send_ipv6`` with its virtio_net_hdr, the same from the native drains as from the
Python reference, while the IPv4 packets around it leave as before. The IPv6 half itself
runs end to end in tests/netns/test_dual_stack.py."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from control.lease import Lease
from control.peer_table import PeerTable
from encap import native
from overlay.dataplane.counters import Counters
from overlay.dataplane.udp import UdpDataplane
from tests.helpers import wire
from tests.helpers.fake_tun import FakeTun

OWN = IPv4Network("198.18.1.0/24")
PEER = Lease(IPv4Network("198.18.2.0/24"), IPv4Address(wire.PEER_A))


@pytest.fixture(params=["native", "pure"])
def codecs(request: pytest.FixtureRequest) -> str:
    if request.param == "native" and not native.AVAILABLE:
        pytest.fail(f"encap._native did not load: {native.LOAD_ERROR}")
    return str(request.param)


@pytest.mark.underlay
@pytest.mark.parametrize("vnet", [True, False])
def test_ipv6_packets_reach_send_ipv6_with_their_vnet_header(
    vnet: bool, codecs: str, wires: Any
) -> None:
    tun, link = FakeTun(vnet), wires()
    peers = PeerTable(link.port)
    peers.upsert(PEER)
    dp = UdpDataplane(tun, link.sock, peers, OWN, Counters(), tun_tso=True)  # type: ignore[arg-type]
    dp.native = codecs == "native"
    handed: list[bytes] = []
    dp._send_ipv6 = handed.append  # type: ignore[method-assign]
    v4 = bytes(IP(src="198.18.1.5", dst="198.18.2.9") / UDP(sport=1, dport=2) / b"four")
    v6 = bytes(IPv6(src="fd00:10:0:1::5", dst="fd00:10:0:2::9") / UDP() / b"six")
    partial = struct.pack("=BBHHHH", 1, 0, 0, 0, 40, 6)  # NEEDS_CSUM at the UDP header
    for packet, header in ((v4, None), (v6, partial), (v4, None), (v6, None), (b"\x60" * 39, None)):
        if header is None:
            tun.inject(packet)
        else:
            tun.inject(packet, header)
    dp.on_tun_readable()
    plain = bytes(10)
    assert handed == [(partial if vnet else plain) + v6, plain + v6]
    assert [d for d, _ in link.datagrams()] == [v4, v4]
    assert dp.counters.tx_packets == 2
    assert dict(dp.counters.drops) == {"tx_not_ipv4": 1}  # 39 bytes: no IPv6 header


@pytest.mark.underlay
def test_without_an_ipv6_half_an_ipv6_packet_is_counted_not_ipv4(codecs: str, wires: Any) -> None:
    """The udp backend (or vxlan without EnableIPv6): counted as before."""
    tun, link = FakeTun(True), wires()
    dp = UdpDataplane(tun, link.sock, PeerTable(link.port), OWN, Counters())  # type: ignore[arg-type]
    dp.native = codecs == "native"
    tun.inject(bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP()))
    dp.on_tun_readable()
    assert dict(dp.counters.drops) == {"tx_not_ipv4": 1}
    assert link.datagrams() == []
