"""Sans-IO helpers for UDP GSO (UDP_SEGMENT) batches and UDP GRO (UDP_GRO) datagrams.

A UDP GSO send hands the kernel one buffer that it cuts into ``gso_size`` datagrams, the
last possibly shorter; a GRO receive hands us the same shape back. Both ends of the udp
backend therefore deal in *groups*: consecutive packets to one peer, all of one length
but the last. Every datagram on the wire is still exactly one inner IPv4 packet.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable, Sequence, Sized

# Linux constants (include/uapi/linux/udp.h); Python's socket module has neither.
SOL_UDP = 17
UDP_SEGMENT = 103  # cmsg / sockopt: u16 segment size of a GSO send
UDP_GRO = 104  # sockopt: enable; cmsg: int segment size of a coalesced receive
# UDP_MAX_SEGMENTS in the kernel (raised to 128 in newer kernels; 64 works everywhere).
MAX_SEGMENTS = 64
# A GSO send is one UDP datagram before segmentation: stay below 65535 - 8 - 20.
MAX_GSO_BYTES = 65000

_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")


def segment_cmsg(size: int) -> list[tuple[int, int, bytes]]:
    """The ancillary data of a ``sendmsg`` that the kernel cuts into ``size``-byte datagrams."""
    return [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))]


def gro_size(ancdata: Sequence[tuple[int, int, bytes]], default: int) -> int:
    """The segment size a GRO receive reports in its ancillary data, else ``default``."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= _INT.size:
            size: int = _INT.unpack_from(data)[0]
            return size if size > 0 else default
    return default


def plan_groups(
    packets: Sequence[Sized],
    keys: Sequence[Hashable],
    max_segments: int = MAX_SEGMENTS,
    max_bytes: int = MAX_GSO_BYTES,
) -> list[tuple[int, int]]:
    """Cut ``packets`` (with their destinations ``keys``) into GSO groups, in order.

    Returns ``(start, end)`` slices. Within a slice every key is equal, every packet has the
    length of the first except the last, which may be shorter; a slice holds at most
    ``max_segments`` packets and ``max_bytes`` bytes (a single larger packet is a group of
    its own). Concatenating the slices gives back every packet exactly once, in order.
    """
    groups: list[tuple[int, int]] = []
    count = len(packets)
    if count == 0:
        return groups
    start = 0
    key = keys[0]
    size = total = len(packets[0])
    for i in range(1, count):
        length = len(packets[i])
        if (
            keys[i] == key
            and length <= size
            and total + length <= max_bytes
            and i - start < max_segments
            and len(packets[i - 1]) == size
        ):
            total += length
            continue
        groups.append((start, i))
        start = i
        key = keys[i]
        size = total = length
    groups.append((start, count))
    return groups


def split_points(total: int, size: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` pieces of a ``total``-byte GRO buffer of ``size``-byte segments."""
    if size <= 0 or size >= total:
        return [(0, total)]
    return [(start, min(start + size, total)) for start in range(0, total, size)]
