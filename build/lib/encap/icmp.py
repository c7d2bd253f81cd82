"""ICMP errors the dataplane generates, and the RFC 1812 rules for when not to."""

from __future__ import annotations

from encap import ipv4
from encap.checksum import internet_checksum
from encap.errors import CodecError

TYPE_ECHO_REPLY = 0
TYPE_DEST_UNREACHABLE = 3
TYPE_ECHO_REQUEST = 8
TYPE_TIME_EXCEEDED = 11
CODE_NET_UNREACHABLE = 0
CODE_HOST_UNREACHABLE = 1
# Error types (RFC 1122 3.2.2): never answer one of these with another error.
_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
# RFC 1812 4.3.2.3: quote the IP header and at least 8 bytes; 548 keeps the error <= 576 B.
_MAX_QUOTE = 548


def may_send_error_for(packet: ipv4.Buffer) -> bool:
    """Whether an ICMP error about ``packet`` is allowed (RFC 1122 3.2.2 / RFC 1812 4.3.2.7).

    Not for ICMP errors, non-first fragments, or broadcast/multicast/unspecified sources.
    """
    try:
        header = ipv4.parse(packet)
    except CodecError:
        return False
    if header.fragment_offset:
        return False
    if header.src[0] >= 224 or header.src == b"\x00\x00\x00\x00" or header.src[0] == 127:
        return False
    if header.dst[0] >= 224:
        return False
    if header.protocol == ipv4.PROTO_ICMP:
        hl = header.header_length
        if len(packet) <= hl or packet[hl] in _ERROR_TYPES:
            return False
    return True


def build_dest_unreachable(
    original: ipv4.Buffer, *, src: bytes, code: int = CODE_NET_UNREACHABLE, ttl: int = 64
) -> bytes:
    """An IPv4 ICMP destination-unreachable packet from ``src`` back to the original sender."""
    header = ipv4.parse(original)
    quote = bytes(original[: min(header.total_length, _MAX_QUOTE)])
    body = bytearray(8 + len(quote))
    body[0] = TYPE_DEST_UNREACHABLE
    body[1] = code
    body[8:] = quote
    body[2:4] = internet_checksum(body).to_bytes(2, "big")
    ip = ipv4.build_header(
        src=src, dst=header.src, protocol=ipv4.PROTO_ICMP, payload_length=len(body), ttl=ttl
    )
    return ip + bytes(body)
