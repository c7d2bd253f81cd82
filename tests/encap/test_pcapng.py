"""encap.pcapng against independent readers: scapy's PcapNgReader and tshark, plus
hypothesis on random packets, comments, timestamps and lengths."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.utils import PcapNgReader, RawPcapNgReader

from encap import pcapng

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

packets = st.lists(
    st.tuples(
        st.integers(0, 1),  # interface
        st.integers(0, (1 << 63) - 1),  # timestamp in ns
        st.binary(max_size=300),
        st.integers(0, 5000),  # bytes cut by the snap length
        st.one_of(st.none(), st.text(max_size=80)),
        st.sampled_from([None, "in", "out"]),
    ),
    max_size=12,
)


def _file(items: list[tuple[int, int, bytes, int, str | None, str | None]]) -> bytes:
    out = pcapng.section_header(application="test", os="Linux")
    out += pcapng.interface_description(snaplen=0, name="flannel0", description="inner")
    out += pcapng.interface_description(snaplen=65535, name="eth0")
    for interface, ts, data, cut, comment, direction in items:
        out += pcapng.enhanced_packet(
            interface,
            ts,
            data,
            original_length=len(data) + cut,
            comment=comment,
            direction=direction,  # type: ignore[arg-type]
        )
    out += pcapng.interface_statistics(0, 10**18, received=len(items), dropped=3, start_ns=5)
    return out


@given(packets)
@FAST
def test_scapy_reads_back_every_packet(items: list) -> None:
    blob = _file(items)
    assert len(blob) % 4 == 0
    read = list(RawPcapNgReader(io.BytesIO(blob)))
    assert len(read) == len(items)
    for (data, meta), (interface, ts, sent, cut, comment, direction) in zip(
        read, items, strict=True
    ):
        assert data == sent
        assert meta.linktype == pcapng.LINKTYPE_RAW and meta.tsresol == 10**9
        assert meta.tshigh << 32 | meta.tslow == ts
        assert meta.wirelen == len(sent) + cut
        assert meta.direction == {None: None, "in": 1, "out": 2}[direction]
        assert meta.comments == ([comment.encode()] if comment else None)
        assert meta.ifname == (b"flannel0" if interface == 0 else b"eth0")


def test_scapy_decodes_the_packets_as_ipv4() -> None:
    inner = bytes(IP(src="198.18.1.2", dst="198.18.2.3") / UDP(sport=1, dport=2) / b"hi")
    blob = _file([(0, 1, inner, 0, "c", "out")])
    (packet,) = list(PcapNgReader(io.BytesIO(blob)))
    assert packet[IP].src == "198.18.1.2" and packet[UDP].dport == 2
    assert packet.sniffed_on == "flannel0" and packet.comments == [b"c"]


@given(packets, st.integers(1, 97))
@FAST
def test_block_reader_splits_a_stream_cut_anywhere(items: list, step: int) -> None:
    blob = _file(items)
    reader = pcapng.BlockReader()
    blocks = []
    for at in range(0, len(blob), step):
        blocks += reader.feed(blob[at : at + step])
    kinds = [kind for kind, _ in blocks]
    assert kinds == [pcapng.BLOCK_SHB, pcapng.BLOCK_IDB, pcapng.BLOCK_IDB] + [
        pcapng.BLOCK_EPB
    ] * len(items) + [pcapng.BLOCK_ISB]
    assert b"".join(block for _, block in blocks) == blob
    for (_, block), (interface, ts, data, cut, comment, _d) in zip(blocks[3:], items, strict=False):
        got = pcapng.parse_packet(block)
        assert got[:4] == (interface, ts, data, len(data) + cut)
        if comment:
            assert got[4][pcapng.OPT_COMMENT] == [comment.encode()]


@given(st.binary(max_size=200))
@FAST
def test_block_reader_refuses_a_broken_length_or_waits(garbage: bytes) -> None:
    reader = pcapng.BlockReader()
    try:
        for _kind, block in reader.feed(garbage):
            assert len(block) >= 12 and len(block) % 4 == 0
    except ValueError as e:
        assert "pcapng block of length" in str(e)


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="original length"):
        pcapng.enhanced_packet(0, 0, b"abc", original_length=2)
    with pytest.raises(ValueError, match="timestamp"):
        pcapng.enhanced_packet(0, -1, b"")
    with pytest.raises(ValueError, match="link type"):
        pcapng.interface_description(70000)
    with pytest.raises(ValueError, match="not an enhanced packet"):
        pcapng.parse_packet(pcapng.section_header())


@given(
    st.binary(min_size=4, max_size=4),
    st.integers(0, 65535),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 65535),
    st.binary(max_size=1500),
)
@FAST
def test_udp_headers_decode_in_scapy(
    src: bytes, sport: int, dst: bytes, dport: int, payload: bytes
) -> None:
    packet = IP(pcapng.udp_headers(src, sport, dst, dport, len(payload)) + payload)
    assert packet.src == ".".join(map(str, src)) and packet.dst == ".".join(map(str, dst))
    assert packet.len == 28 + len(payload)
    recomputed = IP(bytes(packet))
    del recomputed.chksum
    assert IP(bytes(recomputed)).chksum == packet.chksum  # the header checksum is right
    assert packet[UDP].sport == sport and packet[UDP].dport == dport
    assert packet[UDP].len == 8 + len(payload) and packet[UDP].chksum == 0
    assert bytes(packet[UDP].payload) == payload


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark (`make setup`)")
def test_tshark_reads_comments_directions_and_interfaces(tmp_path: Path) -> None:
    inner = bytes(IP(src="198.18.1.2", dst="198.18.2.3") / UDP(sport=1, dport=2) / b"hi")
    outer = pcapng.udp_headers(bytes([192, 0, 2, 1]), 8285, bytes([192, 0, 2, 2]), 8285, len(inner))
    path = tmp_path / "t.pcapng"
    path.write_bytes(
        pcapng.section_header(application="test")
        + pcapng.interface_description(name="flannel0")
        + pcapng.interface_description(name="eth0:udp/8285")
        + pcapng.enhanced_packet(0, 1_700_000_000_123_456_789, inner, direction="out")
        + pcapng.enhanced_packet(1, 1_700_000_000_223_456_789, outer + inner, comment="dropped: x")
    )
    fields = ["frame.interface_name", "frame.comment", "ip.src", "ip.dst", "frame.time_epoch"]
    result = subprocess.run(
        ["tshark", "-r", str(path), "-d", "udp.port==8285,ip", "-T", "fields"]
        + [arg for f in fields for arg in ("-e", f)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert rows[0][0] == "flannel0" and rows[0][2] == "198.18.1.2"
    assert rows[0][4].startswith("1700000000.123456789")
    assert rows[1][0] == "eth0:udp/8285" and rows[1][1] == "dropped: x"
    # Outer then inner addresses: the UDP payload decoded as IPv4.
    assert rows[1][2] == "192.0.2.1,198.18.1.2" and rows[1][3] == "192.0.2.2,198.18.2.3"
