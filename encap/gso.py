"""Sans-IO helpers for UDP GSO (UDP_SEGMENT) batches and UDP GRO (UDP_GRO) datagrams.

A UDP GSO send hands the kernel one buffer that it cuts into ``gso_size`` datagrams, the
last possibly shorter; a GRO receive hands us the same shape back. Both ends of the udp
backend therefore deal in *groups*: consecutive packets to one peer, all of one length
but the last. Every datagram on the wire is still exactly one inner IPv4 packet.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable, MutableMapping, Sequence

from encap.checksum import internet_checksum

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
    lengths: Sequence[int],
    keys: Sequence[Hashable],
    max_segments: int = MAX_SEGMENTS,
    max_bytes: int = MAX_GSO_BYTES,
) -> list[tuple[int, int]]:
    """Cut consecutive packets (their ``lengths`` and destinations ``keys``) into GSO
    groups, in order.

    Returns ``(start, end)`` index slices. Within a slice every key is equal, every packet
    has the length of the first except the last, which may be shorter; a slice holds at
    most ``max_segments`` packets and ``max_bytes`` bytes (a single larger packet is a
    group of its own). Concatenating the slices gives back every packet once, in order.
    """
    groups: list[tuple[int, int]] = []
    count = len(lengths)
    if count == 0:
        return groups
    start = 0
    key = keys[0]
    size = total = previous = lengths[0]
    for i in range(1, count):
        length = lengths[i]
        if (
            previous == size
            and length <= size
            and keys[i] == key
            and total + length <= max_bytes
            and i - start < max_segments
        ):
            total += length
            previous = length
            continue
        groups.append((start, i))
        start = i
        key = keys[i]
        size = total = previous = length
    groups.append((start, count))
    return groups


def split_points(total: int, size: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` pieces of a ``total``-byte GRO buffer of ``size``-byte segments."""
    if size <= 0 or size >= total:
        return [(0, total)]
    return [(start, min(start + size, total)) for start in range(0, total, size)]


# -- RX: validated TUN writes, TCP runs coalesced (TUN with IFF_VNET_HDR) ------------------

# IPv4 without options + TCP with its options, cut into the fields that must match for a
# segment to continue a run: 0 ver_ihl, 1 tos, 2 total_length, 3 frag+ttl+protocol
# (bytes 6..10), 4 addresses+ports (12..24), 5 seq, 6 ack+offset+flags+window (28..36),
# 7 options. One Struct per TCP data offset (index 5..15), each exactly that header long.
_HEADERS = [struct.Struct(f"!BBH2x4s2x12sI8s4x{4 * max(doff - 5, 0)}s") for doff in range(16)]
_VNET = struct.Struct("=BBHHHH")  # struct virtio_net_hdr, native order (tun.offload)
VNET_PLAIN = bytes(_VNET.size)
_VNET_F_NEEDS_CSUM = 1
_VNET_GSO_TCPV4 = 1
_ACK = 0x10
_PSH = 0x08

Buffer = bytes | bytearray | memoryview
# (buffers for one writev, inner packets they carry, the bytes those packets had)
Write = tuple[list[Buffer], int, int]


def tcp_super_header(
    head: Buffer, header_length: int, total_length: int, psh: bool, segment: int
) -> tuple[bytes, bytes]:
    """(virtio_net_hdr, IPv4+TCP header) of a GSO_TCPV4 super-packet built on ``head``.

    The IPv4 total length covers the whole super-packet and its header checksum is redone;
    the TCP checksum field holds the pseudo-header sum (NEEDS_CSUM: the kernel, or the
    device that finally segments it, completes the checksum of each segment).
    """
    header = bytearray(head[:header_length])
    header[2:4] = total_length.to_bytes(2, "big")
    header[10:12] = b"\x00\x00"
    header[10:12] = internet_checksum(header[:20]).to_bytes(2, "big")
    if psh:
        header[33] |= _PSH
    pseudo = (
        int.from_bytes(header[12:14], "big")
        + int.from_bytes(header[14:16], "big")
        + int.from_bytes(header[16:18], "big")
        + int.from_bytes(header[18:20], "big")
        + 6
        + total_length
        - 20
    )
    pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    header[36:38] = pseudo.to_bytes(2, "big")
    vnet = _VNET.pack(_VNET_F_NEEDS_CSUM, _VNET_GSO_TCPV4, header_length, segment, 20, 16)
    return vnet, bytes(header)


Sources = Sequence[tuple[int, int]]  # (network >> shift, shift) of each lease of a sender

# Every reason the receive rules below count a datagram under (keys of Counters.drops).
RX_DROP_REASONS = (
    "rx_not_ipv4",
    "rx_bad_length",
    "rx_bad_ihl",
    "rx_bad_ip_checksum",
    "rx_bad_ip_options",
    "rx_foreign_source",
    "rx_not_our_subnet",
    "rx_bad_l4_header",
    "rx_bad_l4_checksum",
)


def drop_reason(
    data: bytearray | memoryview,
    start: int,
    end: int,
    sources: Sources,
    destination: tuple[int, int],
) -> str | None:
    """Why ``data[start:end]`` may not go into the TUN, or None when it may. One definition
    for every receive path (plain, GRO split, TUN super-packets, vxlan); the native module
    implements the same rules.

    It must be one IPv4 packet (total length == its length) with a valid header (IHL within
    the packet, header checksum, options well formed: the kernel would drop it after we
    counted it as received) from inside one of ``sources`` to inside ``destination`` (both
    ``(network >> shift, shift)``). A TCP or UDP packet that is not a fragment must carry a
    complete checksum or a partial one: a kernel vxlan peer whose NIC (a veth) offloads
    checksums sends the pseudo-header sum in the field, and a checksum the kernel would
    have finished on a real wire is finished here, in place. Anything else is corrupt.
    """
    if not 0 <= start <= end <= len(data):
        raise ValueError(f"range {start}:{end} outside the buffer")
    length = end - start
    if length < 20 or data[start] >> 4 != 4 or data[start] & 0x0F < 5:
        return "rx_not_ipv4"
    if (data[start + 2] << 8 | data[start + 3]) != length:
        return "rx_bad_length"
    header_length = (data[start] & 0x0F) * 4
    if header_length > length:
        return "rx_bad_ihl"
    if _fold(int.from_bytes(data[start : start + header_length], "big")) != 0xFFFF:
        return "rx_bad_ip_checksum"
    if header_length > 20 and not _options_ok(data, start + 20, start + header_length):
        return "rx_bad_ip_options"
    source = int.from_bytes(data[start + 12 : start + 16], "big")
    if not any(source >> shift == net for net, shift in sources):
        return "rx_foreign_source"
    if int.from_bytes(data[start + 16 : start + 20], "big") >> destination[1] != destination[0]:
        return "rx_not_our_subnet"
    protocol = data[start + 9]
    if protocol not in (6, 17) or (data[start + 6] & 0x3F) or data[start + 7]:
        return None  # another protocol, or a fragment: the kernel checks it after reassembly
    return l4_checksum_reason(data, start, start + header_length, end)


def l4_checksum_reason(data: bytearray | memoryview, start: int, l4: int, end: int) -> str | None:
    """None when the TCP/UDP packet at ``data[start:end]`` (L4 header at ``l4``) carries a
    complete checksum, or a partial one (the field holds the folded pseudo-header sum, as a
    kernel with checksum offload leaves it), which is then completed in place."""
    length = end - l4
    if data[start + 9] == 6:
        if length < 20 or data[l4 + 12] >> 4 < 5 or (data[l4 + 12] >> 4) * 4 > length:
            return "rx_bad_l4_header"
        field = l4 + 16
    else:
        if length < 8 or (data[l4 + 4] << 8 | data[l4 + 5]) != length:
            return "rx_bad_l4_header"
        field = l4 + 6
        if not data[field] and not data[field + 1]:
            return None  # UDP without a checksum
    pseudo = int.from_bytes(data[start + 12 : start + 20], "big") + data[start + 9] + length
    return checksum_reason(data, pseudo, l4, end, field, udp=field == l4 + 6)


def checksum_reason(
    data: bytearray | memoryview, pseudo: int, l4: int, end: int, field: int, *, udp: bool
) -> str | None:
    """The checksum rule of both families: ``data[l4:end]`` (checksum at ``field``) sums
    with ``pseudo`` (the pseudo-header, as one integer congruent to its word sum) to a
    complete checksum (None), or the field holds the folded pseudo-header sum (partial:
    completed in place, None), or it is corrupt."""
    length = end - l4
    body = int.from_bytes(data[l4:end], "big") << (8 if length & 1 else 0)
    if (pseudo + body) % 0xFFFF == 0:
        return None
    if ((data[field] << 8 | data[field + 1]) - pseudo) % 0xFFFF:
        return "rx_bad_l4_checksum"
    checksum = ~_fold(body) & 0xFFFF  # the field's pseudo-header sum is part of ``body``
    if checksum == 0 and udp:
        checksum = 0xFFFF  # UDP sends a zero result as 0xFFFF (0 means "no checksum")
    data[field] = checksum >> 8
    data[field + 1] = checksum & 0xFF
    return None


def _fold(total: int) -> int:
    """A sum of 16-bit words as one's complement: 1..0xFFFF (0xFFFF for 0 too)."""
    return total % 0xFFFF or 0xFFFF


def _options_ok(data: bytearray | memoryview, at: int, end: int) -> bool:
    """Whether IPv4 options ``data[at:end]`` are well formed: each is END (the rest is
    padding), NOP, or a type-length-value that fits."""
    while at < end:
        kind = data[at]
        if kind == 0:
            return True
        if kind == 1:
            at += 1
            continue
        if at + 1 >= end or data[at + 1] < 2 or at + data[at + 1] > end:
            return False
        at += data[at + 1]
    return True


VXLAN_HEADROOM = 22  # VXLAN header + inner Ethernet header (encap.vxlan.PREFIX_LEN)


def vxlan_reason(data: bytearray, at: int, end: int, vxlan: tuple[bytes, bytes]) -> str | None:
    """Why the VXLAN datagram ``data[at:end]`` is not an IPv4 frame for us (``vxlan`` =
    (our 3 VNI bytes, our VTEP MAC)), "arp" for an ARP frame (answered by the caller), or
    None. Only the I flag is checked of the flags (RFC 7348 section 5)."""
    if end - at < 22 + 20:
        return "rx_vxlan_truncated"
    if not data[at] & 0x08:
        return "rx_vxlan_bad_flags"
    if data[at + 4 : at + 7] != vxlan[0]:
        return "rx_vxlan_wrong_vni"
    if data[at + 20] != 0x08 or data[at + 21] != 0x00:
        if data[at + 20] == 0x08 and data[at + 21] == 0x06:
            return "arp"
        return "rx_vxlan_bad_ethertype"
    if data[at + 8 : at + 14] != vxlan[1]:
        return "rx_vxlan_foreign_mac"
    return None


VXLAN_DROP_REASONS = (
    "rx_vxlan_truncated",
    "rx_vxlan_bad_flags",
    "rx_vxlan_wrong_vni",
    "rx_vxlan_bad_ethertype",
    "rx_vxlan_foreign_mac",
)


def _check_receive(data: Buffer, size: int) -> None:
    if size > 0xFFFF:  # one UDP datagram: keeps every super-packet within IPv4's 64 KiB
        raise ValueError(f"a GRO receive is at most 65535 bytes, not {size}")
    if size > len(data):
        raise ValueError(f"size {size} is beyond the buffer ({len(data)} bytes)")


def valid_pieces(
    data: bytearray,
    size: int,
    segment: int,
    sources: Sources,
    destination: tuple[int, int],
    drops: MutableMapping[str, int],
    vxlan: tuple[bytes, bytes] | None = None,
    arp: list[int] | None = None,
) -> list[tuple[int, int]]:
    """The ``(start, end)`` of the inner packets of the ``segment``-byte datagrams in
    ``data[:size]`` that pass :func:`drop_reason` (and, with ``vxlan``, whose ``skip``
    bytes of encapsulation pass :func:`vxlan_reason`; ARP frames go to ``arp`` by their
    offset); the others are counted in ``drops`` by reason."""
    _check_receive(data, size)
    if size <= 0 or segment <= 0:
        drops["rx_not_ipv4"] += 1  # an empty datagram
        return []
    skip = VXLAN_HEADROOM if vxlan is not None else 0
    pieces: list[tuple[int, int]] = []
    for base in range(0, size, segment):
        end = min(base + segment, size)
        if vxlan is not None:
            reason = vxlan_reason(data, base, end, vxlan)
            if reason is not None:
                if reason == "arp":
                    if arp is not None:
                        arp.append(base)
                else:
                    drops[reason] += 1
                continue
        reason = drop_reason(data, base + skip, end, sources, destination)
        if reason is None:
            pieces.append((base + skip, end))
        else:
            drops[reason] += 1
    return pieces


def plan_tun_writes(
    data: bytearray,
    size: int,
    segment: int,
    sources: Sources,
    destination: tuple[int, int],
    drops: MutableMapping[str, int],
    vxlan: tuple[bytes, bytes] | None = None,
    arp: list[int] | None = None,
    mtu: int = 0,
) -> list[Write]:
    """The TUN writes (each behind a virtio_net_hdr) for ``data[:size]``, a GRO receive
    of ``segment``-byte datagrams (the last may be shorter) from one peer.

    Each datagram must pass :func:`valid_pieces`'s rules (the same code: the VXLAN header
    with ``vxlan``, then :func:`drop_reason`); the others are counted in ``drops`` by reason
    and not written. Consecutive TCP segments of one flow (same addresses, ports, ACK,
    window, TOS, TTL, DF and options; adjacent sequence numbers; flags ACK, ACK|PSH only on
    the last; payloads all of the first one's size but the last; each with valid
    checksums, as the kernel's GRO checks before it merges) become one GSO_TCPV4
    super-packet; everything else is written as it came, except a TCP packet longer than
    ``mtu`` (the TUN's), which goes in as a super-packet of ``mtu``-sized segments: a
    kernel vxlan peer's TSO packet reaches our socket unsegmented when only veths lie
    between us (Linux queues a UDP-tunnel GSO packet to a UDP socket whole). Payloads are
    memoryviews of ``data``: nothing is copied.

    One writev per run, not one write per segment, is what makes the receiver cheap
    (bench/results/design-measurements.md); the native module runs the same plan in C.
    """
    _check_receive(data, size)
    if size <= 0 or segment <= 0:
        drops["rx_not_ipv4"] += 1  # an empty datagram
        return []
    skip = VXLAN_HEADROOM if vxlan is not None else 0
    view = memoryview(data)
    writes: list[Write] = []
    add = writes.append
    # The open run: its segments' payloads and the fields every next segment must match.
    run: list[Buffer] = []
    unpack = _HEADERS[5].unpack_from
    head = head_end = header_length = run_length = total = expect = run_tos = 0
    run_ftp = run_addresses = run_afw = run_options = b""
    for base in range(0, size, segment):
        end = base + segment
        if end > size:
            end = size
        if vxlan is not None:
            reason = vxlan_reason(data, base, end, vxlan)
            if reason is not None:
                if run:
                    _emit(add, view, run, head, head_end, header_length, total, False, run_length)
                    run = []
                if reason != "arp":
                    drops[reason] += 1
                elif arp is not None:
                    arp.append(base)
                continue
        start = base + skip
        length = end - start
        if run and length > header_length:
            vihl, tos, total_length, ftp, addresses, seq, afw, options = unpack(data, start)
            if (
                seq == expect
                and addresses == run_addresses
                and afw[:5] == run_afw[:5]
                and afw[6:] == run_afw[6:]
                and ftp == run_ftp
                and options == run_options
                and tos == run_tos
                and vihl == 0x45
                and total_length == length
                and length <= run_length
                and (afw[5] == _ACK or afw[5] == _ACK | _PSH)
                and _fold(int.from_bytes(data[start : start + 20], "big")) == 0xFFFF
                and l4_checksum_reason(data, start, start + 20, end) is None
            ):
                run.append(view[start + header_length : end])
                total += length - header_length
                expect = (seq + length - header_length) & 0xFFFFFFFF
                psh = afw[5] != _ACK
                # PSH, a short segment or the 64th (the most a GSO packet carries) ends it
                if psh or length < run_length or len(run) == MAX_SEGMENTS:
                    _emit(add, view, run, head, head_end, header_length, total, psh, run_length)
                    run = []
                continue
        if run:
            _emit(add, view, run, head, head_end, header_length, total, False, run_length)
            run = []
        # Not the open run's next segment: the full validation.
        reason = drop_reason(data, start, end, sources, destination)
        if reason is not None:
            drops[reason] += 1
            continue
        simple_tcp = (
            data[start] == 0x45
            and data[start + 9] == 6
            and data[start + 6] & 0x3F == 0
            and data[start + 7] == 0
        )  # no IP options, not a fragment
        if simple_tcp and length > mtu > 20 + (data[start + 32] >> 4) * 4:
            offset = 20 + (data[start + 32] >> 4) * 4  # its headers: checked by drop_reason
            vnet, header = tcp_super_header(view[start:], offset, length, False, mtu - offset)
            add(([vnet, header, view[start + offset : end]], 1, length))
            continue
        # A TCP segment with data that may open a run: flags exactly ACK.
        if simple_tcp and length > 40 and data[start + 33] == _ACK:
            offset = data[start + 32] >> 4
            if offset >= 5 and length > 20 + offset * 4:
                header_length = 20 + offset * 4
                unpack = _HEADERS[offset].unpack_from
                (_, run_tos, _, run_ftp, run_addresses, seq, run_afw, run_options) = unpack(
                    data, start
                )
                run = [view[start + header_length : end]]
                head, head_end, run_length = start, end, length
                total = length
                expect = (seq + length - header_length) & 0xFFFFFFFF
                continue
        add(([VNET_PLAIN, view[start:end]], 1, length))
    if run:
        _emit(add, view, run, head, head_end, header_length, total, False, run_length)
    return writes


def _emit(
    add: Callable[[Write], None],
    view: memoryview,
    run: list[Buffer],
    head: int,
    head_end: int,
    header_length: int,
    total: int,
    psh: bool,
    run_length: int,
) -> None:
    """Write out a closed run: alone as it came, or as one super-packet."""
    count = len(run)
    if count == 1:
        add(([VNET_PLAIN, view[head:head_end]], 1, head_end - head))
        return
    segment = run_length - header_length
    vnet, header = tcp_super_header(view[head:], header_length, total, psh, segment)
    add(([vnet, header, *run], count, total + (count - 1) * header_length))
