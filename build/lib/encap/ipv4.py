"""A read-only view of an IPv4 header, validated once, for the forwarding decision."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from encap.checksum import internet_checksum
from encap.errors import CodecError

MIN_HEADER = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
FLAG_DF = 0x4000
FLAG_MF = 0x2000
OFFSET_MASK = 0x1FFF

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class IPv4Header:
    """The fields the dataplane looks at; addresses as 4-byte ``bytes`` (cheap to compare)."""

    ihl: int
    tos: int
    total_length: int
    ident: int
    flags_fragment: int
    ttl: int
    protocol: int
    checksum: int
    src: bytes
    dst: bytes

    @property
    def header_length(self) -> int:
        return self.ihl * 4

    @property
    def fragment_offset(self) -> int:
        """Offset in 8-byte units; non-zero means a non-first fragment."""
        return self.flags_fragment & OFFSET_MASK

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags_fragment & FLAG_MF)

    @property
    def dont_fragment(self) -> bool:
        return bool(self.flags_fragment & FLAG_DF)

    @property
    def src_address(self) -> IPv4Address:
        return IPv4Address(self.src)

    @property
    def dst_address(self) -> IPv4Address:
        return IPv4Address(self.dst)


def parse(packet: Buffer) -> IPv4Header:
    """Validate and decode the header; raise :class:`CodecError` for anything not forwardable.

    The packet may be longer than ``total_length`` (link padding) but never shorter.
    """
    size = len(packet)
    if size < MIN_HEADER:
        raise CodecError("truncated", f"{size} bytes is shorter than an IPv4 header")
    first = packet[0]
    if first >> 4 != 4:
        raise CodecError("not_ipv4", f"IP version {first >> 4}")
    ihl = first & 0x0F
    if ihl < 5:
        raise CodecError("bad_ihl", f"IHL {ihl} < 5")
    header_length = ihl * 4
    total_length = int.from_bytes(packet[2:4], "big")
    if total_length < header_length:
        raise CodecError("bad_length", f"total length {total_length} < header {header_length}")
    if total_length > size:
        raise CodecError("truncated", f"total length {total_length} > {size} bytes received")
    return IPv4Header(
        ihl=ihl,
        tos=packet[1],
        total_length=total_length,
        ident=int.from_bytes(packet[4:6], "big"),
        flags_fragment=int.from_bytes(packet[6:8], "big"),
        ttl=packet[8],
        protocol=packet[9],
        checksum=int.from_bytes(packet[10:12], "big"),
        src=bytes(packet[12:16]),
        dst=bytes(packet[16:20]),
    )


def header_checksum_ok(packet: Buffer) -> bool:
    """True when the header checksum verifies (sum over the header including it is 0)."""
    header_length = (packet[0] & 0x0F) * 4
    return internet_checksum(packet[:header_length]) == 0


def build_header(
    *,
    src: bytes,
    dst: bytes,
    protocol: int,
    payload_length: int,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    flags_fragment: int = 0,
) -> bytes:
    """A 20-byte header (no options) with a correct checksum."""
    total = MIN_HEADER + payload_length
    if total > 0xFFFF:
        raise CodecError("too_long", f"total length {total} > 65535")
    header = bytearray(MIN_HEADER)
    header[0] = 0x45
    header[1] = tos
    header[2:4] = total.to_bytes(2, "big")
    header[4:6] = ident.to_bytes(2, "big")
    header[6:8] = flags_fragment.to_bytes(2, "big")
    header[8] = ttl
    header[9] = protocol
    header[12:16] = src
    header[16:20] = dst
    header[10:12] = internet_checksum(header).to_bytes(2, "big")
    return bytes(header)
