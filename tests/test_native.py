"""encap._native against the pure-Python reference (encap.tso, encap.gso): the same
results, the same exceptions and reasons, the same counts and the same bytes left in the
buffer, on random, malformed and hostile input (hypothesis). The reference itself is
checked against scapy in test_encap_tso.py, test_encap_rx.py and test_fastpath.py."""

from __future__ import annotations

import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encap import gso, native, tso
from encap.errors import CodecError
from tests.mutation import mutate
from tests.test_fastpath import Segment, gro_buffers, reseal, streams

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
    for _ in range(draw(st.integers(0, 4))):
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
        lambda: c.deliver(-1, buf, 50, 10, [], (0, 32), Counter(), None, "arp"),  # not a list
    ):
        with pytest.raises((ValueError, TypeError)):
            call()


class Tun:
    """A TUN stand-in for deliver's writes: a SOCK_SEQPACKET pair keeps write boundaries."""

    def __init__(self, buffer: int = 1 << 22) -> None:
        self.kernel, self.ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        self.kernel.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        self.ours.setblocking(False)
        self.kernel.setblocking(False)

    def written(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.kernel.recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.kernel.close()
        self.ours.close()


@given(receives(), SOURCES, st.sampled_from([0, 1450]), st.booleans(), st.booleans())
@FAST
def test_deliver_writes_what_the_reference_plans(
    receive: tuple[bytearray, int, int, tuple[bytes, bytes] | None],
    sources: list[tuple[int, int]],
    mtu: int,
    coalesce: bool,
    vnet: bool,
) -> None:
    data, size, segment, vxlan = receive
    ours, theirs = bytearray(data), bytearray(data)
    drops_a: Counter[str] = Counter()
    drops_b: Counter[str] = Counter()
    arp_a: list[int] = []
    arp_b: list[int] = []
    if coalesce and vnet:
        writes = joined(
            gso.plan_tun_writes(ours, size, segment, sources, (0, 32), drops_a, vxlan, arp_a, mtu)
        )
    else:
        pieces = gso.valid_pieces(ours, size, segment, sources, (0, 32), drops_a, vxlan, arp_a)
        head = bytes(10) if vnet else b""
        writes = [(head + bytes(ours[a:b]), 1, b - a) for a, b in pieces]
    tun = Tun()
    try:
        counts = c.deliver(
            tun.ours.fileno(), theirs, size, segment, sources, (0, 32), drops_b, vxlan, arp_b,
            mtu, coalesce, vnet,
        )  # fmt: skip
        assert tun.written() == [w for w, _, _ in writes]
    finally:
        tun.close()
    supers = sum(n > 1 for _, n, _ in writes)
    assert counts == (sum(n for _, n, _ in writes), sum(s for _, _, s in writes), supers)
    assert (drops_b, arp_b) == (drops_a, arp_a)
    assert theirs == ours


def test_deliver_counts_a_full_or_broken_tun() -> None:
    packets = [Segment(1, 1 + 1000 * i, 1, 0x11, bytes(1000)).build() for i in range(40)]
    [(data, size, segment)] = gro_buffers(packets)
    tun = Tun(buffer=4096)  # room for a couple of writes, then EAGAIN
    try:
        drops: Counter[str] = Counter()
        packets_written, _, _ = c.deliver(
            tun.ours.fileno(), data, size, segment, [(0, 32)], (0, 32), drops
        )
        assert 0 < packets_written < 40 and drops == {"rx_tun_full": 40 - packets_written}
    finally:
        tun.close()
    drops = Counter()
    assert c.deliver(-1, data, size, segment, [(0, 32)], (0, 32), drops) == (0, 0, 0)
    assert drops == {"rx_tun_error": 40}


# -- TX: the whole TUN drain (read_tun) against the dataplane's reference loop ------------

PEER_MAC = bytes.fromhex("02aabbccdd01")


def _tx_dataplane(vxlan_framing: bool, codecs: str, tun: Any, sock: Any) -> Any:
    from ipaddress import IPv4Address, IPv4Network

    from control.lease import Lease
    from control.peer_table import PeerTable
    from overlay.backends.udp import UdpDataplane
    from overlay.backends.userspace import vxlan_prefix_for
    from overlay.backends.vxlan import VxlanDataplane
    from overlay.counters import Counters

    own = IPv4Network("198.18.1.0/24")
    data = {"VNI": 1, "VtepMAC": PEER_MAC.hex(":")}
    leases = [
        Lease(IPv4Network("198.18.2.0/24"), IPv4Address("192.0.2.2"), "vxlan", data),
        Lease(IPv4Network("198.18.3.0/24"), IPv4Address("192.0.2.3"), "vxlan", data),
        Lease(IPv4Network("198.18.4.0/24"), IPv4Address("192.0.2.4"), "vxlan", {}),  # no MAC
    ]
    if vxlan_framing:
        peers = PeerTable(8472, vxlan_prefix_for(1, MAC))
        dp = VxlanDataplane(
            tun, sock, peers, own, Counters(), tun_tso=True,
            vni=1, mac=MAC, vtep_ip=own.network_address.packed, port=8472,
        )  # fmt: skip
    else:
        peers = PeerTable(8285)
        dp = UdpDataplane(tun, sock, peers, own, Counters(), tun_tso=True)
    for lease in leases:
        peers.upsert(lease)
    dp.native = codecs == "native"
    return dp


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


@given(st.lists(tun_reads(), max_size=12), st.booleans())
@FAST
def test_read_tun_matches_the_reference_loop(
    reads: list[tuple[bytes, bytes]], framing: bool
) -> None:
    from tests.test_fastpath import FakeSocket, FakeTun

    results = []
    for codecs in ("pure", "native"):
        tun, sock = FakeTun(True), FakeSocket()
        dp = _tx_dataplane(framing, codecs, tun, sock)
        for vnet, packet in reads:
            tun.inject(packet, vnet)
        dp.on_tun_readable()
        stats = {str(p.lease.subnet): p.stats.tx_packets for p in dp.peers.peers()}
        results.append((sock.datagrams(), dict(dp.counters.drops), dp.counters.tx_packets,
                        dp.counters.tx_tun_super_packets, stats, tun.written()))  # fmt: skip
    assert results[1] == results[0]


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
        lambda s: c.deliver(-1, bytearray(40), 40, 40, s, (0, 32), Counter()),
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
    drops: Counter[str] = Counter()
    counts = c.deliver(-1, bytearray(packet), len(packet), segment, [(0, 32)], (0, 32), drops)
    assert (counts, drops) == ((0, 0, 0), {"rx_tun_error": 1})


class _Peer:
    def __init__(self, prefix: bytes) -> None:
        self.addr = ("192.0.2.2", 8285)
        self.prefix = prefix


def _partial_udp_reads(tun: Tun, count: int) -> None:
    """``count`` UDP packets behind a NEEDS_CSUM virtio_net_hdr (csum_start 20, offset 6)."""
    packet = bytearray(Segment(1, 1, 1, 0x10, bytes(32), protocol=17).build())
    for _ in range(count):
        tun.kernel.send(struct.pack("=BBHHHH", 1, 0, 0, 0, 20, 6) + packet)


def _read_tun(tun: Tun, arena: bytearray, headroom: int, budget: int, limit: int) -> Any:
    peer = _Peer(bytes(headroom) if headroom < 100 else b"")
    drops: list[str] = []
    result = c.read_tun(
        tun.ours.fileno(), arena, True, headroom, budget, limit, True,
        lambda dst: peer, {}, lambda packet: None, lambda reason, at, n: drops.append(reason),
    )  # fmt: skip
    return result, drops


def test_read_tun_with_a_budget_beyond_memory() -> None:
    """The partial-checksum table was budget * 24 bytes, a size_t product that wraps to 0
    for budget 2**62: every partial checksum was then written past a 1-byte allocation
    (ASan: heap-buffer-overflow)."""
    results = []
    for budget in (2**62, 256):
        tun = Tun()
        try:
            _partial_udp_reads(tun, 40)
            arena = bytearray(1 << 18)
            results.append((_read_tun(tun, arena, 0, budget, len(arena) - 2 * 65535 - 3), arena))
        finally:
            tun.close()
    assert results[0] == results[1]
    assert len(results[0][0][0][0]) == 40


@pytest.mark.parametrize("headroom", [2**63 - 1, 2**63 - 100, 2**62])
def test_read_tun_refuses_headroom_beyond_the_arena(headroom: int) -> None:
    """The arena check (size - 2 * 65535 - headroom - 3) wrapped for a headroom near
    2**63 and passed: readv got a pointer 2**63 bytes into the arena (EINVAL from the
    kernel, by luck of the iovec length)."""
    tun = Tun()
    try:
        _partial_udp_reads(tun, 1)
        with pytest.raises(ValueError):
            _read_tun(tun, bytearray(10), headroom, 4, 0)
    finally:
        tun.close()


def test_callbacks_cannot_resize_a_buffer_the_module_is_using() -> None:
    """read_tun calls Python (lookup, no_route, drop) and the receive calls write drop
    counts through a mapping's methods while they hold raw pointers into the arena / RX
    buffer; the Py_buffer export they hold makes the bytearray refuse to resize."""
    tun = Tun()
    try:
        _partial_udp_reads(tun, 3)
        arena = bytearray(1 << 18)

        def lookup(dst: bytes) -> None:
            arena.extend(bytes(1 << 20))  # would move the arena

        with pytest.raises(BufferError):
            c.read_tun(
                tun.ours.fileno(), arena, True, 0, 8, len(arena) - 2 * 65535 - 3, True,
                lookup, {}, lambda packet: None, lambda reason, at, n: None,
            )  # fmt: skip
        assert len(arena) == 1 << 18
    finally:
        tun.close()

    data = bytearray(100)

    class Drops(Counter[str]):
        def __setitem__(self, key: str, value: int) -> None:
            del data[:]  # would free the buffer
            super().__setitem__(key, value)

    for call in (
        lambda: c.valid_pieces(data, 100, 50, [(0, 32)], (0, 32), Drops()),
        lambda: c.plan_tun_writes(data, 100, 50, [(0, 32)], (0, 32), Drops()),
        lambda: c.deliver(-1, data, 100, 50, [(0, 32)], (0, 32), Drops()),
    ):
        with pytest.raises(BufferError):
            call()
        assert len(data) == 100
