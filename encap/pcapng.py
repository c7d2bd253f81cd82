"""pcapng blocks (draft-ietf-opsawg-pcapng) for `overlay trace`: bytes in, bytes out.

A trace is one Section Header Block, one Interface Description Block per capture point,
then one Enhanced Packet Block per packet, and at the end an Interface Statistics Block
per interface (how many packets the daemon could not pass on). Everything is written
little-endian (readers take either order, from the byte-order magic). Timestamps are in
nanoseconds (``if_tsresol`` 9), a dropped packet carries its reason as a packet comment
(``opt_comment``), and the direction goes in ``epb_flags``, so Wireshark and tshark show
"inbound"/"outbound" and the comment next to each packet.

Both capture points are raw IP (``LINKTYPE_RAW``: the version nibble tells IPv4 from
IPv6, so one interface carries both families). Captures of the outer datagram get IP and
UDP headers synthesized from the addresses and ports (``udp_headers`` for IPv4,
``udp6_headers`` for the IPv6 underlay of vxlan's IPv6 half), so Wireshark decodes
flannel's udp (``-d udp.port==8285,ip``) and VXLAN inside.
"""

from __future__ import annotations

import struct
from typing import Literal

from encap.checksum import internet_checksum

Buffer = bytes | bytearray | memoryview
Direction = Literal["in", "out"]

# Link types (https://www.tcpdump.org/linktypes.html): a raw IPv4 or IPv6 packet, no link
# header (the first nibble says which).
LINKTYPE_RAW = 101

BLOCK_SHB = 0x0A0D0D0A
BLOCK_IDB = 0x00000001
BLOCK_ISB = 0x00000005
BLOCK_EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D

OPT_END = 0
OPT_COMMENT = 1
SHB_HARDWARE = 2
SHB_OS = 3
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
EPB_FLAGS = 2
ISB_STARTTIME = 2
ISB_ENDTIME = 3
ISB_IFRECV = 4
ISB_IFDROP = 5
# epb_flags bits 0-1: 01 inbound, 10 outbound.
_DIRECTION_FLAGS = {"in": 1, "out": 2}
TSRESOL_NS = 9  # 10^-9 s
MAX_OPTION = 0xFFFF  # an option's length is 16 bits: longer text is cut

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_UDP = struct.Struct("!HHHH")


def _pad(length: int) -> int:
    return -length % 4


def _option(code: int, value: bytes) -> bytes:
    value = value[:MAX_OPTION]
    return struct.pack("<HH", code, len(value)) + value + bytes(_pad(len(value)))


def _options(options: list[tuple[int, bytes]]) -> bytes:
    if not options:
        return b""
    return b"".join(_option(code, value) for code, value in options) + _option(OPT_END, b"")


def _block(block_type: int, body: bytes) -> bytes:
    length = _U32.pack(12 + len(body))  # type, total length, body (32-bit aligned), length
    return _U32.pack(block_type) + length + body + length


def _text(value: str) -> bytes:
    return value.encode("utf-8", "replace")


def _timestamp(timestamp_ns: int) -> bytes:
    if not 0 <= timestamp_ns < 1 << 64:
        raise ValueError(f"timestamp {timestamp_ns} does not fit 64 bits")
    return struct.pack("<II", timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF)


def section_header(
    *, application: str | None = None, os: str | None = None, hardware: str | None = None
) -> bytes:
    """The Section Header Block that starts a file (section length unknown: -1)."""
    options = [
        (code, _text(value))
        for code, value in ((SHB_HARDWARE, hardware), (SHB_OS, os), (SHB_USERAPPL, application))
        if value
    ]
    body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + _options(options)
    return _block(BLOCK_SHB, body)


def interface_description(
    linktype: int = LINKTYPE_RAW,
    *,
    snaplen: int = 0,
    name: str | None = None,
    description: str | None = None,
) -> bytes:
    """An Interface Description Block; interfaces are numbered 0, 1, ... in file order.
    ``snaplen`` 0 means no limit. Timestamps of its packets are in nanoseconds."""
    if not 0 <= linktype <= 0xFFFF:
        raise ValueError(f"link type {linktype} does not fit 16 bits")
    if not 0 <= snaplen <= 0xFFFFFFFF:
        raise ValueError(f"snap length {snaplen} does not fit 32 bits")
    options = [(IF_TSRESOL, bytes([TSRESOL_NS]))]
    if name:
        options.append((IF_NAME, _text(name)))
    if description:
        options.append((IF_DESCRIPTION, _text(description)))
    body = struct.pack("<HHI", linktype, 0, snaplen) + _options(options)
    return _block(BLOCK_IDB, body)


def enhanced_packet(
    interface_id: int,
    timestamp_ns: int,
    data: Buffer,
    *,
    original_length: int | None = None,
    comment: str | None = None,
    direction: Direction | None = None,
) -> bytes:
    """An Enhanced Packet Block holding ``data`` (already cut to the snap length; its
    ``original_length`` is what it had before, default ``len(data)``)."""
    captured = len(data)
    original = captured if original_length is None else original_length
    if original < captured:
        raise ValueError(f"original length {original} is below the captured {captured}")
    if not 0 <= interface_id <= 0xFFFFFFFF:
        raise ValueError(f"interface id {interface_id} does not fit 32 bits")
    options: list[tuple[int, bytes]] = []
    if comment:
        options.append((OPT_COMMENT, _text(comment)))
    if direction is not None:
        options.append((EPB_FLAGS, _U32.pack(_DIRECTION_FLAGS[direction])))
    head = (
        _U32.pack(interface_id)
        + _timestamp(timestamp_ns)
        + struct.pack("<II", captured, min(original, 0xFFFFFFFF))
    )
    body = head + bytes(data) + bytes(_pad(captured)) + _options(options)
    return _block(BLOCK_EPB, body)


def interface_statistics(
    interface_id: int,
    timestamp_ns: int,
    *,
    received: int | None = None,
    dropped: int | None = None,
    start_ns: int | None = None,
    comment: str | None = None,
) -> bytes:
    """An Interface Statistics Block: ``received`` packets seen (isb_ifrecv), ``dropped``
    ones the capture could not keep (isb_ifdrop), between ``start_ns`` and the block's
    timestamp."""
    options: list[tuple[int, bytes]] = []
    if comment:
        options.append((OPT_COMMENT, _text(comment)))
    if start_ns is not None:
        options.append((ISB_STARTTIME, _timestamp(start_ns)))
        options.append((ISB_ENDTIME, _timestamp(timestamp_ns)))
    if received is not None:
        options.append((ISB_IFRECV, _U64.pack(received)))
    if dropped is not None:
        options.append((ISB_IFDROP, _U64.pack(dropped)))
    body = _U32.pack(interface_id) + _timestamp(timestamp_ns) + _options(options)
    return _block(BLOCK_ISB, body)


def udp_headers(src: bytes, src_port: int, dst: bytes, dst_port: int, payload_length: int) -> bytes:
    """IPv4 + UDP headers for a datagram of ``payload_length`` bytes, as it was on the wire
    (the UDP checksum is 0, "none", which IPv4 allows; lengths above 65535 are capped)."""
    udp_length = min(8 + payload_length, 0xFFFF - 20)
    udp = _UDP.pack(src_port, dst_port, udp_length, 0)
    ip = bytearray(20)
    ip[0] = 0x45
    ip[2:4] = (20 + udp_length).to_bytes(2, "big")
    ip[6] = 0x40  # DF, as the kernel sends them
    ip[8] = 64
    ip[9] = 17
    ip[12:16] = src
    ip[16:20] = dst
    ip[10:12] = internet_checksum(ip).to_bytes(2, "big")
    return bytes(ip) + udp


def udp6_headers(src: bytes, src_port: int, dst: bytes, dst_port: int, payload: Buffer) -> bytes:
    """IPv6 + UDP headers for the datagram ``payload`` as it was on the wire: with its UDP
    checksum (IPv6 has no "none", RFC 8200 8.1; a zero would show as an error in
    Wireshark); lengths above 65535 are capped."""
    udp_length = min(8 + len(payload), 0xFFFF)
    udp = bytearray(_UDP.pack(src_port, dst_port, udp_length, 0))
    pseudo = src + dst + udp_length.to_bytes(4, "big") + bytes((0, 0, 0, 17))
    checksum = internet_checksum(pseudo + bytes(udp) + bytes(payload)) or 0xFFFF
    udp[6:8] = checksum.to_bytes(2, "big")
    ip = bytes((0x60, 0, 0, 0)) + udp_length.to_bytes(2, "big") + bytes((17, 64))
    return ip + src + dst + bytes(udp)


class BlockReader:
    """Splits a pcapng byte stream into blocks as it arrives (``feed``); for a client that
    counts what it copies. Little-endian sections only (what ``section_header`` writes)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: Buffer) -> list[tuple[int, bytes]]:
        """The complete (block type, block bytes) that ``data`` finished, in order."""
        self._buffer += data
        blocks: list[tuple[int, bytes]] = []
        at = 0
        while len(self._buffer) - at >= 12:
            block_type, length = struct.unpack_from("<II", self._buffer, at)
            if length < 12 or length % 4:
                raise ValueError(f"pcapng block of length {length} at offset {at}")
            if len(self._buffer) - at < length:
                break
            blocks.append((block_type, bytes(self._buffer[at : at + length])))
            at += length
        del self._buffer[:at]
        return blocks


def parse_packet(block: bytes) -> tuple[int, int, bytes, int, dict[int, list[bytes]]]:
    """(interface id, timestamp in ns, captured data, original length, options by code) of
    an Enhanced Packet Block, as ``enhanced_packet`` writes it."""
    block_type, length = struct.unpack_from("<II", block)
    if block_type != BLOCK_EPB or length != len(block) or length < 32:
        raise ValueError("not an enhanced packet block")
    interface_id, high, low, captured, original = struct.unpack_from("<IIIII", block, 8)
    end = 28 + captured
    if end > length - 4:
        raise ValueError("captured length beyond the block")
    options = block_options(block, end + _pad(captured))
    return interface_id, high << 32 | low, bytes(block[28:end]), original, options


def block_options(block: bytes, at: int) -> dict[int, list[bytes]]:
    """The options of a block, by code, from offset ``at`` to the block's end (its last
    four bytes repeat its length); a truncated option ends the list."""
    options: dict[int, list[bytes]] = {}
    end = len(block) - 4
    while at + 4 <= end:
        code, size = struct.unpack_from("<HH", block, at)
        if code == OPT_END:
            break
        options.setdefault(code, []).append(bytes(block[at + 4 : at + 4 + size]))
        at += 4 + size + _pad(size)
    return options
