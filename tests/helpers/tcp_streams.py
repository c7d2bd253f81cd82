"""TCP flows as the dataplane tests build and check them: segments crafted field by field
(``Segment``), interleaved flows as a sender's TSO emits them (``streams``), a GRO receive
of them after the sender's UDP GSO (``gro_buffers``), what the kernel makes of a planned
TUN super-packet write (``resegment``), and checksums made valid again after a test
edited a header (``reseal``)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from encap import gso
from encap.checksum import internet_checksum, ones_complement_sum
from encap.ipv4 import build_header

SRC = bytes([198, 18, 1, 2])
DST = bytes([198, 18, 2, 3])
TS_OPTION = b"\x01\x01\x08\x0a" + bytes(range(8))  # NOP NOP timestamps


@dataclass
class Segment:
    sport: int
    seq: int
    ack: int
    flags: int
    payload: bytes
    window: int = 502
    options: bytes = TS_OPTION
    tos: int = 0
    ttl: int = 64
    ident: int = 0
    protocol: int = 6
    src: bytes = SRC
    dst: bytes = DST

    def build(self) -> bytes:
        if self.protocol != 6:  # UDP: a header (with a checksum) in front of the payload
            udp = bytearray(struct.pack("!HHHH", self.sport, 5201, 8 + len(self.payload), 0))
            udp += self.payload
            pseudo = self.src + self.dst + struct.pack("!BBH", 0, 17, len(udp))
            udp[6:8] = internet_checksum(pseudo + udp + b"\0" * (len(udp) % 2)).to_bytes(2, "big")
            return build_header(
                src=self.src, dst=self.dst, protocol=self.protocol, payload_length=len(udp)
            ) + bytes(udp)
        offset = (20 + len(self.options)) // 4
        tcp = bytearray(
            struct.pack(
                "!HHIIBBHHH",
                self.sport,
                5201,
                self.seq,
                self.ack,
                offset << 4,
                self.flags,
                self.window,
                0,
                0,
            )
            + self.options
            + self.payload
        )
        pseudo = self.src + self.dst + struct.pack("!BBH", 0, 6, len(tcp))
        tcp[16:18] = internet_checksum(pseudo + tcp + b"\0" * (len(tcp) % 2)).to_bytes(2, "big")
        ip = build_header(
            src=self.src,
            dst=self.dst,
            protocol=6,
            payload_length=len(tcp),
            ttl=self.ttl,
            tos=self.tos,
            ident=self.ident,
            flags_fragment=0x4000,
        )
        return ip + bytes(tcp)


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """Interleaved TCP flows as a sender's TSO would emit them (bursts of full segments),
    plus noise: pure ACKs, PSH, short segments, gaps, retransmits, SYN/FIN, a changed
    window/TOS/TTL/options/ACK, UDP."""
    mss = draw(st.sampled_from([1, 100, 1380, 1420]))
    flows = {port: draw(st.integers(0, 2**32 - 1)) for port in (40000, 40001)}
    packets: list[bytes] = []
    kinds = st.sampled_from(
        ["full"] * 4 + ["short", "psh", "ack", "gap", "retx", "syn", "fin", "udp", "odd"]
    )
    for _ in range(draw(st.integers(0, 25))):
        port = draw(st.sampled_from(sorted(flows)))
        kind = draw(kinds)
        for _ in range(draw(st.integers(1, 8)) if kind == "full" else 1):
            seq = flows[port]
            length = mss if kind in ("full", "psh", "gap", "retx", "fin", "odd") else 0
            if kind == "short":
                length = draw(st.integers(1, mss))
            if kind == "gap":
                seq = (seq + 7) & 0xFFFFFFFF
            if kind == "retx":
                seq = (seq - mss) & 0xFFFFFFFF
            flags = {"psh": 0x18, "syn": 0x02, "fin": 0x11}.get(kind, 0x10)
            payload = bytes((seq + i) & 0xFF for i in range(length))
            segment = Segment(port, seq, 1000, flags, payload, ident=len(packets))
            if kind == "odd":
                which = draw(st.sampled_from(["window", "tos", "ttl", "options", "ack"]))
                if which == "window":
                    segment.window = 999
                elif which == "tos":
                    segment.tos = 2
                elif which == "ttl":
                    segment.ttl = 3
                elif which == "options":
                    segment.options = b""
                else:
                    segment.ack = 2000
            if kind == "udp":
                segment.protocol = 17
                segment.payload = bytes(length)
            packets.append(segment.build())
            if kind not in ("retx", "udp"):
                flows[port] = (seq + length + (kind in ("syn", "fin"))) & 0xFFFFFFFF
    return packets


def resegment(buffers: list[gso.Buffer]) -> list[bytes]:
    """What the kernel makes of one planned TUN write (tcp_gso_segment for TCPV4)."""
    vnet, rest = bytes(buffers[0]), b"".join(bytes(b) for b in buffers[1:])
    flags, gso_type, header_length, size, csum_start, csum_offset = struct.unpack("=BBHHHH", vnet)
    if gso_type == 0:
        assert flags == 0
        return [rest]
    if gso_type == 4:
        return _resegment6(rest, header_length, size, flags, csum_start, csum_offset)
    assert (flags, gso_type, csum_start, csum_offset) == (1, 1, 20, 16)
    header, payload = rest[:header_length], rest[header_length:]
    assert int.from_bytes(header[2:4], "big") == len(rest)
    assert internet_checksum(header[:20]) == 0  # the super-packet's IPv4 checksum
    pseudo = header[12:20] + struct.pack("!BBH", 0, 6, len(rest) - 20)
    assert int.from_bytes(header[36:38], "big") == ones_complement_sum(pseudo)
    segments = []
    seq = int.from_bytes(header[24:28], "big")
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)]
    for k, chunk in enumerate(chunks):
        h = bytearray(header)
        h[2:4] = (header_length + len(chunk)).to_bytes(2, "big")
        h[4:6] = ((int.from_bytes(header[4:6], "big") + k) & 0xFFFF).to_bytes(2, "big")
        h[10:12] = b"\0\0"
        h[10:12] = internet_checksum(h[:20]).to_bytes(2, "big")
        h[24:28] = ((seq + k * size) & 0xFFFFFFFF).to_bytes(4, "big")
        if k < len(chunks) - 1:
            h[33] &= ~0x09 & 0xFF  # PSH and FIN only on the last segment
        tcp = h[20:] + chunk
        tcp[16:18] = b"\0\0"
        odd = b"\0" * (len(tcp) % 2)
        tcp[16:18] = internet_checksum(
            pseudo[:8] + struct.pack("!BBH", 0, 6, len(tcp)) + tcp + odd
        ).to_bytes(2, "big")
        segments.append(bytes(h[:20] + tcp))
    return segments


def _resegment6(
    rest: bytes, header_length: int, size: int, flags: int, csum_start: int, csum_offset: int
) -> list[bytes]:
    """resegment for GSO_TCPV6: tcp_gso_segment over IPv6 (no IP id, no header checksum;
    the pseudo-header sum in the TCP checksum field, NEEDS_CSUM at 40 + 16)."""
    assert (flags, csum_start, csum_offset) == (1, 40, 16)
    header, payload = rest[:header_length], rest[header_length:]
    assert int.from_bytes(header[4:6], "big") == len(rest) - 40
    addresses = header[8:40]
    pseudo = addresses + struct.pack("!IxxxB", len(rest) - 40, 6)
    assert int.from_bytes(header[56:58], "big") == ones_complement_sum(pseudo) % 0xFFFF
    segments = []
    seq = int.from_bytes(header[44:48], "big")
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)]
    for k, chunk in enumerate(chunks):
        h = bytearray(header)
        h[4:6] = (header_length - 40 + len(chunk)).to_bytes(2, "big")
        h[44:48] = ((seq + k * size) & 0xFFFFFFFF).to_bytes(4, "big")
        if k < len(chunks) - 1:
            h[53] &= ~0x09 & 0xFF  # PSH and FIN only on the last segment
        tcp = h[40:] + chunk
        tcp[16:18] = b"\0\0"
        odd = b"\0" * (len(tcp) % 2)
        pseudo = addresses + struct.pack("!IxxxB", len(tcp), 6)
        tcp[16:18] = internet_checksum(pseudo + tcp + odd).to_bytes(2, "big")
        segments.append(bytes(h[:40] + tcp))
    return segments


def gro_buffers(packets: list[bytes]) -> list[tuple[bytearray, int, int]]:
    """The packets as a GRO receive would hand them over after the sender's UDP GSO:
    (buffer, size, segment) per batch of same-sized datagrams, the last may be shorter."""
    lengths = [len(p) for p in packets]
    batches = []
    for a, b in gso.plan_groups(lengths, [0] * len(packets), max_bytes=0xFFFF):
        data = bytearray(b"".join(packets[a:b]))
        batches.append((data, len(data), lengths[a]))
    return batches


def reseal(data: bytearray, start: int, end: int) -> None:
    """Valid IPv4 header and TCP/UDP checksums again for the packet at ``data[start:end]``
    after a test changed a header field."""
    ihl = (data[start] & 0x0F) * 4
    data[start + 10 : start + 12] = b"\0\0"
    data[start + 10 : start + 12] = internet_checksum(data[start : start + ihl]).to_bytes(2, "big")
    protocol, l4 = data[start + 9], data[start + ihl : end]
    field = {6: 16, 17: 6}.get(protocol)
    if field is None or len(l4) < field + 2:
        return
    l4[field : field + 2] = b"\0\0"
    pseudo = data[start + 12 : start + 20] + struct.pack("!BBH", 0, protocol, len(l4))
    checksum = internet_checksum(pseudo + l4 + b"\0" * (len(l4) % 2))
    data[start + ihl + field : start + ihl + field + 2] = checksum.to_bytes(2, "big")
