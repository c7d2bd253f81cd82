"""The send drain's IPv6 hand-over (issue 20): an IPv6 packet read from the TUN reaches
``_send_ipv6`` with its virtio_net_hdr, the same from the native drains as from the
Python reference, while the IPv4 packets around it leave as before. Then the IPv6 half's
offloads on real sockets: a TSO6 super-packet out in one GSO send, a GRO receive into
the TUN as one GSO_TCPV6 write. The IPv6 half runs end to end in
tests/netns/test_dual_stack.py."""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from control.lease import Lease
from control.peer_table import PeerTable
from encap import gso, ipv6, native, tso, vxlan
from overlay.dataplane.counters import Counters
from overlay.dataplane.ipv6 import Ipv6Path
from overlay.dataplane.rate_limiter import RateLimiter
from overlay.dataplane.udp import UdpDataplane
from overlay.dataplane.udp_socket import open_socket
from overlay.dataplane.vxlan import VxlanDataplane, vxlan6_prefix_for
from overlay.impair.rules import Change, Rules
from tests.helpers import wire
from tests.helpers.fake_tun import FakeTun
from tests.helpers.observe import TapRecorder
from tests.helpers.tcp_streams import resegment

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
    dp._send_ipv6 = lambda frame, hold=False: handed.append(frame)  # type: ignore[method-assign]
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


# -- the IPv6 half's offloads: TSO6 out of the TUN, UDP GSO and GRO on its socket ----------
# Real IPv6 UDP sockets on the loopback of the test's own namespace (the underlay fixture's),
# our Ipv6Path and a peer's socket; the TUN is the stand-in whose writes come back cut as
# the kernel cuts a GSO_TCPV6 super-packet.

OWN6 = IPv6Network("fd00:10:0:1::/64")
PEER_SUBNET6 = IPv6Network("fd00:10:0:2::/64")
MAC, PEER_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
MTU = 1450  # the TUN's: IPv6 packets up to 1430 bytes


class Pair:
    """Our Ipv6Path's socket and a peer's, both on [::1] in the test's namespace."""

    def __init__(self, namespace: str, offload: bool) -> None:
        self.peer = wire.in_netns(namespace, self._peer_socket)
        self.ours = wire.in_netns(namespace, lambda: open_socket("::1", 0))
        self.port = self.peer.getsockname()[1]
        self.tun = FakeTun(True)
        self.tun.enable_vnet_hdr()
        peers = PeerTable(self.port, prefix6_for=vxlan6_prefix_for(1, MAC))
        lease = Lease(
            IPv4Network("198.18.2.0/24"),
            IPv4Address(wire.PEER_A),
            "vxlan",
            {"VNI": 1, "VtepMAC": "02:00:00:00:00:09"},
            PEER_SUBNET6,
            IPv6Address("::1"),
            {"VNI": 1, "VtepMAC": vxlan.format_mac(PEER_MAC)},
        )
        peers.upsert(lease)
        self.path = Ipv6Path(
            self.tun,  # type: ignore[arg-type]
            self.ours,
            peers,
            OWN6,
            Counters(),
            vni=1,
            mac=MAC,
            port=self.port,
            icmp_limit=RateLimiter(),
            offload=offload,
        )

    @staticmethod
    def _peer_socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(gso.SOL_UDP, gso.UDP_GRO, 1)
        sock.bind(("::1", 0))
        sock.setblocking(False)
        return sock

    def received(self) -> list[tuple[bytes, int]]:
        """What reached the peer: each receive and its GRO segment size (0: one datagram)."""
        out = []
        while select.select([self.peer], [], [], 0.05)[0]:
            try:
                data, ancdata, _, _ = self.peer.recvmsg(1 << 17, 256)
            except BlockingIOError:
                break
            size = gso.gro_size(ancdata, 0)
            out.append((data, size if size < len(data) else 0))
        return out

    def close(self) -> None:
        self.ours.close()
        self.peer.close()
        self.tun.close()


@pytest.fixture
def pair(underlay: Any) -> Iterator[Callable[[bool], Pair]]:
    made: list[Pair] = []

    def make(offload: bool = True) -> Pair:
        made.append(Pair(underlay.ours, offload))
        return made[-1]

    yield make
    for p in made:
        p.close()


def tcp6(payload: bytes, flags: str = "PA", seq: int = 1000, sport: int = 40000) -> IPv6:
    return (
        IPv6(src="fd00:10:0:1::5", dst="fd00:10:0:2::9", hlim=63)
        / TCP(sport=sport, dport=5201, seq=seq, ack=1, flags=flags, window=500)
        / payload
    )


@pytest.mark.underlay
@pytest.mark.parametrize("codecs", ["native", "pure"])
def test_a_tso6_super_packet_leaves_in_one_gso_send(
    pair: Callable[[bool], Pair], codecs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GSO_TCPV6 super-packet from the TUN: cut into MTU-sized segments with full
    checksums, sent to the peer's PublicIPv6 with UDP_SEGMENT (the peer's GRO gets it
    back as one receive), counted as one super-packet and one GSO send."""
    if codecs == "pure":
        monkeypatch.setattr(native, "segment_tcp6", tso.segment_tcp6)
    p = pair(True)
    payload = bytes(range(256)) * 120  # 30720 bytes: 23 segments of 1370
    packet = bytearray(bytes(tcp6(payload)))
    packet[56:58] = b"\x12\x34"  # the kernel leaves a partial sum there
    vnet = struct.pack("=BBHHHH", 1, 4, 60, 1370, 40, 16)  # NEEDS_CSUM, GSO_TCPV6
    p.path.send(vnet + bytes(packet), MTU)
    received = p.received()
    assert [size for _, size in received] == [22 + 1430]  # one GSO send, one GRO receive
    data, size = received[0]
    datagrams = [data[i : i + size] for i in range(0, len(data), size)]
    assert all(d[:22] == vxlan.prefix(1, PEER_MAC, MAC, vxlan.ETHERTYPE_IPV6) for d in datagrams)
    segments = [IPv6(d[22:]) for d in datagrams]
    assert b"".join(bytes(s[TCP].payload) for s in segments) == payload
    for s in segments:  # scapy recomputes each checksum: equal to the one sent
        carried = s[TCP].chksum
        del s[TCP].chksum
        assert IPv6(bytes(s))[TCP].chksum == carried
    assert [str(s[TCP].flags) for s in segments] == ["A"] * 22 + ["PA"]
    assert p.path.status()["ipv6_tx_tun_super_packets"] == 1
    assert p.path.status()["ipv6_tx_gso_sends"] == 1
    counters = p.path.counters
    # the IPv6 half's share (/metrics' family label): every segment a packet, as on IPv4
    assert counters.tx_packets == counters.tx_packets6 == 23
    assert counters.tx_bytes == counters.tx_bytes6 == len(data)
    assert dict(counters.drops) == {}


@pytest.mark.underlay
def test_without_offloads_a_super_packet_is_refused_and_counted(
    pair: Callable[[bool], Pair],
) -> None:
    """--no-offload: the TUN is not offered TSO6, so a GSO packet is never expected."""
    p = pair(False)
    vnet = struct.pack("=BBHHHH", 1, 4, 60, 1370, 40, 16)
    p.path.send(vnet + bytes(tcp6(b"x" * 3000)), MTU)
    assert p.received() == []
    assert dict(p.path.counters.drops) == {"tx_ipv6_gso_unsupported": 1}


def peer_segments(payload: bytes, corrupt: int | None = None) -> list[bytes]:
    """The peer's VXLAN datagrams of one TCP flow, 1370 bytes of payload each (the last
    PSH); ``corrupt``: that segment's TCP checksum off by one."""
    prefix = vxlan.prefix(1, MAC, PEER_MAC, vxlan.ETHERTYPE_IPV6)
    chunks = [payload[i : i + 1370] for i in range(0, len(payload), 1370)]
    out = []
    for i, chunk in enumerate(chunks):
        flags = "PA" if i == len(chunks) - 1 else "A"
        segment = bytearray(bytes(tcp6(chunk, flags, 1000 + i * 1370)))
        segment[:40] = bytes(
            IPv6(src="fd00:10:0:2::9", dst="fd00:10:0:1::5", hlim=63, plen=len(segment) - 40, nh=6)
        )
        segment[56:58] = b"\x00\x00"
        fixed = IPv6(bytes(segment))
        del fixed[TCP].chksum
        segment = bytearray(bytes(fixed))
        if i == corrupt:
            segment[56] ^= 0x01
        out.append(prefix + bytes(segment))
    return out


@pytest.mark.underlay
@pytest.mark.parametrize("codecs", ["native", "pure"])
@pytest.mark.parametrize("corrupt", [None, 5])
def test_a_gro_receive_goes_into_the_tun_as_one_gso_tcpv6_super_packet(
    pair: Callable[[bool], Pair],
    corrupt: int | None,
    codecs: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The peer's GSO send of 20 segments: one GRO receive here, every segment checked,
    the flow written with one GSO_TCPV6 write that the kernel cuts back into the same
    segments; a segment with a corrupt TCP checksum is counted and never written (the
    run breaks around it)."""
    if codecs == "pure":
        monkeypatch.setattr(native, "valid_pieces6", ipv6.valid_pieces6)
        monkeypatch.setattr(native, "plan_tun_writes6", ipv6.plan_tun_writes6)
    p = pair(True)
    payload = bytes(range(251)) * 109  # 27359 bytes: 20 segments
    datagrams = peer_segments(payload, corrupt)
    size = len(datagrams[0])
    p.peer.sendmsg([b"".join(datagrams)], gso.segment_cmsg(size), 0, p.ours.getsockname()[:2])
    select.select([p.ours], [], [], 1)
    p.path.on_socket_readable(MTU)
    raw = p.tun.raw_written()
    written = [s for data in raw for s in resegment([data[:10], data[10:]])]
    expected = [d[22:] for i, d in enumerate(datagrams) if i != corrupt]
    assert written == expected
    status = p.path.status()
    assert status["ipv6_rx_gro_receives"] == 1
    if corrupt is None:
        assert len(raw) == 1 and raw[0][1] == 4  # one write, GSO_TCPV6
        assert status["ipv6_rx_tun_super_packets"] == 1
        assert dict(p.path.counters.drops) == {}
    else:
        assert len(raw) == 2  # the run before it, the run after it
        assert status["ipv6_rx_tun_super_packets"] == 2
        assert dict(p.path.counters.drops) == {"rx_bad_l4_checksum": 1}
    counters = p.path.counters
    assert counters.rx_packets == counters.rx_packets6 == len(expected)
    assert counters.rx_bytes == counters.rx_bytes6 == sum(map(len, expected)) + 22 * len(expected)
    assert counters.drops6 == counters.drops  # what valid_pieces6 drops: both tables


@pytest.mark.underlay
def test_after_an_eio_the_segments_leave_one_by_one(pair: Callable[[bool], Pair]) -> None:
    """A GSO send failing with EIO (a route whose device cannot checksum it) turns UDP GSO
    off for good, as on the IPv4 path: that super-packet and the next still leave, each
    segment in a datagram of its own."""
    p = pair(True)
    payload = bytes(range(256)) * 20  # 5120 bytes: 4 segments of 1370
    vnet = struct.pack("=BBHHHH", 1, 4, 60, 1370, 40, 16)
    frame = vnet + bytes(tcp6(payload))
    wire.failing_sendmsg(errno.EIO, lambda: p.path.send(frame, MTU))
    p.path.send(frame, MTU)
    received = p.received()
    assert p.path.gso is False
    assert [size for _, size in received] == [0] * 8  # single datagrams, not a GSO batch
    assert b"".join(bytes(IPv6(d[22:])[TCP].payload) for d, _ in received) == payload * 2
    assert p.path.status()["ipv6_tx_gso_sends"] == 0
    assert dict(p.path.counters.drops) == {}


@pytest.mark.underlay
@pytest.mark.parametrize("codecs", ["native", "pure"])
def test_single_datagrams_are_checked_the_same_way(
    pair: Callable[[bool], Pair], codecs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Datagrams sent one by one (a kernel peer's, ACKs): each checked by the same rules;
    the one with a corrupt TCP checksum is counted and never written."""
    if codecs == "pure":
        monkeypatch.setattr(native, "valid_pieces6", ipv6.valid_pieces6)
        monkeypatch.setattr(native, "plan_tun_writes6", ipv6.plan_tun_writes6)
    p = pair(True)
    datagrams = peer_segments(b"s" * 3000, corrupt=1)
    for datagram in datagrams:
        p.peer.sendto(datagram, p.ours.getsockname()[:2])
    select.select([p.ours], [], [], 1)
    p.path.on_socket_readable(MTU)
    written = [s for data in p.tun.raw_written() for s in resegment([data[:10], data[10:]])]
    assert written == [d[22:] for i, d in enumerate(datagrams) if i != 1]
    assert dict(p.path.counters.drops) == {"rx_bad_l4_checksum": 1}


@pytest.mark.underlay
def test_with_a_trace_a_super_packet_leaves_segment_by_segment_each_reported(
    pair: Callable[[bool], Pair],
) -> None:
    """A trace attached (as the IPv4 path with one): the TSO6 super-packet is still cut,
    but each segment leaves in a sendto of its own and is shown to the trace (inner,
    then outer), counted as a packet in the totals and the IPv6 half's share."""
    p = pair(True)
    tap = TapRecorder()
    p.path.tap = tap
    payload = bytes(range(256)) * 20  # 5120 bytes: 4 segments of 1370
    vnet = struct.pack("=BBHHHH", 1, 4, 60, 1370, 40, 16)
    p.path.send(vnet + bytes(tcp6(payload)), MTU)
    received = p.received()
    assert [size for _, size in received] == [0] * 4  # single datagrams, not a GSO batch
    datagrams = [d for d, _ in received]
    peer = ("::1", p.port)
    expected: list[tuple[object, ...]] = []
    for d in datagrams:
        expected += [("inner", "tx", d[22:]), ("outer", "tx", d, peer)]
    assert tap.seen == expected
    assert b"".join(bytes(IPv6(d[22:])[TCP].payload) for d in datagrams) == payload
    counters = p.path.counters
    assert counters.tx_packets == counters.tx_packets6 == 4
    assert counters.tx_bytes == counters.tx_bytes6 == sum(map(len, datagrams))
    assert p.path.status()["ipv6_tx_gso_sends"] == 0
    assert dict(counters.drops) == {}


@pytest.mark.underlay
@pytest.mark.parametrize("codecs", ["native", "pure"])
def test_with_a_trace_a_gro_receive_is_reported_datagram_by_datagram(
    pair: Callable[[bool], Pair], codecs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trace attached: each datagram of the peer's GSO send (one GRO receive) shown
    (outer, then the inner packet or its drop with the reason), the valid ones still
    written as GSO_TCPV6 super-packets; counted as on the fast path, in both tables."""
    if codecs == "pure":
        monkeypatch.setattr(native, "plan_tun_writes6", ipv6.plan_tun_writes6)
    p = pair(True)
    tap = TapRecorder()
    p.path.tap = tap
    datagrams = peer_segments(bytes(range(251)) * 109, corrupt=5)  # 20 segments
    size = len(datagrams[0])
    p.peer.sendmsg([b"".join(datagrams)], gso.segment_cmsg(size), 0, p.ours.getsockname()[:2])
    select.select([p.ours], [], [], 1)
    p.path.on_socket_readable(MTU)
    source = tap.seen[0][3]
    expected: list[tuple[object, ...]] = []
    for i, d in enumerate(datagrams):
        expected.append(("outer", "rx", d, source))
        expected.append(
            ("drop", "rx_bad_l4_checksum", d, source) if i == 5 else ("inner", "rx", d[22:])
        )
    assert tap.seen == expected
    raw = p.tun.raw_written()
    written = [s for data in raw for s in resegment([data[:10], data[10:]])]
    good = [d[22:] for i, d in enumerate(datagrams) if i != 5]
    assert written == good
    assert len(raw) == 2 and raw[0][1] == raw[1][1] == 4  # GSO_TCPV6 either side of it
    counters = p.path.counters
    assert counters.rx_packets == counters.rx_packets6 == 19
    assert counters.rx_bytes == counters.rx_bytes6 == sum(map(len, good)) + 22 * 19
    assert dict(counters.drops) == dict(counters.drops6) == {"rx_bad_l4_checksum": 1}


@pytest.mark.underlay
def test_an_impaired_ipv6_half_puts_each_segment_to_the_model(
    pair: Callable[[bool], Pair],
) -> None:
    """`overlay impair loss 100%` on the vxlan dataplane reaches its IPv6 half: every
    segment of a TSO6 super-packet is offered to the model and lost, counted in the
    totals and the IPv6 half's drops; cleared, the next one leaves in one GSO send."""
    p = pair(True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        plane = VxlanDataplane(
            p.tun,  # type: ignore[arg-type]
            sock,
            p.path.peers,
            OWN,
            p.path.counters,
            vni=1,
            mac=MAC,
            vtep_ip=OWN.network_address.packed,
            port=8472,
        )
        plane.attach_ipv6(p.path)
        plane.set_impairment(Rules().changed(Change.from_words("loss 100%")))
        vnet = struct.pack("=BBHHHH", 1, 4, 60, 1370, 40, 16)
        frame = vnet + bytes(tcp6(bytes(range(256)) * 20))  # 4 segments
        p.path.send(frame, MTU)
        assert p.received() == []
        counters = p.path.counters
        assert dict(counters.drops) == dict(counters.drops6) == {"tx_impair_loss": 4}
        assert counters.tx_packets6 == 0
        plane.set_impairment(Rules())
        p.path.send(frame, MTU)
        assert [size for _, size in p.received()] == [22 + 1430]
        assert counters.tx_packets == counters.tx_packets6 == 4
    finally:
        sock.close()
