"""What a NIC's TSO engine does, for packets the TUN hands us with TSO4/TSO6 and CSUM
offloads.

With TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) the kernel passes one TCP
super-packet of up to 64 KiB per read where it would otherwise pass ~45 MTU-sized
segments (saving a read per segment here and the segmentation in the sender's kernel),
and it leaves L4 checksums for us to finish (virtio_net_hdr NEEDS_CSUM: the field holds
the pseudo-header sum, the sum from ``csum_start`` to the end goes in). A flannel or
kernel peer does neither for us, so every packet that leaves is one MTU-sized packet
with complete checksums: ``segment_tcp4`` (``segment_tcp6`` for vxlan's IPv6 half) cuts
a super-packet in place into segments, each behind a copy of the per-peer prefix;
``finish_checksums`` completes the partial checksums of plain packets.

This is the reference: plain Python, written to be read and to be the test oracle of the
native module (``encap.native``), which does the same in C and is what the dataplane runs
(one ``int.from_bytes`` per segment here: ~3 us per 1400 bytes).
"""

from __future__ import annotations

import struct
from mmap import mmap

from encap.errors import CodecError

# struct virtio_net_hdr (include/uapi/linux/virtio_net.h), native byte order:
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET = struct.Struct("=BBHHHH")
NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4

_FIN = 0x01
_PSH = 0x08
_CWR = 0x80


def _fold(total: int) -> int:
    """One's complement sum of a sum of 16-bit words: 1..0xFFFF (0xFFFF for 0 too)."""
    return total % 0xFFFF or 0xFFFF


def _sum(data: bytes | bytearray | memoryview) -> int:
    """The big-endian 16-bit words of ``data`` (an odd end padded with zero) summed,
    modulo 0xFFFF (2**16 == 1 there, so the whole buffer as one integer will do)."""
    return (int.from_bytes(data, "big") << (8 if len(data) & 1 else 0)) % 0xFFFF


Region = tuple[int, int, int]  # (start, end, field) of a partial checksum in a buffer
# What packets are cut and summed in: a bytearray, or the dataplane's arena of anonymous
# pages (overlay.dataplane.base).
Arena = bytearray | mmap


def partial_region(at: int, length: int, csum_start: int, csum_offset: int) -> Region:
    """Where the packet of ``length`` bytes at ``at`` has its partial checksum: the L4
    header and payload ``buf[start:end]``, with the pseudo-header sum in the checksum
    field at ``field`` (virtio_net_hdr csum_start / csum_offset)."""
    start = at + csum_start
    field = start + csum_offset
    end = at + length
    if not at < start <= field <= end - 2:
        raise CodecError("bad_csum_offsets", f"start {csum_start} offset {csum_offset}")
    return start, end, field


def finish_checksums(buf: Arena, regions: list[Region]) -> None:
    """Complete partial checksums (``partial_region``s of ``buf``): each region summed,
    inverted and stored in its field; a UDP result of 0 is sent as 0xFFFF (0 means "no
    checksum"). Raises ValueError, before writing anything, for a region that does not
    lie in ``buf`` with its field inside it."""
    for start, end, field in regions:
        if not (0 <= start <= field and field + 2 <= end <= len(buf)):
            raise ValueError(f"checksum region {(start, end, field)} outside the buffer")
    for start, end, field in regions:
        checksum = ~_fold(_sum(buf[start:end])) & 0xFFFF
        if checksum == 0 and field - start == 6:  # UDP (csum_offset 6)
            checksum = 0xFFFF
        buf[field : field + 2] = checksum.to_bytes(2, "big")


def segment_tcp4(
    buf: Arena, at: int, length: int, gso_size: int, prefix: bytes
) -> tuple[int, int, int]:
    """Cut the IPv4/TCP super-packet at ``buf[at + len(prefix):][:length]`` in place into
    ``gso_size``-payload segments, each ``prefix`` + IPv4 + TCP header + payload, back to
    back from ``at``; the one before the super-packet (``buf[at:at + len(prefix)]``) and
    up to ``(segments - 1) * (len(prefix) + headers)`` bytes after it are overwritten
    (``+ 3`` bytes of room are required there, as the first vectorised version needed).

    Per segment, as Linux's tcp_gso_segment: IP total length, identification + i and
    header checksum; TCP sequence + i * gso_size, CWR on the first only, FIN and PSH on
    the last only, full checksum. Returns (segments, the length of each but the last,
    the length of the last). Raises CodecError for what cannot be segmented.
    """
    prefix = bytes(prefix)  # it may be a view of ``buf`` itself
    room = len(prefix)
    ip = at + room
    if at < 0 or length < 0 or ip + length > len(buf):
        raise CodecError("gso_bad_length", f"length {length} at {at}")
    if length < 40 or buf[ip] >> 4 != 4 or buf[ip + 9] != 6:
        raise CodecError("gso_not_tcp4")
    ihl = (buf[ip] & 0x0F) * 4
    if ihl < 20 or ihl + 20 > length:
        raise CodecError("gso_bad_headers", f"length {length}")
    headers = ihl + (buf[ip + ihl + 12] >> 4) * 4
    if headers < ihl + 20 or headers >= length:
        raise CodecError("gso_bad_headers", f"length {length}")
    if buf[ip + 6] & 0x3F or buf[ip + 7]:  # MF or a fragment offset
        raise CodecError("gso_fragment")
    return _checked_cut(buf, at, length, gso_size, prefix, ihl, headers)


def _checked_cut(
    buf: Arena, at: int, length: int, gso_size: int, prefix: bytes, ihl: int, headers: int
) -> tuple[int, int, int]:
    """What both families check once their headers are known (gso_size fits, the
    segments fit in ``buf``), then the cut."""
    room = len(prefix)
    if not 0 < gso_size <= 0xFFFF - headers:
        raise CodecError("gso_bad_size", f"gso_size {gso_size}")
    payload = length - headers
    count = -(-payload // gso_size)
    end = at + room + length
    if end + (count - 1) * (room + headers) + 3 > len(buf):
        raise CodecError("gso_no_room", f"{count} segments")
    return _cut(buf, at, gso_size, prefix, ihl, headers, count, end)


def _cut(
    buf: Arena,
    at: int,
    gso_size: int,
    prefix: bytes,
    ihl: int,
    headers: int,
    count: int,
    end: int,
) -> tuple[int, int, int]:
    """The cut both families share, once the super-packet ``buf[end - length:end]``
    (IP header ``ihl`` bytes: 40 for IPv6) is checked: each segment ``prefix`` + IP +
    TCP header + payload, from ``at``. IPv4 gets its total length, identification + i
    and header checksum; IPv6 its payload length; both the TCP sequence, the flags and
    the full checksum over their pseudo-header."""
    room = len(prefix)
    ip = at + room
    v6 = buf[ip] >> 4 == 6
    original = bytes(buf[ip : ip + headers])
    data = bytes(buf[ip + headers : end])  # the segments are written over it
    ip_id = int.from_bytes(original[4:6], "big")
    seq = int.from_bytes(original[ihl + 4 : ihl + 8], "big")
    flags = original[ihl + 13]
    addresses = _sum(original[8:40] if v6 else original[12:20])
    stride = room + headers + gso_size
    out = at
    for i in range(count):
        chunk = data[i * gso_size : (i + 1) * gso_size]
        total = headers + len(chunk)
        header = bytearray(original)
        if v6:
            header[4:6] = (total - ihl).to_bytes(2, "big")
        else:
            header[2:4] = total.to_bytes(2, "big")
            header[4:6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            header[10:12] = bytes(2)
            header[10:12] = (~_fold(_sum(header[:ihl])) & 0xFFFF).to_bytes(2, "big")
        header[ihl + 4 : ihl + 8] = ((seq + i * gso_size) & 0xFFFFFFFF).to_bytes(4, "big")
        header[ihl + 13] = flags & ~(_FIN | _PSH | _CWR)
        if i == 0:
            header[ihl + 13] |= flags & _CWR
        if i == count - 1:
            header[ihl + 13] |= flags & (_FIN | _PSH)
        header[ihl + 16 : ihl + 18] = bytes(2)
        tcp_sum = addresses + 6 + total - ihl + _sum(header[ihl:]) + _sum(chunk)
        header[ihl + 16 : ihl + 18] = (~_fold(tcp_sum) & 0xFFFF).to_bytes(2, "big")
        buf[out : out + room] = prefix
        buf[out + room : out + room + headers] = header
        buf[out + room + headers : out + room + total] = chunk
        out += room + total
    return count, stride, out - (count - 1) * stride - at


IPV6_HEADER = 40


def segment_tcp6(
    buf: Arena, at: int, length: int, gso_size: int, prefix: bytes
) -> tuple[int, int, int]:
    """``segment_tcp4`` for an IPv6/TCP super-packet (GSO_TCPV6, the TUN's TSO6): the
    same cut in place, the same room required, the same result. Only a TCP header right
    after the IPv6 header is cut (Linux's TCP sends no extension headers; anything else
    is refused, as the kernel cannot have built it from our TSO6 offer).

    Per segment, as Linux's tcp_gso_segment over ipv6_gso_segment: payload length, TCP
    sequence + i * gso_size, CWR on the first only, FIN and PSH on the last only, the
    full checksum over the IPv6 pseudo-header. Raises CodecError for what cannot be cut.
    """
    prefix = bytes(prefix)  # it may be a view of ``buf`` itself
    room = len(prefix)
    ip = at + room
    if at < 0 or length < 0 or ip + length > len(buf):
        raise CodecError("gso_bad_length", f"length {length} at {at}")
    if length < IPV6_HEADER + 20 or buf[ip] >> 4 != 6 or buf[ip + 6] != 6:
        raise CodecError("gso_not_tcp6")
    headers = IPV6_HEADER + (buf[ip + IPV6_HEADER + 12] >> 4) * 4
    if headers < IPV6_HEADER + 20 or headers >= length:
        raise CodecError("gso_bad_headers", f"length {length}")
    return _checked_cut(buf, at, length, gso_size, prefix, IPV6_HEADER, headers)
