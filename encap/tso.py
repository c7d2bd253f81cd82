"""What a NIC's TSO engine does, for packets the TUN hands us with TSO4 and CSUM offloads.

With TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4) the kernel passes one TCP super-packet of up
to 64 KiB per read where it would otherwise pass ~45 MTU-sized segments (saving a read
per segment here and the segmentation in the sender's kernel), and it leaves L4
checksums for us to finish (virtio_net_hdr NEEDS_CSUM: the field holds the pseudo-header
sum, the sum from ``csum_start`` to the end goes in). A flannel or kernel peer does
neither for us, so every packet that leaves is one MTU-sized IPv4 packet with complete
checksums: ``segment_tcp4`` cuts a super-packet in place into segments, each behind a
copy of the per-peer prefix; ``finish_checksums`` completes the partial checksums of
plain packets, a whole drain's in one pass.

The payload sums of all segments come from one numpy ``add.reduceat`` over the super-
packet (13 us for 45 segments, 0.3 us each; ``int.from_bytes`` per segment costs 3.2 us).
"""

from __future__ import annotations

import functools
import struct
import sys
from typing import Any

import numpy as np

from encap.errors import CodecError

# struct virtio_net_hdr (include/uapi/linux/virtio_net.h), native byte order:
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET = struct.Struct("=BBHHHH")
NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1

_FIN = 0x01
_PSH = 0x08
_CWR = 0x80
_U16 = struct.Struct("!H")
_BE_WORDS = np.dtype(">u2")
_BE_LONGS = np.dtype(">u4")
_LITTLE_ENDIAN = sys.byteorder == "little"
_NATIVE: dict[int, np.dtype[np.unsignedinteger[Any]]] = {
    2: np.dtype(np.uint16),
    4: np.dtype(np.uint32),
}


def _fold(total: int) -> int:
    """One's complement sum (never 0 for a non-zero ``total``) of a sum of 16-bit words."""
    return total % 0xFFFF or 0xFFFF


def _words(data: bytes) -> int:
    """The big-endian 16-bit words of an even-length ``data`` summed, modulo 0xFFFF."""
    return int.from_bytes(data, "big") % 0xFFFF


Region = tuple[int, int, int]  # (start, end, field) of a partial checksum in a buffer


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


def finish_checksums(buf: bytearray, regions: list[Region]) -> None:
    """Complete partial checksums (``partial_region``s of ``buf``, in order): each
    region summed, inverted and stored in its field; a UDP result of 0 is sent as 0xFFFF
    (0 means "no checksum"). Regions on even offsets (the usual case) are summed by one
    numpy pass for all of them (a 1400-byte packet costs 3 us alone with int.from_bytes);
    the others one by one."""
    even: list[Region] = []
    for region in regions:
        start, end, field = region
        if (start | end) & 1:
            data = buf[start:end]
            total = int.from_bytes(data, "big") << (8 if len(data) % 2 else 0)
            _store(buf, field, field - start, total)
        else:
            even.append(region)
    if not even:
        return
    # reduceat sums from each bound to the next, the last to the end of the array: the
    # array ends where the last region does, so its end needs no bound.
    words = np.frombuffer(buf, np.uint16, even[-1][1] // 2)
    bounds = [x for start, end, _ in even for x in (start // 2, end // 2)][:-1]
    sums: list[int] = np.add.reduceat(words, bounds, dtype=np.uint64)[::2].tolist()
    for (start, _, field), total in zip(even, sums, strict=True):
        _store(buf, field, field - start, total * 256 if _LITTLE_ENDIAN else total)


def _store(buf: bytearray, field: int, offset: int, total: int) -> None:
    checksum = ~_fold(total) & 0xFFFF
    if checksum == 0 and offset == 6:  # UDP (csum_offset 6)
        checksum = 0xFFFF
    _U16.pack_into(buf, field, checksum)


def segment_tcp4(
    buf: bytearray, at: int, length: int, gso_size: int, prefix: bytes
) -> tuple[int, int, int]:
    """Cut the IPv4/TCP super-packet at ``buf[at + len(prefix):][:length]`` in place into
    ``gso_size``-payload segments, each ``prefix`` + IPv4 + TCP header + payload, back to
    back from ``at``; the one before the super-packet (``buf[at:at + len(prefix)]``) and
    up to ``(segments - 1) * (len(prefix) + headers) + 3`` bytes after it are overwritten.

    Per segment, as Linux's tcp_gso_segment: IP total length, identification + i and
    header checksum; TCP sequence + i * gso_size, CWR on the first only, FIN and PSH on
    the last only, full checksum. Returns (segments, the length of each but the last,
    the length of the last). Raises CodecError for what cannot be segmented.
    """
    room = len(prefix)
    ip = at + room
    if length < 40 or buf[ip] >> 4 != 4 or buf[ip + 9] != 6:
        raise CodecError("gso_not_tcp4")
    ihl = (buf[ip] & 0x0F) * 4
    tcp = ip + ihl
    headers = ihl + (buf[tcp + 12] >> 4) * 4 if ihl >= 20 else 0
    if ihl < 20 or headers < ihl + 20 or headers >= length:
        raise CodecError("gso_bad_headers", f"length {length}")
    if buf[ip + 6] & 0x3F or buf[ip + 7]:  # MF or a fragment offset
        raise CodecError("gso_fragment")
    if not 0 < gso_size <= 0xFFFF - headers:
        raise CodecError("gso_bad_size", f"gso_size {gso_size}")
    payload = length - headers
    count = -(-payload // gso_size)
    end = ip + length
    if end + (count - 1) * (room + headers) + 3 > len(buf):
        raise CodecError("gso_no_room", f"{count} segments")

    # Payload sums first: segments are written over the super-packet's payload.
    if gso_size % 2 == 0:
        # Summed in native order (a big-endian view costs a cast per word), in 32-bit
        # words where segments start 4-aligned (a 32-bit word is its two 16-bit halves
        # modulo 0xFFFF; half the elements: 8 instead of 14 us for 64 KiB). Swapping a
        # word's bytes multiplies it by 256 modulo 0xFFFF, so one multiply converts.
        unit = 4 if gso_size % 4 == 0 else 2
        buf[end : end + unit - 1] = bytes(unit - 1)  # a ragged end is summed zero-padded
        words = np.frombuffer(buf, _NATIVE[unit], -(-payload // unit), ip + headers)
        starts, index = _segment_index(count, gso_size // unit)
        sums = np.add.reduceat(words, starts, dtype=np.uint64)
        if _LITTLE_ENDIAN:
            sums = sums % 0xFFFF * 256
    else:
        index = _segment_index(count, 1)[1]
        data = memoryview(buf)[ip + headers : end]
        pieces = [data[i : i + gso_size] for i in range(0, payload, gso_size)]
        odd = [int.from_bytes(p, "big") << (8 * (len(p) % 2)) for p in pieces]
        sums = np.array([value % 0xFFFF for value in odd], dtype=np.uint64)

    # The fields that change, for every segment at once. Sums are kept modulo 0xFFFF
    # (2**16 == 1 there, so a 32-bit sequence number counts as its two 16-bit halves).
    original = bytes(buf[ip : ip + headers])
    ip_id = int.from_bytes(original[4:6], "big")
    seq = int.from_bytes(original[ihl + 4 : ihl + 8], "big")
    flags = original[ihl + 13]
    middle = flags & ~(_FIN | _PSH | _CWR)
    last = payload - (count - 1) * gso_size
    full = headers + gso_size  # the total length of every segment but the last
    # What is the same in every segment: the header words with the changing fields
    # (length, id, checksums, sequence, flags) zeroed, plus the pseudo-header
    # (addresses, protocol; the TCP length varies with the total length).
    fixed = bytearray(original)
    fixed[2:6] = fixed[ihl + 4 : ihl + 8] = bytes(4)
    fixed[10:12] = fixed[ihl + 16 : ihl + 18] = bytes(2)
    fixed[ihl + 13] = 0
    ip_base = _words(bytes(fixed[:ihl]))
    tcp_base = _words(bytes(fixed[ihl:])) + _words(original[12:20]) + 6
    ids = (ip_id + index) & 0xFFFF
    seqs = (seq + index * gso_size) & 0xFFFFFFFF
    ip_sums = ids + (ip_base + full)
    tcp_sums = seqs % 0xFFFF + sums + (tcp_base + full - ihl + middle)
    # The last segment is shorter by gso_size - last (added modulo 0xFFFF, so as a
    # positive number) and may carry FIN and PSH; the first may carry CWR.
    ip_sums[-1] += (last - gso_size) % 0xFFFF
    tcp_sums[-1] += (last - gso_size + (flags & (_FIN | _PSH))) % 0xFFFF
    tcp_sums[0] += flags & _CWR

    heads = np.repeat(np.frombuffer(original, np.uint8)[None, :], count, axis=0)
    words16 = heads.view(_BE_WORDS)
    words16[:, 1] = full
    words16[-1, 1] = headers + last
    words16[:, 2] = ids
    words16[:, 5] = _checksums(ip_sums)
    heads.view(_BE_LONGS)[:, (ihl + 4) // 4] = seqs  # word-aligned: ihl, headers % 4 == 0
    heads[:, ihl + 13] = middle
    heads[0, ihl + 13] |= flags & _CWR
    heads[-1, ihl + 13] |= flags & (_FIN | _PSH)
    words16[:, ihl // 2 + 8] = _checksums(tcp_sums)

    # Payloads move forward (the last one first, by itself: it may be shorter), then
    # the headers go in front of them.
    stride = room + headers + gso_size
    view = memoryview(buf)
    last_at = at + (count - 1) * stride
    source = ip + headers + (count - 1) * gso_size
    view[last_at + room + headers : last_at + room + headers + last] = view[source:end]
    if count > 1:
        out = np.frombuffer(buf, np.uint8, (count - 1) * stride, at).reshape(count - 1, stride)
        moving = np.frombuffer(buf, np.uint8, (count - 1) * gso_size, ip + headers)
        out[:, room + headers :] = moving.reshape(count - 1, gso_size)  # numpy buffers overlaps
        out[:, :room] = np.frombuffer(prefix, np.uint8)
        out[:, room : room + headers] = heads[:-1]
    view[last_at : last_at + room] = prefix
    view[last_at + room : last_at + room + headers] = heads[-1].tobytes()
    return count, stride, room + headers + last


def _checksums(sums: np.ndarray) -> np.ndarray:
    """Header checksums from sums of 16-bit words: ~(one's complement fold), which is
    0xFFFF - (sum mod 0xFFFF), and 0 where that is 0xFFFF."""
    result: np.ndarray = (0xFFFF - sums % 0xFFFF) % 0xFFFF
    return result


@functools.lru_cache(maxsize=64)
def _segment_index(count: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (segments, words per segment): where each payload starts, and 0..count-1."""
    positions = np.arange(count)
    return positions * step, positions.astype(np.uint64)
