"""encap._native against the pure-Python reference (encap.tso, encap.gso): the same
results, the same exceptions and reasons, the same counts and the same bytes left in the
buffer, on random, malformed and hostile input (hypothesis). The reference itself is
checked against scapy in test_tso.py, test_rx.py and overlay/dataplane/test_fastpath.py."""

from __future__ import annotations

import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encap import gso, ipv6, native, tso
from encap.errors import CodecError
from tests.helpers.mutation import mutate
from tests.helpers.tcp_streams import Segment, gro_buffers, reseal, streams

FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_native_module_is_used_in_ci() -> None:
    """CI builds the extension: a silent fallback to the reference must fail there."""
    if os.environ.get("CI"):
        assert native.AVAILABLE, native.LOAD_ERROR
    if not native.AVAILABLE:
        pytest.skip(f"encap._native not built here: {native.LOAD_ERROR}")
    assert native.segment_tcp4 is native.module().segment_tcp4


c: Any = native.module() if native.AVAILABLE else None


@pytest.fixture(autouse=True)
def _native_built() -> None:
    if c is None:
        pytest.fail(f"encap._native did not load: {native.LOAD_ERROR}")


def outcome(call: Callable[..., Any], *args: Any) -> Any:
    """A call's result, or its exception's type and (for CodecError) reason."""
    try:
        return ("ok", call(*args))
    except CodecError as e:
        return ("codec", e.reason)
    except (ValueError, TypeError, IndexError) as e:
        return ("error", type(e).__name__)


# -- TX: segment_tcp4, finish_checksums ----------------------------------------------------


@st.composite
def super_packets(draw: st.DrawFn) -> bytes:
    """A TCP super-packet as the TUN hands it over (sometimes mutated)."""
    options = draw(st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8), b"\x01" * 4]))
    ip_options = draw(st.sampled_from([b"", b"\x01\x01\x01\x00"]))
    payload = draw(st.binary(min_size=1, max_size=3000))
    tcp = struct.pack(
        "!HHIIBBHHH",
        40000,
        5201,
        draw(st.integers(0, 2**32 - 1)),
        7,
        (5 + len(options) // 4) << 4,
        draw(st.sampled_from([0x10, 0x18, 0x19, 0x90, 0x11])),
        512,
        0x1234,  # whatever the kernel left: every segment gets a full checksum
        0,
    )
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | (5 + len(ip_options) // 4),
        0,
        20 + len(ip_options) + len(tcp) + len(options) + len(payload),
        draw(st.integers(0, 0xFFFF)),
        0x4000,
        64,
        6,
        0,
        bytes([198, 18, 1, 2]),
        bytes([198, 18, 2, 3]),
    )
    raw = bytearray(header + ip_options + tcp + options + payload)
    if draw(st.booleans()):
        return mutate(draw, raw, 3, 60)
    return bytes(raw)


@given(
    super_packets(),
    st.integers(-3, 2000),
    st.sampled_from([b"", bytes(range(22)), b"\xaa" * 3]),
    st.integers(0, 7),
    st.integers(0, 6000),
    st.integers(-2, 2),
)
@FAST
def test_segment_tcp4_matches_the_reference(
    raw: bytes, gso_size: int, prefix: bytes, at: int, slack: int, length_delta: int
) -> None:
    buf = bytearray(os.urandom(at)) + bytearray(len(prefix)) + bytearray(raw)
    buf += bytearray(os.urandom(slack))
    length = len(raw) + length_delta
    ours, theirs = bytearray(buf), bytearray(buf)
    expected = outcome(tso.segment_tcp4, ours, at, length, gso_size, prefix)
    assert outcome(c.segment_tcp4, theirs, at, length, gso_size, prefix) == expected
    assert theirs == ours


def test_segment_tcp4_refuses_what_does_not_fit() -> None:
    for args in [(-1, 40), (0, -5), (10**6, 40), (0, 10**6), (2**62, 2**62)]:
        for fn in (tso.segment_tcp4, c.segment_tcp4):
            with pytest.raises(CodecError):
                fn(bytearray(100), *args, 1400, b"")
    for fn in (tso.segment_tcp4, c.segment_tcp4):  # at + len(prefix) beyond 2**63 - 1
        with pytest.raises(CodecError):
            fn(bytearray(100), 2**63 - 1, 40, 1400, b"x")
    with pytest.raises(TypeError):
        c.segment_tcp4(b"read-only", 0, 9, 1, b"")  # the buffer must be writable


def test_segment_tcp4_prefix_inside_the_buffer() -> None:
    """The prefix may be a view of the very buffer being cut (overlapping regions)."""
    raw = Segment(1, 5, 1, 0x10, bytes(range(256)) * 12).build()
    for fn in (tso.segment_tcp4, c.segment_tcp4):
        buf = bytearray(22) + bytearray(raw) + bytearray(8000)
        prefix = bytes(buf[30:52])
        result = fn(buf, 0, len(raw), 1000, memoryview(buf)[30:52])
        reference = bytearray(22) + bytearray(raw) + bytearray(8000)
        assert result == tso.segment_tcp4(reference, 0, len(raw), 1000, prefix)
        assert buf == reference


@given(
    st.binary(min_size=0, max_size=3000),
    st.lists(st.tuples(st.integers(-4, 3100), st.integers(-70, 8), st.integers(-4, 3100))),
)
@FAST
def test_finish_checksums_matches_the_reference(
    data: bytes, relative: list[tuple[int, int, int]]
) -> None:
    """Regions anywhere, ending near the buffer's end (inside, at it, just past it)."""
    regions = [(start, len(data) + end, field) for start, end, field in relative]
    ours, theirs = bytearray(data), bytearray(data)
    expected = outcome(tso.finish_checksums, ours, regions)
    assert outcome(c.finish_checksums, theirs, regions) == expected
    assert theirs == ours


@given(st.binary(min_size=40, max_size=3000), st.integers(0, 3), st.sampled_from([6, 16]))
@FAST
def test_finish_checksums_on_valid_regions(data: bytes, lead: int, offset: int) -> None:
    buf = bytearray(lead) + bytearray(data)
    region = tso.partial_region(lead, len(data), 20, offset)
    ours, theirs = bytearray(buf), bytearray(buf)
    tso.finish_checksums(ours, [region])
    c.finish_checksums(theirs, [region])
    assert theirs == ours


# -- RX: drop_reason, valid_pieces, plan_tun_writes, deliver --------------------------------

SOURCES = st.lists(
    st.sampled_from([(0xC61201, 8), (0xC612, 16), (0, 32), (0xC6120102, 0), (0x0A, 24)]),
    min_size=0,
    max_size=3,
)
DESTINATIONS = st.sampled_from([(0xC61202, 8), (0xC612, 16), (0, 32), (0xC6120203, 0)])


IP_OPTIONS = (
    b"\x01\x01\x01\x01",  # NOPs
    b"\x07\x07\x04" + bytes(4) + b"\x00",  # record route, END
    b"\x00\xff\xff\xff",  # END, then padding that is never read
    b"\x01\x44\x02\x00",  # NOP, a 2-byte option, END
    b"\x07\x09\x04\x00",  # runs past the header: malformed
    b"\x01\x01\x01\x07",  # a type without its length byte: malformed
    b"\x83\x01\x00\x00",  # length 1: malformed
)


@st.composite
def inner_packets(draw: st.DrawFn) -> bytearray:
    """One inner packet as a peer might send it: valid, partial checksum, or broken."""
    protocol = draw(st.sampled_from([6, 17, 1, 47]))
    payload = draw(st.binary(max_size=200)) * draw(st.sampled_from([1, 7]))
    segment = Segment(40000, draw(st.integers(0, 2**32 - 1)), 1, 0x10, payload, protocol=protocol)
    raw = bytearray(segment.build())
    options = draw(st.sampled_from([b""] * 4 + list(IP_OPTIONS)))
    if options:  # IPv4 options between the header and the L4 header
        raw[20:20] = options
        raw[0] = 0x40 | (20 + len(options)) // 4
        raw[2:4] = len(raw).to_bytes(2, "big")
        reseal(raw, 0, len(raw))
    if protocol in (6, 17) and draw(st.booleans()):  # partial: the pseudo-header sum
        field = (raw[0] & 0x0F) * 4 + (16 if protocol == 6 else 6)
        length = len(raw) - (raw[0] & 0x0F) * 4
        pseudo = (sum(struct.unpack("!4H", raw[12:20])) + protocol + length) % 0xFFFF
        raw[field : field + 2] = (pseudo or 0xFFFF).to_bytes(2, "big")
    if draw(st.booleans()):
        raw = bytearray(mutate(draw, raw, 3, 48))
        if len(raw) >= 20 and len(raw) >= (raw[0] & 0x0F) * 4 and draw(st.booleans()):
            reseal(raw, 0, len(raw))  # valid checksums over a mutated header
    return raw


@given(inner_packets(), st.integers(0, 5), st.integers(-3, 3), SOURCES, DESTINATIONS)
@FAST
def test_drop_reason_matches_the_reference(
    raw: bytearray,
    lead: int,
    end_delta: int,
    sources: list[tuple[int, int]],
    destination: tuple[int, int],
) -> None:
    buf = bytearray(os.urandom(lead)) + raw + bytearray(os.urandom(4))
    end = lead + len(raw) + end_delta
    ours, theirs = bytearray(buf), bytearray(buf)
    expected = outcome(gso.drop_reason, ours, lead, end, sources, destination)
    assert outcome(c.drop_reason, theirs, lead, end, sources, destination) == expected
    assert theirs == ours


VNI, MAC = b"\x00\x00\x01", bytes.fromhex("02aabbccddee")
VXLAN_HEAD = b"\x08\0\0\0" + VNI + b"\0" + MAC + bytes(6) + b"\x08\x00"


@st.composite
def receives(draw: st.DrawFn) -> tuple[bytearray, int, int, tuple[bytes, bytes] | None]:
    """One receive as the dataplane hands it to the planner: (buffer, size, segment,
    vxlan rules), from a TCP stream (so runs form) with damage, partial checksums and,
    for vxlan, good, bad and ARP headers."""
    packets = draw(streams())
    if not packets or draw(st.booleans()):
        packets.append(bytes(draw(inner_packets())))
    vxlan = draw(st.booleans())
    if vxlan:
        heads = st.sampled_from(
            [VXLAN_HEAD] * 6
            + [b"\x00" + VXLAN_HEAD[1:], VXLAN_HEAD[:20] + b"\x08\x06", VXLAN_HEAD[:6] + b"\x09"]
        )
        packets = [draw(heads)[:22].ljust(22, b"\0") + p for p in packets]
    batches = gro_buffers(packets)
    data, size, segment = batches[draw(st.integers(0, len(batches) - 1))]
    for _ in range(draw(st.integers(0, 4)) if size else 0):
        data[draw(st.integers(0, size - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        size = draw(st.integers(0, size))  # a cut-off last datagram
    data += bytearray(draw(st.integers(0, 64)))
    return data, size, segment, (VNI, MAC) if vxlan else None


def joined(writes: list[Any]) -> list[tuple[bytes, int, int]]:
    return [(b"".join(bytes(b) for b in buffers), n, size) for buffers, n, size in writes]


@given(receives(), SOURCES, DESTINATIONS, st.sampled_from([0, 0, 576, 1450]))
@FAST
def test_planners_match_the_reference(
    receive: tuple[bytearray, int, int, tuple[bytes, bytes] | None],
    sources: list[tuple[int, int]],
    destination: tuple[int, int],
    mtu: int,
) -> None:
    data, size, segment, vxlan = receive
    for pure, fast, extra in (
        (gso.valid_pieces, c.valid_pieces, ()),
        (gso.plan_tun_writes, c.plan_tun_writes, (mtu,)),
    ):
        ours, theirs = bytearray(data), bytearray(data)
        drops_a: Counter[str] = Counter()
        drops_b: Counter[str] = Counter()
        arp_a: list[int] = []
        arp_b: list[int] = []
        a = outcome(pure, ours, size, segment, sources, destination, drops_a, vxlan, arp_a, *extra)
        b = outcome(
            fast, theirs, size, segment, sources, destination, drops_b, vxlan, arp_b, *extra
        )
        if pure is gso.plan_tun_writes and a[0] == "ok":
            a, b = ("ok", joined(a[1])), ("ok", joined(b[1]))
        assert b == a
        assert (drops_b, arp_b) == (drops_a, arp_a)
        assert theirs == ours


@given(st.binary(max_size=3000), st.integers(-2, 3100), st.integers(-2, 1600), SOURCES)
@FAST
def test_planners_on_random_bytes(
    data: bytes, size: int, segment: int, sources: list[tuple[int, int]]
) -> None:
    for vxlan in (None, (VNI, MAC)):
        for pure, fast in (
            (gso.valid_pieces, c.valid_pieces),
            (gso.plan_tun_writes, c.plan_tun_writes),
        ):
            ours, theirs = bytearray(data), bytearray(data)
            drops_a: Counter[str] = Counter()
            drops_b: Counter[str] = Counter()
            a = outcome(pure, ours, size, segment, sources, (0, 32), drops_a, vxlan)
            b = outcome(fast, theirs, size, segment, sources, (0, 32), drops_b, vxlan)
            if pure is gso.plan_tun_writes and a[0] == "ok":
                a, b = ("ok", joined(a[1])), ("ok", joined(b[1]))
            assert b == a and drops_b == drops_a and theirs == ours


def test_bad_arguments_are_errors_not_crashes() -> None:
    buf = bytearray(100)
    for call in (
        lambda: c.plan_tun_writes(buf, 101, 10, [], (0, 32), Counter()),  # beyond the buffer
        lambda: c.plan_tun_writes(bytearray(70000), 70000, 10, [], (0, 32), Counter()),
        lambda: c.valid_pieces(buf, 50, 10, [(1, 33)], (0, 32), Counter()),  # shift > 32
        lambda: c.valid_pieces(buf, 50, 10, [(-1, 8)], (0, 32), Counter()),
        lambda: c.valid_pieces(buf, 50, 10, [(0, 8)], (0, 32), Counter(), (b"\0", MAC)),
        lambda: c.valid_pieces(buf, 50, 10, 5, (0, 32), Counter()),
        lambda: c.valid_pieces(b"bytes", 5, 5, [], (0, 32), Counter()),  # read-only
        lambda: c.drop_reason(buf, 90, 101, [], (0, 32)),
        lambda: c.drop_reason(buf, 50, 40, [], (0, 32)),
        lambda: c.finish_checksums(buf, [(0, 101, 10)]),
        lambda: c.finish_checksums(buf, [(0, 10)]),
        lambda: c.valid_pieces(buf, 50, 10, [], (0, 32), Counter(), None, "arp"),  # not a list
    ):
        with pytest.raises((ValueError, TypeError)):
            call()


# -- the drains (Drains.tx, Drains.rx) against the dataplane's reference methods -------

PEER_MAC = bytes.fromhex("02aabbccdd01")


def _dataplane(
    framing: bool, codecs: str, tun: Any, link: Any, *, rx: bool = False, **options: Any
) -> Any:
    """A udp (or, with ``framing``, vxlan) dataplane on ``link`` (tests/helpers/wire.py) with
    three peers: A and B, and one without a VTEP MAC (so without a vxlan route). For
    ``rx`` our subnet is 198.18.2.0/24 and A's 198.18.1.0/24, so the packets of
    tests.helpers.tcp_streams.streams() are A's to us."""
    from ipaddress import IPv4Address, IPv4Network

    from control.lease import Lease
    from control.peer_table import PeerTable
    from overlay.dataplane.counters import Counters
    from overlay.dataplane.udp import UdpDataplane
    from overlay.dataplane.vxlan import VxlanDataplane, vxlan_prefix_for
    from tests.helpers import wire

    own = IPv4Network("198.18.2.0/24" if rx else "198.18.1.0/24")
    data = {"VNI": 1, "VtepMAC": PEER_MAC.hex(":")}
    a_net = "198.18.1.0/24" if rx else "198.18.2.0/24"
    leases = [
        Lease(IPv4Network(a_net), IPv4Address(wire.PEER_A), "vxlan", data),
        Lease(IPv4Network("198.18.3.0/24"), IPv4Address(wire.PEER_B), "vxlan", data),
        Lease(IPv4Network("198.18.4.0/24"), IPv4Address(wire.STRANGER), "vxlan", {}),  # no MAC
    ]
    if framing:
        peers = PeerTable(link.port, vxlan_prefix_for(1, MAC))
        dp = VxlanDataplane(
            tun, link.sock, peers, own, Counters(), **options,
            vni=1, mac=MAC, vtep_ip=own.network_address.packed, port=link.port,
        )  # fmt: skip
    else:
        peers = PeerTable(link.port)
        dp = UdpDataplane(tun, link.sock, peers, own, Counters(), **options)
    for lease in leases[: 2 if rx else 3]:
        peers.upsert(lease)
    dp.native = codecs == "native"
    return dp


def _stats(dp: Any) -> dict[str, tuple[int, int, int, int, bool, bool]]:
    return {
        str(p.lease.subnet): (
            p.stats.tx_packets,
            p.stats.tx_bytes,
            p.stats.rx_packets,
            p.stats.rx_bytes,
            p.stats.last_tx > 0,
            p.stats.last_rx > 0,
        )  # fmt: skip
        for p in dp.peers.peers()
    }


VNETS = st.one_of(
    st.just(bytes(10)),
    st.builds(lambda size: struct.pack("=BBHHHH", 1, 1, 52, size, 20, 16), st.integers(0, 3000)),
    st.builds(
        lambda start, offset: struct.pack("=BBHHHH", 1, 0, 0, 0, start, offset),
        st.integers(0, 40),
        st.sampled_from([6, 16, 0, 30]),
    ),
    st.just(struct.pack("=BBHHHH", 1, 4, 52, 1000, 20, 16)),  # TCPV6: unsupported
    st.just(struct.pack("=BBHHHH", 2, 0, 0, 0, 0, 0)),  # DATA_VALID
    st.binary(min_size=10, max_size=10),
)


@st.composite
def tun_reads(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """One read from the TUN: (virtio_net_hdr, packet) to one of the peers, to nowhere,
    or malformed."""
    kind = draw(st.sampled_from(["super", "small", "small", "junk"]))
    if kind == "super":
        raw = bytearray(draw(super_packets()))
    elif kind == "small":
        raw = bytearray(draw(inner_packets()))
    else:
        raw = bytearray(draw(st.binary(max_size=60)))
    if len(raw) >= 20:
        raw[16:20] = bytes([198, 18, draw(st.sampled_from([2, 3, 4, 77])), 9])
    return draw(VNETS), bytes(raw)


def _tx_run(underlay: Any, codecs: str, reads: list[tuple[bytes, bytes]], framing: bool,
            offload: bool, vnet: bool, repeat: int = 1, mtu: int = 0) -> Any:  # fmt: skip
    from tests.helpers.fake_tun import FakeTun
    from tests.helpers.wire import Wire

    tun, link = FakeTun(vnet), Wire(underlay, 8472 if framing else 8285)
    try:
        dp = _dataplane(framing, codecs, tun, link, offload=offload, tun_tso=True, mtu=mtu)
        for vnet_hdr, packet in reads:
            tun.inject(packet, vnet_hdr)
        for _ in range(repeat):
            dp.on_tun_readable()
        features = {k: v for k, v in dp.features().items() if k != "native"}
        return link.sent(), dp.counters.snapshot(), _stats(dp), tun.raw_written(), features
    finally:
        link.close()
        tun.close()


@pytest.mark.underlay
@given(st.lists(tun_reads(), max_size=12), st.booleans(), st.booleans(), st.booleans())
@FAST
def test_tx_drain_matches_the_reference(
    underlay: Any, reads: list[tuple[bytes, bytes]], framing: bool, offload: bool, vnet: bool
) -> None:
    """on_tun_readable on the native drain and on the Python reference, from the same TUN
    reads: the same datagrams sent (and GSO sends), counters, drops, peer stats and
    ICMP errors written back."""
    pure = _tx_run(underlay, "pure", reads, framing, offload, vnet)
    assert _tx_run(underlay, "native", reads, framing, offload, vnet) == pure


@pytest.mark.underlay
@given(
    st.lists(tun_reads(), max_size=12),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from([68, 300, 576, 1372]),
)
@FAST
def test_tx_drain_beyond_the_mtu_matches_the_reference(
    underlay: Any,
    reads: list[tuple[bytes, bytes]],
    framing: bool,
    offload: bool,
    vnet: bool,
    mtu: int,
) -> None:
    """With an MTU some reads exceed (packets queued before it was lowered, super-packets
    cut at a larger one): the same DF packets answered with frag-needed (the ICMP errors
    written back are compared), the same others sent, the same counts."""
    pure = _tx_run(underlay, "pure", reads, framing, offload, vnet, mtu=mtu)
    assert _tx_run(underlay, "native", reads, framing, offload, vnet, mtu=mtu) == pure


@pytest.mark.underlay
def test_tx_drain_stops_at_its_budget(underlay: Any) -> None:
    """More than BUDGET (256) reads: each call reads 256, the next one the rest."""
    packet = bytes(Segment(1, 1, 1, 0x18, b"x" * 40, protocol=17).build())
    reads = [(bytes(10), packet[:16] + bytes([198, 18, 2 + i % 2, 9]) + packet[20:])
             for i in range(300)]  # fmt: skip
    results = [_tx_run(underlay, codecs, reads, False, True, True) for codecs in ("pure", "native")]
    assert results[1] == results[0] and results[0][1]["tx_packets"] == 256
    results = [
        _tx_run(underlay, codecs, reads, False, True, True, 2) for codecs in ("pure", "native")
    ]
    assert results[1] == results[0] and results[0][1]["tx_packets"] == 300


VXLAN_ARP = b"\x08\0\0\0" + VNI + b"\0" + b"\xff" * 6 + PEER_MAC + b"\x08\x06"


@st.composite
def rx_traffic(draw: st.DrawFn, framing: bool) -> list[tuple[bytes, int, str]]:
    """What the peers send us: (datagram or GSO send, segment size or 0, source), bursts
    of TCP streams (so runs form and are gathered) with damage, junk, empty datagrams,
    sends from a node that is not a peer and, for vxlan, bad headers and ARP requests."""
    from encap import arp
    from tests.helpers import wire

    traffic: list[tuple[bytes, int, str]] = []
    for _ in range(draw(st.integers(1, 5))):
        source = draw(st.sampled_from([wire.PEER_A] * 3 + [wire.PEER_B, wire.STRANGER]))
        packets = draw(streams())
        if not packets or draw(st.booleans()):
            packets.append(bytes(draw(inner_packets())))
        if framing:
            heads = st.sampled_from(
                [VXLAN_HEAD] * 6
                + [
                    b"\x00" + VXLAN_HEAD[1:],
                    VXLAN_HEAD[:20] + b"\x08\x06",
                    VXLAN_HEAD[:6] + b"\x09",
                ]
            )
            packets = [draw(heads) + p for p in packets]
            if draw(st.booleans()):  # who has our VTEP address (or another one)
                target = bytes([198, 18, 2, draw(st.sampled_from([0, 0, 5]))])
                request = arp.build(arp.REQUEST, PEER_MAC, bytes([198, 18, 1, 0]), bytes(6), target)
                packets.insert(draw(st.integers(0, len(packets))), VXLAN_ARP + request)
        packets = [bytearray(p) for p in packets]
        for _ in range(draw(st.integers(0, 3))):
            victim = packets[draw(st.integers(0, len(packets) - 1))]
            if victim:
                victim[draw(st.integers(0, len(victim) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):  # as the sender's GSO sends them, else one by one
            lengths = [len(p) for p in packets]
            for a, b in gso.plan_groups(lengths, [0] * len(packets), 64, 65000):
                traffic.append((b"".join(packets[a:b]), lengths[a] if b - a > 1 else 0, source))
        else:
            traffic += [(bytes(p), 0, source) for p in packets]
        if draw(st.integers(0, 9)) == 0:
            traffic.append((b"", 0, source))
    return traffic


def _rx_run(underlay: Any, codecs: str, traffic: list[tuple[bytes, int, str]], framing: bool,
            offload: bool, vnet: bool, mtu: int) -> Any:  # fmt: skip
    import select

    from tests.helpers.fake_tun import FakeTun
    from tests.helpers.wire import Wire

    tun, link = FakeTun(vnet), Wire(underlay, 8472 if framing else 8285)
    try:
        dp = _dataplane(framing, codecs, tun, link, rx=True, offload=offload, mtu=mtu)
        for data, segment, source in traffic:
            link.queue(data, segment, source)
        receive = dp.on_socket_readable_gro if dp.gro else dp.on_socket_readable
        calls = 0
        while select.select([link.sock], [], [], 0)[0] and calls < 20:
            receive()
            calls += 1
        return (tun.raw_written(), dp.counters.snapshot(), _stats(dp), link.sent(),
                getattr(dp, "arp_replies", None), calls)  # fmt: skip
    finally:
        link.close()
        tun.close()


@pytest.mark.underlay
@given(st.data(), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([0, 0, 1450]))
@FAST
def test_rx_drain_matches_the_reference(
    underlay: Any, data: st.DataObject, framing: bool, offload: bool, vnet: bool, mtu: int
) -> None:
    """The receive callback on the native drain and on the Python reference, for the
    same datagrams from the same senders: the same TUN writes byte for byte, counters,
    drops, batch histograms, peer stats and (vxlan) ARP replies."""
    traffic = data.draw(rx_traffic(framing))
    pure = _rx_run(underlay, "pure", traffic, framing, offload, vnet, mtu)
    assert _rx_run(underlay, "native", traffic, framing, offload, vnet, mtu) == pure


def test_every_native_drop_reason_is_a_reference_one() -> None:
    """The reasons the C code counts are exactly the reference's (metrics export them)."""
    reference = {*gso.RX_DROP_REASONS, *gso.VXLAN_DROP_REASONS, "rx_tun_full", "rx_tun_error"}
    assert set(c.RX_REASONS) == reference


@given(
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 2)), max_size=300),
    st.integers(1, 70),
    st.integers(0, 70000),
)
@FAST
def test_plan_groups_matches_the_reference(
    items: list[tuple[int, int]], max_segments: int, max_bytes: int
) -> None:
    lengths = [n for n, _ in items]
    keys = [("192.0.2.1", 8285 + k) for _, k in items]  # equal, not identical, tuples too
    expected = gso.plan_groups(lengths, keys, max_segments, max_bytes)
    assert c.plan_groups(lengths, keys, max_segments, max_bytes) == expected
    assert c.plan_groups(lengths, keys) == gso.plan_groups(lengths, keys)


# -- hostile arguments: extreme integers, objects that run Python mid-call ------------------
# (The dataplane passes plain ints, tuples and lists it built itself; the module must still
# not read or write outside its buffers, or crash, whatever a caller hands it.)

HUGE = (2**63 - 1, 2**63 - 2, 2**62, -(2**63), -(2**63) + 1)


@pytest.mark.parametrize("value", HUGE)
def test_finish_checksums_regions_at_the_ends_of_ssize_t(value: int) -> None:
    """A field or end near 2**63 once wrapped the bounds check (field + 2 < 0) and
    wrote 2 bytes far outside the buffer (a segfault)."""
    for region in [(0, 20, value), (0, value, 4), (value, 20, 4), (0, value, value)]:
        ours, theirs = bytearray(64), bytearray(64)
        expected = outcome(tso.finish_checksums, ours, [region])
        assert outcome(c.finish_checksums, theirs, [region]) == expected
        assert theirs == ours


class Index:
    """An int-like whose value changes per read and which may run ``hook`` when read."""

    def __init__(self, *values: int, hook: Callable[[], None] | None = None) -> None:
        self.values = list(values)
        self.reads = 0
        self.hook = hook

    def __index__(self) -> int:
        self.reads += 1
        if self.hook is not None:
            self.hook()
        return self.values[min(self.reads, len(self.values)) - 1]


def test_finish_checksums_reads_each_region_once() -> None:
    """Regions were parsed twice (check, then write): a field that is 10 when checked and
    2**62 when used was written outside the buffer."""
    data = bytes(range(64))
    field = Index(10, 2**62)
    buf = bytearray(data)
    c.finish_checksums(buf, [(0, 20, field)])
    reference = bytearray(data)
    tso.finish_checksums(reference, [(0, 20, 10)])
    assert (buf, field.reads) == (reference, 1)


def test_finish_checksums_survives_a_region_that_empties_the_list() -> None:
    regions: list[Any] = []
    regions += [(0, 20, Index(4, hook=regions.clear))] + [(0, 20, 4)] * 8
    c.finish_checksums(bytearray(64), regions)  # a segfault before the fix


def test_finish_checksums_takes_any_region_sequence_as_the_reference() -> None:
    """A region as a list returned NULL without an exception (SystemError)."""
    for regions in ([[0, 20, 4]], ([0, 20, 10],), [range(0, 30, 10)], [[0, 20]], [[0, 1, 2, 3]]):
        ours, theirs = bytearray(range(64)), bytearray(range(64))
        expected = outcome(tso.finish_checksums, ours, list(regions))
        assert outcome(c.finish_checksums, theirs, regions)[0] == expected[0]
        assert theirs == ours
    buf = bytearray(range(64))
    c.finish_checksums(buf, [iter((0, 20, 4))])  # any iterable, as the reference unpacks
    reference = bytearray(range(64))
    tso.finish_checksums(reference, [(0, 20, 4)])
    assert buf == reference


def test_rx_rules_survive_a_subnet_that_empties_the_sources() -> None:
    """The sources list was walked by borrowed items while parsing one ran Python (an
    __index__ that clears the list): a segfault before the fix."""
    for call in (
        lambda s: c.drop_reason(bytearray(40), 0, 20, s, (0, 32)),
        lambda s: c.valid_pieces(bytearray(40), 40, 40, s, (0, 32), Counter()),
        lambda s: c.plan_tun_writes(bytearray(40), 40, 40, s, (0, 32), Counter()),
    ):
        sources: list[Any] = []
        sources += [(1, Index(8, hook=sources.clear))] + [(2, 8)] * 8
        call(sources)


@pytest.mark.parametrize("net", [-(2**64) + 5, 2**64 + 5, 2**32, -1])
def test_rx_subnets_beyond_32_bits_are_refused(net: int) -> None:
    """A network beyond 32 bits was masked to its low 64 (-(2**64) + 5 became 5, so
    packets from 0.0.0.5 passed that the reference counts as foreign)."""
    with pytest.raises(ValueError):
        c.drop_reason(bytearray(40), 0, 20, [(net, 0)], (0, 32))
    with pytest.raises(ValueError):
        c.valid_pieces(bytearray(40), 40, 40, [(0, 32)], (net, 0), Counter())


def test_plan_groups_survives_keys_that_change_the_lists() -> None:
    """Comparing keys runs Python (__eq__), which may empty both lists: their items were
    read through stale pointers after it (a segfault before the fix); now an IndexError,
    as the reference raises."""

    class Key:
        def __eq__(self, other: object) -> bool:
            keys.clear()
            lengths.clear()
            return False

        __hash__ = object.__hash__

    results = []
    for fn in (gso.plan_groups, c.plan_groups):
        lengths = [10] * 50
        keys = [Key() for _ in range(50)]
        results.append(outcome(fn, lengths, keys))
    assert results[1] == results[0] == ("error", "IndexError")


SSIZE = st.integers(-(2**63), 2**63 - 1)


@given(st.lists(st.tuples(st.one_of(SSIZE, st.integers(0, 2000)), st.integers(0, 1))), SSIZE)
@FAST
def test_plan_groups_with_lengths_anywhere_in_ssize_t(
    items: list[tuple[int, int]], max_bytes: int
) -> None:
    """The running total of a group wrapped past 2**63 - 1 and let two huge packets share
    one group; the reference sums without bounds."""
    lengths = [n for n, _ in items]
    keys = [k for _, k in items]
    assert c.plan_groups(lengths, keys, 64, max_bytes) == gso.plan_groups(
        lengths, keys, 64, max_bytes
    )


def test_plan_groups_total_beyond_ssize_t() -> None:
    for lengths, max_bytes in (([2**62, 2**62], 2**63 - 1), ([-(2**62)] * 3, -(2**63))):
        expected = gso.plan_groups(lengths, [0] * 3, 64, max_bytes)
        assert c.plan_groups(lengths, [0] * 3, 64, max_bytes) == expected


@pytest.mark.parametrize("segment", [2**63 - 1, 2**63 - 2, 2**62, 65536])
def test_receive_of_one_datagram_with_any_larger_segment(segment: int) -> None:
    """size + segment - 1 (for the datagram count) wrapped for a segment near 2**63: the
    plan arrays were allocated for 0 datagrams and written anyway (a heap overflow), where
    the reference sees one datagram."""
    packet = bytearray(Segment(1, 1, 1, 0x10, bytes(100)).build())
    planners = ((gso.valid_pieces, c.valid_pieces), (gso.plan_tun_writes, c.plan_tun_writes))
    for pure, fast in planners:
        drops_a: Counter[str] = Counter()
        drops_b: Counter[str] = Counter()
        a = outcome(pure, bytearray(packet), len(packet), segment, [(0, 32)], (0, 32), drops_a)
        b = outcome(fast, bytearray(packet), len(packet), segment, [(0, 32)], (0, 32), drops_b)
        if pure is gso.plan_tun_writes:
            a, b = ("ok", joined(a[1])), ("ok", joined(b[1]))
        assert (b, drops_b) == (a, drops_a)


# -- the drains on hostile dataplanes (objects with the attributes they read) -----------


def _stand_in(tun: socket.socket, headroom: int = 0, arena: int = 1 << 18, **extra: Any) -> Any:
    """An object with the attributes native.Drains reads (tests/overlay/dataplane/test_fastpath.py
    runs them on real dataplanes): every peer routed to one address, sends going into
    an AF_UNIX socket (they fail: nothing leaves)."""
    from types import SimpleNamespace

    from overlay.dataplane.counters import Counters

    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    prefix = bytes(headroom if 0 <= headroom < 64 else 0)
    peer = SimpleNamespace(addr=("192.0.2.2", 8285), prefix=prefix)
    fields: dict[str, Any] = {
        "tun": SimpleNamespace(fd=tun.fileno(), offset=10, vnet_hdr=True),
        "sock": sink,
        "headroom": headroom,
        "tap": None,
        "tso": True,
        "gso": False,
        "_gso_sent": False,
        "gro": True,
        "tun_gso": True,
        "mtu": 0,
        "vxlan_rules": None,
        "_own": (0, 32),
        "peers": SimpleNamespace(routes=[(32, {0: peer})], senders={}),
        "counters": Counters(),
        "_tx_arena": bytearray(arena),
        "_rx_buffer": bytearray(2 * 65535),
        "_no_route": lambda packet: None,
        "_too_big": lambda packet: None,
        "_answer_arp": lambda start, end, source: None,
    }
    fields.update(extra)
    return SimpleNamespace(**fields)


def _partial_udp_reads(kernel: socket.socket, count: int) -> None:
    """``count`` UDP packets behind a NEEDS_CSUM virtio_net_hdr (csum_start 20, offset 6)."""
    packet = bytearray(Segment(1, 1, 1, 0x10, bytes(32), protocol=17).build())
    for _ in range(count):
        kernel.send(struct.pack("=BBHHHH", 1, 0, 0, 0, 20, 6) + packet)


def _tun_pair() -> tuple[socket.socket, socket.socket]:
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    kernel.setblocking(False)
    return kernel, ours


def test_tx_drain_with_a_budget_beyond_memory() -> None:
    """A partial-checksum table of budget * 24 bytes is a size_t product that wraps to 0
    for budget 2**62: every partial checksum would then be written past the allocation."""
    results = []
    for budget in (2**62, 256):
        kernel, ours = _tun_pair()
        try:
            _partial_udp_reads(kernel, 40)
            dp = _stand_in(ours)
            c.Drains(dp, budget).tx()
            results.append((dp.counters.snapshot(), bytes(dp._tx_arena)))
        finally:
            kernel.close()
            ours.close()
    assert results[0] == results[1]
    assert results[0][0]["drops"] == {"tx_send_error": 40}


@pytest.mark.parametrize("headroom", [2**63 - 1, 2**63 - 100, 2**62, -1])
def test_tx_drain_refuses_headroom_beyond_the_arena(headroom: int) -> None:
    """The arena check (size - 2 * 65535 - headroom - 3) must not wrap for a headroom
    near 2**63 (readv would get a pointer 2**63 bytes into the arena)."""
    kernel, ours = _tun_pair()
    try:
        _partial_udp_reads(kernel, 1)
        with pytest.raises(ValueError):
            c.Drains(_stand_in(ours, headroom=headroom, arena=10), 4).tx()
    finally:
        kernel.close()
        ours.close()


def test_callbacks_cannot_resize_a_buffer_the_drains_are_using() -> None:
    """The drains call Python (_no_route, _answer_arp, the drop counts' mapping methods)
    while they hold raw pointers into the arena and the RX buffer; the Py_buffer export
    they hold makes the bytearray refuse to resize."""
    kernel, ours = _tun_pair()
    try:
        _partial_udp_reads(kernel, 3)
        arena = bytearray(1 << 18)
        nowhere = SimpleNamespace(routes=[], senders={})
        dp = _stand_in(ours, _tx_arena=arena, peers=nowhere)
        dp._no_route = lambda packet: arena.extend(bytes(1 << 20))  # would move the arena
        with pytest.raises(BufferError):
            c.Drains(dp, 8).tx()
        assert len(arena) == 1 << 18
    finally:
        kernel.close()
        ours.close()
    buffer = bytearray(2 * 65535)

    class Drops(Counter[str]):
        def __setitem__(self, key: str, value: int) -> None:
            del buffer[:]  # would free the buffer
            super().__setitem__(key, value)

    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        receiver.setblocking(False)
        sender.send(b"not from a peer")  # an AF_UNIX source: no peer's address
        dp = _stand_in(receiver, sock=receiver, _rx_buffer=buffer)
        dp.counters.drops = Drops()
        with pytest.raises(BufferError):
            c.Drains(dp, 8).rx()
        assert len(buffer) == 2 * 65535
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize(
    "change",
    [
        {"peers": SimpleNamespace(routes=[(33, {})], senders={})},
        {"peers": SimpleNamespace(routes=[("x", {})], senders={})},
        {"peers": SimpleNamespace(routes=(), senders={})},
        {
            "peers": SimpleNamespace(
                routes=[(32, {0: SimpleNamespace(addr=("nowhere", 1), prefix=b"")})], senders={}
            )
        },
        {
            "peers": SimpleNamespace(
                routes=[(32, {0: SimpleNamespace(addr="x", prefix=b"")})], senders={}
            )
        },
        {
            "peers": SimpleNamespace(
                routes=[(32, {0: SimpleNamespace(addr=("192.0.2.2", 1), prefix="s")})], senders={}
            )
        },
        {"peers": SimpleNamespace(routes=[], senders=[])},
        {"_tx_arena": b"read-only"},
        {"tun": SimpleNamespace(fd=-1, offset=0, vnet_hdr=False)},
    ],
)
def test_tx_drain_refuses_a_broken_dataplane(change: dict[str, Any]) -> None:
    """Wrong types and values where the dataplane's attributes should be: an exception,
    never a crash or a write outside the arena."""
    kernel, ours = _tun_pair()
    try:
        kernel.send(bytes(10) + bytes(Segment(1, 1, 1, 0x10, b"x").build()))
        with pytest.raises((TypeError, ValueError, OSError, BufferError)):
            c.Drains(_stand_in(ours, **change), 4).tx()
    finally:
        kernel.close()
        ours.close()


@pytest.mark.parametrize(
    "change",
    [
        {"peers": SimpleNamespace(routes=[], senders={0: "not a pair"})},
        {"peers": SimpleNamespace(routes=[], senders={0: (((1, 99),), None)})},
        {"peers": SimpleNamespace(routes=[], senders=None)},
        {"_rx_buffer": bytearray(1000)},
        {"_own": (1, 33)},
        {"vxlan_rules": (b"ab", b"c")},
    ],
)
def test_rx_drain_refuses_a_broken_dataplane(change: dict[str, Any]) -> None:
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        receiver.setblocking(False)
        sender.send(bytes(Segment(1, 1, 1, 0x10, b"x").build()))  # from address 0.0.0.0
        with pytest.raises((TypeError, ValueError)):
            c.Drains(_stand_in(receiver, sock=receiver, **change), 4).rx()
    finally:
        sender.close()
        receiver.close()


# -- vxlan's IPv6 half: segment_tcp6, valid_pieces6, plan_tun_writes6 ----------------------

SRC6 = bytes.fromhex("fd000010000000020000000000000009")  # fd00:10:0:2::9, the peer's pod
DST6 = bytes.fromhex("fd000010000000010000000000000005")  # fd00:10:0:1::5, ours
SOURCES6 = st.lists(
    st.sampled_from(
        [
            (int.from_bytes(SRC6, "big") >> 64, 64),
            (int.from_bytes(SRC6, "big") >> 72, 72),
            (0, 128),
            (int.from_bytes(SRC6, "big"), 0),
            (0xFD00, 112),
            (1, 64),
        ]
    ),
    max_size=3,
)
DESTINATIONS6 = st.sampled_from(
    [(int.from_bytes(DST6, "big") >> 64, 64), (0, 128), (int.from_bytes(DST6, "big"), 0)]
)
SOLICITED = b"\x33\x33\xff\x00\x00\x00"
VXLAN6_RULES = (VNI, MAC, SOLICITED)
VXLAN6_HEAD = b"\x08\0\0\0" + VNI + b"\0" + MAC + bytes(6) + b"\x86\xdd"


def tcp6_packet(payload: bytes, seq: int, flags: int, options: bytes = b"") -> bytearray:
    """An IPv6/TCP packet from SRC6 to DST6 with a complete checksum."""
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH", 40000, 5201, seq, 7, (5 + len(options) // 4) << 4, flags, 512, 0, 0
        )
    )
    tcp += options + payload
    pseudo = SRC6 + DST6 + struct.pack("!IxxxB", len(tcp), 6)
    odd = b"\0" * (len(tcp) % 2)
    total = int.from_bytes(pseudo + tcp + odd, "big") % 0xFFFF
    tcp[16:18] = (~(total or 0xFFFF) & 0xFFFF).to_bytes(2, "big")
    header = struct.pack("!IHBB", 0x60012345, len(tcp), 6, 63) + SRC6 + DST6
    return bytearray(header) + tcp


@st.composite
def super_packets6(draw: st.DrawFn) -> bytes:
    """An IPv6 TCP super-packet as the TUN hands it over with TSO6 (sometimes mutated)."""
    options = draw(st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]))
    flags = draw(st.sampled_from([0x10, 0x18, 0x19, 0x90, 0x11]))
    raw = tcp6_packet(
        draw(st.binary(min_size=1, max_size=3000)), draw(st.integers(0, 2**32 - 1)), flags, options
    )
    raw[56:58] = b"\x12\x34"  # whatever the kernel left: every segment gets a full checksum
    if draw(st.booleans()):
        return mutate(draw, raw, 3, 70)
    return bytes(raw)


@given(
    super_packets6(),
    st.integers(-3, 2000),
    st.sampled_from([b"", bytes(range(22)), b"\xaa" * 3]),
    st.integers(0, 7),
    st.integers(0, 6000),
    st.integers(-2, 2),
)
@FAST
def test_segment_tcp6_matches_the_reference(
    raw: bytes, gso_size: int, prefix: bytes, at: int, slack: int, length_delta: int
) -> None:
    buf = bytearray(os.urandom(at)) + bytearray(len(prefix)) + bytearray(raw)
    buf += bytearray(os.urandom(slack))
    length = len(raw) + length_delta
    ours, theirs = bytearray(buf), bytearray(buf)
    expected = outcome(tso.segment_tcp6, ours, at, length, gso_size, prefix)
    assert outcome(c.segment_tcp6, theirs, at, length, gso_size, prefix) == expected
    assert theirs == ours


def test_segment_tcp6_refuses_what_does_not_fit() -> None:
    for args in [(-1, 60), (0, -5), (10**6, 60), (0, 10**6), (2**62, 2**62), (2**63 - 1, 60)]:
        for fn in (tso.segment_tcp6, c.segment_tcp6):
            with pytest.raises(CodecError):
                fn(bytearray(100), *args, 1400, b"x")
    with pytest.raises(TypeError):
        c.segment_tcp6(b"read-only", 0, 9, 1, b"")


@st.composite
def receives6(draw: st.DrawFn) -> tuple[bytearray, int, int]:
    """A GRO receive on the IPv6 socket: one flow's segments (so runs form), each behind a
    VXLAN head (good, bad, to the solicited-node group), with damage, partial checksums,
    extension headers, neighbour solicitations."""
    mss = draw(st.integers(1, 300))
    count = draw(st.integers(1, 12))
    seq = draw(st.integers(0, 2**32 - 1))
    packets = []
    for i in range(count):
        flags = 0x18 if i == count - 1 else 0x10
        packets.append(
            tcp6_packet(
                draw(st.binary(min_size=mss, max_size=mss)), (seq + i * mss) & 0xFFFFFFFF, flags
            )
        )
    for packet in packets:
        kind = draw(st.integers(0, 9))
        if kind == 1:  # partial checksum: the pseudo-header sum in the field
            length = len(packet) - 40
            pseudo = (int.from_bytes(packet[8:40], "big") + 6 + length) % 0xFFFF
            packet[56:58] = (pseudo or 0xFFFF).to_bytes(2, "big")
        elif kind == 2:  # a corrupt checksum
            packet[57] ^= 0x40
        elif kind == 3:  # a destination-options header in front of TCP
            packet[40:40] = b"\x06\x00" + bytes(6)
            packet[6] = 60
            packet[4:6] = (len(packet) - 40).to_bytes(2, "big")
        elif kind == 4:  # a neighbour solicitation shape (ICMPv6 135, hop limit 255)
            packet[6], packet[7], packet[40] = 58, 255, 135
        elif kind == 5:
            packet[:] = mutate(draw, packet, 3, 60)
    heads = st.sampled_from(
        [VXLAN6_HEAD] * 6
        + [
            b"\x00" + VXLAN6_HEAD[1:],
            VXLAN6_HEAD[:20] + b"\x08\x00",
            VXLAN6_HEAD[:6] + b"\x09" + VXLAN6_HEAD[7:],
            VXLAN6_HEAD[:8] + SOLICITED + VXLAN6_HEAD[14:],
            VXLAN6_HEAD[:8] + b"\x02" * 6 + VXLAN6_HEAD[14:],
        ]
    )
    datagrams = [draw(heads) + bytes(p) for p in packets]
    batches = gro_buffers(datagrams)
    data, size, segment = batches[draw(st.integers(0, len(batches) - 1))]
    if draw(st.booleans()):
        size = draw(st.integers(0, size))  # a cut-off last datagram
    data += bytearray(draw(st.integers(0, 64)))
    return data, size, segment


@given(receives6(), SOURCES6, DESTINATIONS6, st.sampled_from([0, 0, 200, 1450]))
@FAST
def test_ipv6_receive_rules_match_the_reference(
    receive: tuple[bytearray, int, int],
    sources: list[tuple[int, int]],
    destination: tuple[int, int],
    mtu: int,
) -> None:
    data, size, segment = receive
    ours, theirs = bytearray(data), bytearray(data)
    drops_a: Counter[str] = Counter()
    drops_b: Counter[str] = Counter()
    ndp_a: list[int] = []
    ndp_b: list[int] = []
    args_a = (size, segment, sources, destination, drops_a, VXLAN6_RULES, ndp_a)
    args_b = (size, segment, sources, destination, drops_b, VXLAN6_RULES, ndp_b)
    a = outcome(ipv6.valid_pieces6, ours, *args_a)
    assert outcome(c.valid_pieces6, theirs, *args_b) == a
    assert (drops_b, ndp_b) == (drops_a, ndp_a)
    assert theirs == ours
    if a[0] == "ok":  # then the writes of what passed
        planned = outcome(ipv6.plan_tun_writes6, ours, a[1], mtu)
        assert planned[0] == "ok"
        assert joined(c.plan_tun_writes6(theirs, a[1], mtu)) == joined(planned[1])


@given(
    st.binary(max_size=3000),
    st.lists(st.tuples(st.integers(-2, 3100), st.integers(-2, 3100)), max_size=8),
    st.integers(-2, 2000),
    st.integers(-2, 3100),
    st.integers(-2, 1600),
    SOURCES6,
)
@FAST
def test_ipv6_receive_rules_on_random_bytes(
    data: bytes,
    pieces: list[tuple[int, int]],
    mtu: int,
    size: int,
    segment: int,
    sources: list[tuple[int, int]],
) -> None:
    ours, theirs = bytearray(data), bytearray(data)
    drops_a: Counter[str] = Counter()
    drops_b: Counter[str] = Counter()
    a = outcome(
        ipv6.valid_pieces6, ours, size, segment, sources, (0, 128), drops_a, VXLAN6_RULES, []
    )
    b = outcome(
        c.valid_pieces6, theirs, size, segment, sources, (0, 128), drops_b, VXLAN6_RULES, []
    )
    assert b == a and drops_b == drops_a and theirs == ours
    a = outcome(ipv6.plan_tun_writes6, ours, pieces, mtu)
    b = outcome(c.plan_tun_writes6, theirs, pieces, mtu)
    if a[0] == "ok":
        a, b = ("ok", joined(a[1])), ("ok", joined(b[1]))
    assert b == a


def test_ipv6_bad_arguments_are_errors_not_crashes() -> None:
    buf = bytearray(200)
    for call in (
        lambda: c.valid_pieces6(buf, 201, 10, [], (0, 128), Counter(), VXLAN6_RULES, []),
        lambda: c.valid_pieces6(
            bytearray(70000), 70000, 10, [], (0, 128), Counter(), VXLAN6_RULES, []
        ),
        lambda: c.valid_pieces6(buf, 50, 10, [(1, 129)], (0, 128), Counter(), VXLAN6_RULES, []),
        lambda: c.valid_pieces6(buf, 50, 10, [(-1, 8)], (0, 128), Counter(), VXLAN6_RULES, []),
        lambda: c.valid_pieces6(buf, 50, 10, [(2**128, 0)], (0, 128), Counter(), VXLAN6_RULES, []),
        lambda: c.valid_pieces6(buf, 50, 10, [], (0, 128), Counter(), (VNI, MAC), []),
        lambda: c.valid_pieces6(buf, 50, 10, [], (0, 128), Counter(), VXLAN6_RULES, "ndp"),
        lambda: c.valid_pieces6(b"bytes", 5, 5, [], (0, 128), Counter(), VXLAN6_RULES, []),
        lambda: c.plan_tun_writes6(buf, [(0, 201)], 0),
        lambda: c.plan_tun_writes6(buf, [(10, 49)], 0),  # shorter than an IPv6 header
        lambda: c.plan_tun_writes6(buf, [(-1, 100)], 0),
        lambda: c.plan_tun_writes6(buf, [(2**63 - 1, 2**63 - 1)], 0),
        lambda: c.plan_tun_writes6(buf, [(0,)], 0),
    ):
        with pytest.raises((ValueError, TypeError)):
            call()
