"""IPv6 for the userspace vxlan datapath, sans-IO: the receive rules for an inner IPv6
packet, ICMPv6 errors the dataplane sends back into the TUN (destination unreachable,
packet too big) and neighbour advertisements for our VTEP address (NDP, RFC 4861), as
ARP is answered for the IPv4 one.

Every function works on bytes: ``drop_reason6`` on a buffer in place (it completes a
partial checksum where the kernel's vxlan device left one, as ``encap.gso.drop_reason``
does for IPv4).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

from encap.checksum import internet_checksum
from encap.errors import CodecError
from encap.gso import checksum_reason

Buffer = bytes | bytearray | memoryview
Sources6 = Sequence[tuple[int, int]]  # (network >> shift, shift) of each IPv6 subnet

HEADER_LEN = 40
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
NO_NEXT_HEADER = 59
HOP_BY_HOP = 0
ROUTING = 43
FRAGMENT = 44
AUTH = 51
DEST_OPTIONS = 60
# The extension headers walked (RFC 8200 4.1); more than this many is a hostile chain.
EXTENSION_HEADERS = frozenset({HOP_BY_HOP, ROUTING, FRAGMENT, AUTH, DEST_OPTIONS})
MAX_EXTENSION_HEADERS = 8

TYPE_DEST_UNREACHABLE = 1
TYPE_PACKET_TOO_BIG = 2
TYPE_NEIGHBOR_SOLICITATION = 135
TYPE_NEIGHBOR_ADVERTISEMENT = 136
CODE_NO_ROUTE = 0
# RFC 4443 2.4 (c): an error quotes as much of the packet as fits the minimum MTU.
MIN_MTU = 1280
_MAX_QUOTE = MIN_MTU - HEADER_LEN - 8

# Every reason the IPv6 receive rules count a packet under (keys of Counters.drops).
RX_DROP_REASONS6 = (
    "rx_ipv6_truncated",
    "rx_ipv6_bad_version",
    "rx_ipv6_jumbo",
    "rx_ipv6_bad_length",
    "rx_ipv6_bad_ext_header",
    "rx_ipv6_ext_chain_too_long",
    "rx_ipv6_bad_next_header",
    "rx_foreign_source",
    "rx_not_our_subnet",
    "rx_bad_l4_header",
    "rx_bad_l4_checksum",
)


def address_int(data: Buffer, at: int) -> int:
    return int.from_bytes(data[at : at + 16], "big")


def drop_reason6(
    data: bytearray | memoryview,
    start: int,
    end: int,
    sources: Sources6,
    destination: tuple[int, int],
) -> str | None:
    """Why the inner IPv6 packet ``data[start:end]`` may not go into the TUN, or None.

    One IPv6 packet (payload length == the rest; a jumbogram's zero length is refused,
    no link here carries one), from inside one of ``sources`` to inside ``destination``,
    its extension headers (at most 8, hop-by-hop only first) within it, no reserved next
    header, and for TCP, UDP and ICMPv6 (not fragments) a sane header and a complete
    checksum or a partial one (the pseudo-header sum, as a kernel with checksum offload
    leaves it), which is completed here in place."""
    if not 0 <= start <= end <= len(data):
        raise ValueError(f"range {start}:{end} outside the buffer")
    length = end - start
    if length < HEADER_LEN:
        return "rx_ipv6_truncated"
    if data[start] >> 4 != 6:
        return "rx_ipv6_bad_version"
    payload = data[start + 4] << 8 | data[start + 5]
    if payload == 0 and data[start + 6] == HOP_BY_HOP:
        return "rx_ipv6_jumbo"
    if payload + HEADER_LEN != length:
        return "rx_ipv6_bad_length"
    if not any(address_int(data, start + 8) >> s == net for net, s in sources):
        return "rx_foreign_source"
    if address_int(data, start + 24) >> destination[1] != destination[0]:
        return "rx_not_our_subnet"
    walked = upper_layer(data, start, end)
    if isinstance(walked, str):
        return walked
    protocol, l4, checked = walked
    if protocol in (HOP_BY_HOP, 255):
        return "rx_ipv6_bad_next_header"
    if not checked or protocol not in (PROTO_TCP, PROTO_UDP, PROTO_ICMPV6):
        return None  # a fragment, a routed packet, another protocol: the kernel's to check
    return l4_checksum_reason6(data, start, protocol, l4, end)


def upper_layer(data: Buffer, start: int, end: int) -> tuple[int, int, bool] | str:
    """Walk the extension headers of the IPv6 packet ``data[start:end]``: (upper-layer
    protocol, its offset, whether its checksum can be checked here: not a fragment, no
    routing header) or a drop reason."""
    protocol = data[start + 6]
    at = start + HEADER_LEN
    checked = True
    for count in range(MAX_EXTENSION_HEADERS + 1):
        if protocol not in EXTENSION_HEADERS:
            return protocol, at, checked
        if count == MAX_EXTENSION_HEADERS:
            return "rx_ipv6_ext_chain_too_long"
        if protocol == HOP_BY_HOP and count:
            return "rx_ipv6_bad_next_header"  # RFC 8200 4.3: only right after the header
        if at + 8 > end:
            return "rx_ipv6_bad_ext_header"
        if protocol == FRAGMENT:
            size = 8
            checked = False
        elif protocol == AUTH:
            size = (data[at + 1] + 2) * 4
        else:
            size = (data[at + 1] + 1) * 8
            checked = checked and protocol != ROUTING
        if at + size > end:
            return "rx_ipv6_bad_ext_header"
        protocol = data[at]
        at += size
    return "rx_ipv6_ext_chain_too_long"  # unreachable: the loop returns at its last turn


def pseudo_sum6(data: Buffer, start: int, protocol: int, length: int) -> int:
    """The IPv6 pseudo-header (RFC 8200 8.1) as one integer congruent to its word sum."""
    return int.from_bytes(data[start + 8 : start + 40], "big") + protocol + length


def l4_checksum_reason6(
    data: bytearray | memoryview, start: int, protocol: int, l4: int, end: int
) -> str | None:
    """None when the TCP/UDP/ICMPv6 message at ``data[l4:end]`` carries a complete
    checksum, or a partial one (then completed in place); else the drop reason. UDP over
    IPv6 must carry one (RFC 8200 8.1: a zero checksum is dropped, as the kernel does)."""
    length = end - l4
    if protocol == PROTO_TCP:
        if length < 20 or data[l4 + 12] >> 4 < 5 or (data[l4 + 12] >> 4) * 4 > length:
            return "rx_bad_l4_header"
        field = l4 + 16
    elif protocol == PROTO_UDP:
        if length < 8 or (data[l4 + 4] << 8 | data[l4 + 5]) != length:
            return "rx_bad_l4_header"
        field = l4 + 6
        if not data[field] and not data[field + 1]:
            return "rx_bad_l4_checksum"
    else:
        if length < 4:
            return "rx_bad_l4_header"
        field = l4 + 2
    pseudo = pseudo_sum6(data, start, protocol, length)
    return checksum_reason(data, pseudo, l4, end, field, udp=protocol == PROTO_UDP)


def _checksummed(src: bytes, dst: bytes, protocol: int, message: bytearray, field: int) -> bytes:
    """``message`` with its checksum (at ``field``, zero before) over the pseudo-header."""
    pseudo = src + dst + len(message).to_bytes(4, "big") + bytes((0, 0, 0, protocol))
    message[field : field + 2] = internet_checksum(pseudo + bytes(message)).to_bytes(2, "big")
    return bytes(message)


def build_packet(src: bytes, dst: bytes, protocol: int, payload: bytes, hop_limit: int) -> bytes:
    """An IPv6 header in front of ``payload``."""
    if len(src) != 16 or len(dst) != 16:
        raise CodecError("bad_address", f"IPv6 addresses are 16 bytes, got {len(src)}/{len(dst)}")
    if len(payload) > 0xFFFF:
        raise CodecError("too_long", f"payload of {len(payload)} bytes")
    head = bytes((0x60, 0, 0, 0)) + len(payload).to_bytes(2, "big")
    return head + bytes((protocol, hop_limit)) + src + dst + payload


def may_send_error_for(packet: Buffer) -> bool:
    """Whether an ICMPv6 error about ``packet`` is allowed (RFC 4443 2.4 (e)): not for an
    ICMPv6 error, a non-first fragment, a multicast destination or a source that is
    unspecified, loopback or multicast; not for what is not an IPv6 packet."""
    if len(packet) < HEADER_LEN or packet[0] >> 4 != 6:
        return False
    src = bytes(packet[8:24])
    if src[0] == 0xFF or src == bytes(16) or src == bytes(15) + b"\x01" or packet[24] == 0xFF:
        return False
    walked = upper_layer(packet, 0, len(packet))
    if isinstance(walked, str):
        return False
    protocol, l4, _ = walked
    if _non_first_fragment(packet):
        return False
    return not (protocol == PROTO_ICMPV6 and (l4 >= len(packet) or packet[l4] < 128))


def _non_first_fragment(packet: Buffer) -> bool:
    protocol, at = packet[6], HEADER_LEN
    while protocol in EXTENSION_HEADERS and at + 8 <= len(packet):
        if protocol == FRAGMENT:
            return bool((packet[at + 2] << 8 | packet[at + 3]) & 0xFFF8)
        size = (packet[at + 1] + 2) * 4 if protocol == AUTH else (packet[at + 1] + 1) * 8
        protocol, at = packet[at], at + size
    return False


def build_error(
    original: Buffer, *, src: bytes, kind: int, code: int = 0, value: int = 0, hop_limit: int = 64
) -> bytes:
    """An ICMPv6 error of type ``kind`` (``value``: the 32-bit field after the checksum,
    the MTU of a packet too big) from ``src`` back to ``original``'s source, quoting as
    much of it as keeps the error within 1280 bytes."""
    if len(original) < HEADER_LEN:
        raise CodecError("truncated", f"{len(original)} bytes is shorter than an IPv6 header")
    dst = bytes(original[8:24])
    message = bytearray(8) + bytes(original[:_MAX_QUOTE])
    message[0], message[1] = kind, code
    message[4:8] = value.to_bytes(4, "big")
    body = _checksummed(src, dst, PROTO_ICMPV6, message, 2)
    return build_packet(src, dst, PROTO_ICMPV6, body, hop_limit)


def build_dest_unreachable(original: Buffer, *, src: bytes) -> bytes:
    """ICMPv6 destination unreachable, no route to destination (RFC 4443 3.1)."""
    return build_error(original, src=src, kind=TYPE_DEST_UNREACHABLE, code=CODE_NO_ROUTE)


def build_packet_too_big(original: Buffer, *, src: bytes, mtu: int) -> bytes:
    """ICMPv6 packet too big with the link's ``mtu`` (RFC 4443 3.2)."""
    return build_error(original, src=src, kind=TYPE_PACKET_TOO_BIG, value=mtu)


def solicited_node_mac(address: bytes) -> bytes:
    """The Ethernet multicast address of ``address``'s solicited-node group (RFC 2464 7)."""
    return b"\x33\x33\xff" + bytes(address[13:16])


def solicited_target(packet: Buffer) -> bytes | None:
    """The target of the neighbour solicitation ``packet`` (an IPv6 packet), or None when
    it is not a valid one (RFC 4861 7.1.1: hop limit 255, ICMPv6 type 135 code 0, at
    least 24 bytes, a correct checksum, a source that is not unspecified: duplicate
    address detection is never answered for a VTEP address)."""
    if len(packet) < HEADER_LEN + 24 or packet[0] >> 4 != 6 or packet[7] != 255:
        return None
    length = packet[4] << 8 | packet[5]
    if packet[6] != PROTO_ICMPV6 or length < 24 or HEADER_LEN + length > len(packet):
        return None
    icmp = HEADER_LEN
    if packet[icmp] != TYPE_NEIGHBOR_SOLICITATION or packet[icmp + 1] != 0:
        return None
    if bytes(packet[8:24]) == bytes(16):
        return None
    end = HEADER_LEN + length
    message = bytes(packet[icmp:end])
    pseudo = bytes(packet[8:40]) + length.to_bytes(4, "big") + bytes((0, 0, 0, PROTO_ICMPV6))
    if internet_checksum(pseudo + message) != 0:
        return None
    return bytes(packet[icmp + 8 : icmp + 24])


def build_neighbor_advertisement(solicitation: Buffer, *, target: bytes, mac: bytes) -> bytes:
    """The solicited advertisement (flags S and O, our link-layer address ``mac``) that
    answers ``solicitation`` for ``target``: an IPv6 packet from ``target`` to the
    solicitation's source, hop limit 255."""
    if len(mac) != 6:
        raise CodecError("bad_mac", f"a MAC is 6 bytes, got {len(mac)}")
    dst = bytes(solicitation[8:24])
    message = bytearray((TYPE_NEIGHBOR_ADVERTISEMENT, 0, 0, 0, 0x60, 0, 0, 0))
    message += bytes(target) + bytes((2, 1)) + bytes(mac)  # option 2: target link-layer
    body = _checksummed(bytes(target), dst, PROTO_ICMPV6, message, 2)
    return build_packet(bytes(target), dst, PROTO_ICMPV6, body, 255)


# -- RX: a GRO receive of VXLAN datagrams checked, segment by segment --------------------

VXLAN_HEADROOM = 22  # VXLAN header + inner Ethernet header (encap.vxlan.PREFIX_LEN)
# Why a datagram's VXLAN and Ethernet headers are not ours (before drop_reason6's).
VXLAN_DROP_REASONS6 = (
    "rx_vxlan_truncated",
    "rx_vxlan_bad_flags",
    "rx_vxlan_wrong_vni",
    "rx_vxlan_bad_ethertype",
    "rx_vxlan_foreign_mac",
)
NDP = "ndp"  # not a drop: maybe a neighbour solicitation, for the caller to check


def vxlan_reason6(data: Buffer, at: int, end: int, vxlan: tuple[bytes, bytes, bytes]) -> str | None:
    """Why the VXLAN datagram ``data[at:end]`` does not carry an IPv6 packet for us
    (``vxlan`` = (our 3 VNI bytes, our IPv6 VTEP MAC, its solicited-node group's MAC)),
    ``NDP`` when it may be a neighbour solicitation (sent to the group, or an ICMPv6 type
    135 with hop limit 255 to us: the caller checks it whole and answers it), or None."""
    if end - at < VXLAN_HEADROOM:
        return "rx_vxlan_truncated"
    if not data[at] & 0x08:
        return "rx_vxlan_bad_flags"
    if data[at + 4 : at + 7] != vxlan[0]:
        return "rx_vxlan_wrong_vni"
    if data[at + 20] != 0x86 or data[at + 21] != 0xDD:
        return "rx_vxlan_bad_ethertype"
    mac = data[at + 8 : at + 14]
    if mac != vxlan[1]:
        return NDP if mac == vxlan[2] else "rx_vxlan_foreign_mac"
    inner = at + VXLAN_HEADROOM
    if (
        end - inner >= HEADER_LEN + 24
        and data[inner + 6] == PROTO_ICMPV6
        and data[inner + 7] == 255
        and data[inner + HEADER_LEN] == TYPE_NEIGHBOR_SOLICITATION
    ):
        return NDP
    return None


def valid_pieces6(
    data: bytearray,
    size: int,
    segment: int,
    sources: Sources6,
    destination: tuple[int, int],
    drops: MutableMapping[str, int],
    vxlan: tuple[bytes, bytes, bytes],
    ndp: list[int],
) -> list[tuple[int, int]]:
    """The ``(start, end)`` of the inner IPv6 packets of the ``segment``-byte VXLAN
    datagrams in ``data[:size]`` (one GRO receive from one peer) that pass
    ``vxlan_reason6`` and ``drop_reason6`` (a partial checksum completed in place); the
    others are counted in ``drops`` by reason, and the offsets of possible neighbour
    solicitations go to ``ndp``. The native module runs the same rules in C."""
    if size > 0xFFFF:
        raise ValueError(f"a GRO receive is at most 65535 bytes, not {size}")
    if size > len(data):
        raise ValueError(f"size {size} is beyond the buffer ({len(data)} bytes)")
    if size <= 0 or segment <= 0:
        drops["rx_vxlan_truncated"] += 1  # an empty datagram
        return []
    pieces: list[tuple[int, int]] = []
    for base in range(0, size, segment):
        end = min(base + segment, size)
        reason = vxlan_reason6(data, base, end, vxlan)
        if reason == NDP:
            ndp.append(base)
            continue
        if reason is None:
            reason = drop_reason6(data, base + VXLAN_HEADROOM, end, sources, destination)
        if reason is None:
            pieces.append((base + VXLAN_HEADROOM, end))
        else:
            drops[reason] += 1
    return pieces


# -- RX: validated IPv6 TCP segments of one flow coalesced into GSO_TCPV6 writes ----------

_VNET_NEEDS_CSUM = 1
_VNET_GSO_TCPV6 = 4
_VNET_PLAIN = bytes(10)
_ACK = 0x10
_PSH = 0x08
# A GSO packet carries at most this many segments (the kernel's limit, as for IPv4).
MAX_RUN = 64

Write = tuple[list[Buffer], int, int]  # (buffers for one writev, packets, their bytes)


def tcp6_super_header(
    head: Buffer, header_length: int, total_length: int, psh: bool, segment: int
) -> tuple[bytes, bytes]:
    """(virtio_net_hdr, IPv6+TCP header) of a GSO_TCPV6 super-packet of ``total_length``
    bytes built on the header of ``head``: the payload length covers the whole, the TCP
    checksum field holds the pseudo-header sum (NEEDS_CSUM, csum_start 40, offset 16:
    whoever segments it completes each segment's checksum)."""
    header = bytearray(head[:header_length])
    upper = total_length - HEADER_LEN
    header[4:6] = upper.to_bytes(2, "big")
    if psh:
        header[HEADER_LEN + 13] |= _PSH
    pseudo = pseudo_sum6(header, 0, PROTO_TCP, upper) % 0xFFFF
    header[HEADER_LEN + 16 : HEADER_LEN + 18] = pseudo.to_bytes(2, "big")
    fields = (header_length, segment, HEADER_LEN, 16)
    vnet = bytes((_VNET_NEEDS_CSUM, _VNET_GSO_TCPV6)) + b"".join(
        value.to_bytes(2, "little") for value in fields
    )
    return vnet, bytes(header)


def _run_key(data: Buffer, start: int, header_length: int) -> bytes:
    """What every segment of a run shares: the IPv6 header but its payload length, the
    TCP ports, acknowledgement, data offset, window, urgent pointer and options (not the
    sequence number, flags or checksum)."""
    l4 = start + HEADER_LEN
    return b"".join(
        (
            bytes(data[start : start + 4]),
            bytes(data[start + 6 : l4 + 4]),
            bytes(data[l4 + 8 : l4 + 13]),
            bytes(data[l4 + 14 : l4 + 16]),
            bytes(data[l4 + 18 : start + header_length]),
        )
    )


def plan_tun_writes6(data: bytearray, pieces: Sequence[tuple[int, int]], mtu: int) -> list[Write]:
    """The TUN writes (each behind a virtio_net_hdr) for the inner IPv6 packets
    ``data[start:end]`` of ``pieces``, each already passed by ``drop_reason6`` (so with
    complete checksums), in order.

    Consecutive TCP segments of one flow (``_run_key`` equal, adjacent sequence numbers,
    flags ACK, ACK|PSH only on the last, payloads all of the first one's size but the
    last, at most 64) become one GSO_TCPV6 super-packet, as the kernel's GRO merges
    them; a TCP packet longer than ``mtu`` (a kernel peer's TSO packet that crossed only
    veths) goes in as a super-packet of ``mtu``-sized segments; everything else as it
    came. Payloads are memoryviews of ``data``: nothing is copied. A piece outside
    ``data`` or shorter than an IPv6 header is a ValueError; one whose TCP header does
    not fit it is written as it came (``drop_reason6`` passes neither)."""
    for start, end in pieces:
        if not 0 <= start <= end - HEADER_LEN or end > len(data):
            raise ValueError(f"piece {start}:{end} outside the buffer or too short")
    view = memoryview(data)
    writes: list[Write] = []
    run: list[Buffer] = []
    head = head_end = header_length = run_length = total = expect = 0
    key = b""

    def close(psh: bool) -> None:
        if len(run) == 1:
            writes.append(([_VNET_PLAIN, view[head:head_end]], 1, head_end - head))
            return
        vnet, header = tcp6_super_header(
            view[head:], header_length, total, psh, run_length - header_length
        )
        writes.append(([vnet, header, *run], len(run), total + (len(run) - 1) * header_length))

    for start, end in pieces:
        length = end - start
        tcp = data[start + 6] == PROTO_TCP and HEADER_LEN + 20 <= length <= HEADER_LEN + 0xFFFF
        offset = HEADER_LEN + (data[start + HEADER_LEN + 12] >> 4) * 4 if tcp else 0
        tcp = tcp and HEADER_LEN + 20 <= offset <= length
        flags = data[start + HEADER_LEN + 13] if tcp else 0
        if run:
            seq = int.from_bytes(data[start + 44 : start + 48], "big")
            if (
                tcp
                and offset == header_length
                and length > header_length
                and length <= run_length
                and seq == expect
                and total + length - header_length <= HEADER_LEN + 0xFFFF
                and flags in (_ACK, _ACK | _PSH)
                and _run_key(data, start, header_length) == key
            ):
                run.append(view[start + header_length : end])
                total += length - header_length
                expect = (seq + length - header_length) & 0xFFFFFFFF
                psh = flags != _ACK
                if psh or length < run_length or len(run) == MAX_RUN:
                    close(psh)
                    run = []
                continue
            close(False)
            run = []
        if tcp and mtu and length > mtu > offset:
            vnet, header = tcp6_super_header(view[start:], offset, length, False, mtu - offset)
            writes.append(([vnet, header, view[start + offset : end]], 1, length))
            continue
        if tcp and flags == _ACK and length > offset:
            head, head_end, header_length, run_length = start, end, offset, length
            key = _run_key(data, start, offset)
            total = length
            expect = int.from_bytes(data[start + 44 : start + 48], "big") + length - offset
            expect &= 0xFFFFFFFF
            run = [view[start + offset : end]]
            continue
        writes.append(([_VNET_PLAIN, view[start:end]], 1, length))
    if run:
        close(False)
    return writes
