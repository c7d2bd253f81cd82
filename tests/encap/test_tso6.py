"""encap.tso.segment_tcp6 (the TUN's TSO6 super-packets cut into segments) and
encap.ipv6.plan_tun_writes6 (received segments coalesced into GSO_TCPV6 writes), against
scapy as the oracle: each segment built field by field by scapy, checksums verified by
scapy, the segments reassembled into the original byte stream."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt

from encap import ipv6, native, tso
from encap.errors import CodecError
from tests.helpers.tcp_streams import resegment

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PREFIXES = st.sampled_from([b"", bytes(range(22)), b"\xaa" * 7])
SRC, DST = "fd00:10:0:1::5", "fd00:10:0:2::9"


def _native_cut(*args: object) -> tuple[int, int, int]:
    return native.module().segment_tcp6(*args)  # type: ignore[no-any-return]


# The reference and the C twin, each against scapy (test_native.py compares them too).
BOTH = pytest.mark.parametrize(
    "segment_tcp6", [tso.segment_tcp6, _native_cut], ids=["pure", "native"]
)


def super_packet(payload: bytes, flags: str, seq: int, options: bool, tc: int = 0) -> IPv6:
    tcp_options = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))] if options else []
    return (
        IPv6(src=SRC, dst=DST, hlim=63, tc=tc, fl=0x12345)
        / TCP(
            sport=40000, dport=5201, seq=seq, ack=77, flags=flags, window=512, options=tcp_options
        )
        / payload
    )


def expected_segments(packet: IPv6, gso_size: int) -> list[bytes]:
    """The segments Linux's tcp_gso_segment over IPv6 would emit, built by scapy."""
    payload = bytes(packet[TCP].payload)
    flags = int(packet[TCP].flags)
    pieces = [payload[i : i + gso_size] for i in range(0, len(payload), gso_size)]
    out = []
    for i, piece in enumerate(pieces):
        seg_flags = flags
        if i:
            seg_flags &= ~0x80  # CWR only on the first
        if i < len(pieces) - 1:
            seg_flags &= ~0x09  # FIN and PSH only on the last
        ip = packet.copy()
        ip.remove_payload()
        del ip.plen
        tcp = packet[TCP].copy()
        tcp.remove_payload()
        tcp.seq = (packet[TCP].seq + i * gso_size) & 0xFFFFFFFF
        tcp.flags = seg_flags
        del tcp.chksum
        out.append(bytes(ip / tcp / piece))
    return out


def run_segment(cut: object, raw: bytes, gso_size: int, prefix: bytes) -> list[bytes]:
    buf = bytearray(len(prefix)) + bytearray(raw) + bytearray(4096)
    buf[len(prefix) : len(prefix) + len(raw)] = raw
    count, stride, last = cut(buf, 0, len(raw), gso_size, prefix)  # type: ignore[operator]
    headers = len(raw) - len(bytes(IPv6(raw)[TCP].payload))
    assert stride == len(prefix) + headers + gso_size
    segments = []
    for i in range(count):
        size = stride if i < count - 1 else last
        datagram = bytes(buf[i * stride : i * stride + size])
        assert datagram[: len(prefix)] == prefix
        segments.append(datagram[len(prefix) :])
    return segments


def checksum_ok(segment: bytes) -> bool:
    """scapy's own verdict: the TCP checksum it computes equals the one carried."""
    parsed = IPv6(segment)
    carried = parsed[TCP].chksum
    del parsed[TCP].chksum
    return bool(IPv6(bytes(parsed))[TCP].chksum == carried)


@BOTH
@FAST
@given(
    payload=st.binary(min_size=1, max_size=6000),
    gso_size=st.integers(1, 1500),
    flags=st.sampled_from(["A", "PA", "FA", "FPA", "CA", "CPA", "S"]),
    seq=st.integers(0, 2**32 - 1),
    options=st.booleans(),
    prefix=PREFIXES,
)
@example(b"x" * 4001, 1370, "PA", 2**32 - 5, True, bytes(range(22)))  # odd tail, wraps
@example(b"y" * 4000, 1001, "CFPA", 0, False, b"")  # odd gso_size; CWR first, FIN/PSH last
def test_segments_match_scapy(
    segment_tcp6: object,
    payload: bytes,
    gso_size: int,
    flags: str,
    seq: int,
    options: bool,
    prefix: bytes,
) -> None:
    packet = super_packet(payload, flags, seq, options)
    raw = bytearray(bytes(packet))
    struct.pack_into("!H", raw, 40 + 16, 0x1234)  # the kernel's partial sum: replaced
    segments = run_segment(segment_tcp6, bytes(raw), gso_size, prefix)
    assert segments == expected_segments(packet, gso_size)
    assert all(checksum_ok(s) for s in segments)
    assert b"".join(bytes(IPv6(s)[TCP].payload) for s in segments) == payload
    assert all(IPv6(s).plen == len(s) - 40 for s in segments)


@BOTH
@pytest.mark.parametrize(
    ("raw", "gso_size", "reason"),
    [
        (bytes(IPv6(dst=DST) / UDP() / (b"u" * 100)), 50, "gso_not_tcp6"),
        (bytes(IPv6(dst=DST) / IPv6ExtHdrDestOpt() / TCP() / (b"t" * 100)), 50, "gso_not_tcp6"),
        (bytes(IPv6(dst=DST) / TCP() / (b"t" * 100)), 0, "gso_bad_size"),
        (bytes(IPv6(dst=DST) / TCP() / (b"t" * 100)), 0x10000, "gso_bad_size"),
        (bytes(IPv6(dst=DST) / TCP()), 10, "gso_bad_headers"),
        (bytes(IPv6(dst=DST) / TCP(dataofs=15)) + bytes(30), 10, "gso_bad_headers"),
        (b"\x60" + bytes(50), 10, "gso_not_tcp6"),
        (b"\x45" + bytes(70), 10, "gso_not_tcp6"),
    ],
)
def test_bad_super_packets_are_refused(
    segment_tcp6: object, raw: bytes, gso_size: int, reason: str
) -> None:
    with pytest.raises(CodecError) as caught:
        run_segment(segment_tcp6, raw, gso_size, b"")
    assert caught.value.reason == reason


@BOTH
def test_no_room_is_refused_before_writing(segment_tcp6: object) -> None:
    raw = bytes(super_packet(b"q" * 3000, "A", 0, False))
    buf = bytearray(raw) + bytearray(10)
    before = bytes(buf)
    with pytest.raises(CodecError) as caught:
        segment_tcp6(buf, 0, len(raw), 100, b"")  # type: ignore[operator]
    assert caught.value.reason == "gso_no_room"
    assert bytes(buf) == before


@BOTH
def test_a_range_outside_the_buffer_is_refused(segment_tcp6: object) -> None:
    raw = bytes(super_packet(b"q" * 300, "A", 0, False))
    for at, length in ((-1, len(raw)), (0, len(raw) + 1), (10**6, 10)):
        with pytest.raises(CodecError) as caught:
            segment_tcp6(bytearray(raw), at, length, 100, b"")  # type: ignore[operator]
        assert caught.value.reason == "gso_bad_length"


# -- receive: plan_tun_writes6 ------------------------------------------------------------


def flow_segments(payload: bytes, mss: int, seq: int, last_flags: str = "PA") -> list[bytes]:
    """A TCP flow's segments as a peer sends them (every checksum complete)."""
    packet = super_packet(payload, last_flags, seq, options=True)
    return expected_segments(packet, mss)


def planned(packets: list[bytes], mtu: int = 1430) -> tuple[list[bytes], list[int]]:
    """(what the kernel makes of the planned writes, each write's packet count)."""
    data = bytearray(b"".join(packets))
    pieces, at = [], 0
    for p in packets:
        pieces.append((at, at + len(p)))
        at += len(p)
    writes = ipv6.plan_tun_writes6(data, pieces, mtu)
    out: list[bytes] = []
    for buffers, _, _ in writes:
        out += resegment(buffers)
    return out, [count for _, count, _ in writes]


@FAST
@given(
    payload=st.binary(min_size=1, max_size=100000),
    mss=st.integers(100, 1358),  # 1430-byte packets with the 72 bytes of headers
    seq=st.integers(0, 2**32 - 1),
)
@example(b"z" * 90000, 1358, 2**32 - 3000)  # more than 64 segments: two runs
def test_a_flow_coalesces_into_super_packets_that_resegment_to_the_original(
    payload: bytes, mss: int, seq: int
) -> None:
    segments = flow_segments(payload, mss, seq)
    out, counts = planned(segments)
    assert out == segments
    assert sum(counts) == len(segments)
    assert max(counts) <= ipv6.MAX_RUN
    assert len(segments) == 1 or max(counts) > 1  # coalesced, not written as they came
    assert all(checksum_ok(s) for s in out)


def test_what_breaks_a_run_is_written_as_it_came() -> None:
    a = flow_segments(b"a" * 4000, 1000, 100, "A")  # 4 segments, ACK only
    gap = flow_segments(b"b" * 2000, 1000, 100 + 4000 + 1, "A")  # a hole in the sequence
    other = bytes(
        IPv6(src=SRC, dst=DST, hlim=63) / TCP(sport=1, dport=2, flags="A", seq=5) / (b"c" * 1000)
    )
    udp = bytes(IPv6(src=SRC, dst=DST) / UDP(sport=1, dport=2) / b"u")
    syn = bytes(IPv6(src=SRC, dst=DST) / TCP(flags="S"))
    packets = a + gap + [other, udp, syn]
    out, counts = planned(packets)
    assert out == packets
    assert counts == [4, 2, 1, 1, 1]


def test_a_tcp_packet_longer_than_the_mtu_goes_in_as_a_super_packet() -> None:
    """A kernel peer's TSO packet that crossed only veths (the kernel cuts it)."""
    big = bytes(super_packet(b"k" * 5000, "PA", 9, options=False))
    out, counts = planned([big], mtu=1430)
    assert out == expected_segments(IPv6(big), 1430 - 60)
    assert counts == [1]
