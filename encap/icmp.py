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
CODE_FRAGMENTATION_NEEDED = 4  # RFC 1191: "fragmentation needed and DF set", with the MTU
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
    original: ipv4.Buffer,
    *,
    src: bytes,
    code: int = CODE_NET_UNREACHABLE,
    ttl: int = 64,
    next_hop_mtu: int = 0,
) -> bytes:
    """An IPv4 ICMP destination-unreachable packet from ``src`` back to the original sender
    (``next_hop_mtu``: the last two bytes of the header, which RFC 1191 gives code 4)."""
    header = ipv4.parse(original)
    if not 0 <= next_hop_mtu <= 0xFFFF:
        raise CodecError("bad_mtu", f"next-hop MTU {next_hop_mtu} is not 16 bits")
    quote = bytes(original[: min(header.total_length, _MAX_QUOTE)])
    body = bytearray(8 + len(quote))
    body[0] = TYPE_DEST_UNREACHABLE
    body[1] = code
    body[6:8] = next_hop_mtu.to_bytes(2, "big")
    body[8:] = quote
    body[2:4] = internet_checksum(body).to_bytes(2, "big")
    ip = ipv4.build_header(
        src=src, dst=header.src, protocol=ipv4.PROTO_ICMP, payload_length=len(body), ttl=ttl
    )
    return ip + bytes(body)


def build_frag_needed(original: ipv4.Buffer, *, src: bytes, mtu: int, ttl: int = 64) -> bytes:
    """ICMP "fragmentation needed and DF set" (RFC 1191) for ``original``, which does not
    fit a link of ``mtu`` bytes: what a router answers, so the sender's path MTU discovery
    learns the MTU."""
    return build_dest_unreachable(
        original, src=src, code=CODE_FRAGMENTATION_NEEDED, ttl=ttl, next_hop_mtu=mtu
    )
