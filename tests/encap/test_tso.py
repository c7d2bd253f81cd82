"""encap.tso (TSO segmentation and checksum completion) against scapy as the oracle."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP

from encap import tso
from encap.errors import CodecError

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PREFIXES = st.sampled_from([b"", bytes(range(22)), b"\xaa" * 7])


def super_packet(payload: bytes, flags: str, seq: int, ip_id: int, options: bool) -> IP:
    tcp_options = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))] if options else []
    return (
        IP(src="10.5.1.2", dst="10.5.2.3", id=ip_id, ttl=63, flags="DF")
        / TCP(
            sport=40000, dport=5201, seq=seq, ack=77, flags=flags, window=512, options=tcp_options
        )
        / payload
    )


def expected_segments(packet: IP, gso_size: int) -> list[bytes]:
    """The segments Linux's tcp_gso_segment would emit, built field by field by scapy."""
    payload = bytes(packet[TCP].payload)
    flags = int(packet[TCP].flags)
    pieces = [payload[i : i + gso_size] for i in range(0, len(payload), gso_size)]
    out = []
    for i, piece in enumerate(pieces):
        seg_flags = flags
        if i:
            seg_flags &= ~0x80
        if i < len(pieces) - 1:
            seg_flags &= ~0x09
        ip = packet.copy()
        ip.remove_payload()
        ip.id = (packet.id + i) & 0xFFFF
        del ip.len, ip.chksum
        tcp = packet[TCP].copy()
        tcp.remove_payload()
        tcp.seq = (packet[TCP].seq + i * gso_size) & 0xFFFFFFFF
        tcp.flags = seg_flags
        del tcp.chksum
        out.append(bytes(ip / tcp / piece))
    return out


def run_segment(raw: bytes, gso_size: int, prefix: bytes, slack: int = 4096) -> list[bytes]:
    buf = bytearray(len(prefix)) + bytearray(raw) + bytearray(slack)
    count, stride, last = tso.segment_tcp4(buf, 0, len(raw), gso_size, prefix)
    headers = len(raw) - len(bytes(IP(raw)[TCP].payload))
    assert stride == len(prefix) + headers + gso_size
    segments = []
    for i in range(count):
        size = stride if i < count - 1 else last
        datagram = bytes(buf[i * stride : i * stride + size])
        assert datagram[: len(prefix)] == prefix
        segments.append(datagram[len(prefix) :])
    return segments


@FAST
@given(
    payload=st.binary(min_size=1, max_size=6000),
    gso_size=st.integers(1, 1500),
    flags=st.sampled_from(["A", "PA", "FA", "FPA", "CA", "CPA", "S"]),
    seq=st.integers(0, 2**32 - 1),
    ip_id=st.integers(0, 0xFFFF),
    options=st.booleans(),
    prefix=PREFIXES,
)
@example(b"x" * 4001, 1448, "PA", 2**32 - 5, 0xFFFF, True, b"")  # odd tail, wraps
@example(b"y" * 4000, 1001, "FPA", 0, 1, False, b"")  # odd gso_size: int.from_bytes path
def test_segments_match_scapy(
    payload: bytes, gso_size: int, flags: str, seq: int, ip_id: int, options: bool, prefix: bytes
) -> None:
    packet = super_packet(payload, flags, seq, ip_id, options)
    raw = bytes(packet)
    raw = raw[:10] + b"\x00\x00" + raw[12:]  # the IP checksum of a super-packet is ignored
    assert run_segment(raw, gso_size, prefix) == expected_segments(packet, gso_size)


def test_partial_checksum_field_is_ignored() -> None:
    """The kernel leaves the pseudo-header sum in the TCP checksum field; it is replaced."""
    packet = super_packet(b"z" * 3000, "PA", 1, 2, True)
    raw = bytearray(bytes(packet))
    struct.pack_into("!H", raw, 20 + 16, 0x1234)
    assert run_segment(bytes(raw), 1400, b"") == expected_segments(packet, 1400)


@pytest.mark.parametrize(
    ("raw", "gso_size", "reason"),
    [
        (bytes(IP(dst="10.5.2.3") / UDP() / (b"u" * 100)), 50, "gso_not_tcp4"),
        (bytes(IP(dst="10.5.2.3", flags="MF") / TCP() / (b"t" * 100)), 50, "gso_fragment"),
        (bytes(IP(dst="10.5.2.3") / TCP() / (b"t" * 100)), 0, "gso_bad_size"),
        (bytes(IP(dst="10.5.2.3") / TCP()), 10, "gso_bad_headers"),
        (b"\x45" + bytes(30), 10, "gso_not_tcp4"),
    ],
)
def test_bad_super_packets_are_refused(raw: bytes, gso_size: int, reason: str) -> None:
    with pytest.raises(CodecError) as caught:
        run_segment(raw, gso_size, b"")
    assert caught.value.reason == reason


def test_no_room_is_refused_before_writing() -> None:
    raw = bytes(super_packet(b"q" * 3000, "A", 0, 0, False))
    buf = bytearray(raw) + bytearray(10)
    before = bytes(buf)
    with pytest.raises(CodecError) as caught:
        tso.segment_tcp4(buf, 0, len(raw), 100, b"")
    assert caught.value.reason == "gso_no_room"
    assert bytes(buf) == before


@FAST
@given(st.binary(max_size=3000), st.booleans(), st.binary(max_size=30))
def test_bad_input_raises_codec_error_only(raw: bytes, odd: bool, junk: bytes) -> None:
    buf = bytearray(raw) + bytearray(70000)
    try:
        tso.segment_tcp4(buf, 0, len(raw), 1 + len(junk) * 7 + odd, junk)
    except CodecError:
        pass


def partial_packet(payload: bytes, udp: bool, sport: int) -> tuple[bytes, bytes]:
    """(what the kernel hands us with NEEDS_CSUM: the pseudo-header sum in the field,
    the packet as it must leave)."""
    layer = UDP(sport=sport, dport=5201) if udp else TCP(sport=sport, dport=2, flags="PA")
    want = bytes(IP(src="10.5.1.2", dst="10.5.2.3") / layer / payload)
    field = 20 + (6 if udp else 16)
    pseudo = sum(struct.unpack("!4H", want[12:20])) + (17 if udp else 6) + len(want) - 20
    pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    partial = bytearray(want)
    struct.pack_into("!H", partial, field, (pseudo & 0xFFFF) + (pseudo >> 16))
    return bytes(partial), want


@FAST
@given(
    st.lists(
        st.tuples(st.binary(max_size=1600), st.booleans(), st.integers(0, 3)),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, 3),
)
def test_finish_checksums_matches_scapy(packets: list[tuple[bytes, bool, int]], lead: int) -> None:
    """Packets back to back at any alignment (gaps of 0-3 bytes), as in the TX arena."""
    buf = bytearray(lead)
    regions, wanted = [], []
    for i, (payload, udp, gap) in enumerate(packets):
        partial, want = partial_packet(payload, udp, 1000 + i)
        at = len(buf)
        buf += partial + bytes(gap)
        regions.append(tso.partial_region(at, len(partial), 20, 6 if udp else 16))
        wanted.append((at, want))
    tso.finish_checksums(buf, regions)
    for at, want in wanted:
        assert bytes(buf[at : at + len(want)]) == want


def test_partial_region_refuses_offsets_outside_the_packet() -> None:
    with pytest.raises(CodecError):
        tso.partial_region(0, 40, 20, 19)  # the field would end past the packet
    with pytest.raises(CodecError):
        tso.partial_region(0, 40, 0, 6)  # a region that would include the IP header
    assert tso.partial_region(100, 40, 20, 16) == (120, 140, 136)
