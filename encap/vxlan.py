"""VXLAN framing (RFC 7348) as the Linux kernel and flannel's ``flannel.1`` put it on the wire.

UDP payload = 8-byte VXLAN header + inner Ethernet header + inner packet. Everything in
front of the inner packet depends only on the peer, so it is built once per peer
(:func:`prefix`) and encapsulation is a single concatenation (:func:`encode`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from encap.errors import CodecError
from encap.ipv4 import MIN_HEADER, Buffer

PORT = 8472  # the Linux kernel's (and so flannel's) default, not IANA's
IANA_PORT = 4789
HEADER_LEN = 8
ETHER_LEN = 14
PREFIX_LEN = HEADER_LEN + ETHER_LEN
# Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14): TUN MTU = underlay MTU - 50.
OVERHEAD = 20 + 8 + PREFIX_LEN
FLAG_I = 0x08
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6

MAX_VNI = 0xFFFFFF
_MAC_LEN = 6
_IPV4_MIN = PREFIX_LEN + MIN_HEADER
_ETH_IPV4 = ETHERTYPE_IPV4.to_bytes(2, "big")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")
# Domain separation, so the derived MAC is ours and not a bare hash of the address.
_VTEP_SALT = b"flannel-overlay vtep mac\x00"


def header(vni: int) -> bytes:
    """The 8-byte VXLAN header: I flag, reserved zeros, the 24-bit VNI, a reserved zero."""
    if not 0 <= vni <= MAX_VNI:
        raise CodecError("bad_vni", f"VNI {vni} does not fit 24 bits")
    return bytes((FLAG_I, 0, 0, 0)) + vni.to_bytes(3, "big") + b"\x00"


def prefix(vni: int, dst_mac: bytes, src_mac: bytes, ethertype: int = ETHERTYPE_IPV4) -> bytes:
    """The 22 bytes (VXLAN header + inner Ethernet header) in front of every packet to a peer.

    ``dst_mac`` is the peer's VTEP MAC, ``src_mac`` ours, as the kernel's flannel.1 sends.
    """
    if len(dst_mac) != _MAC_LEN or len(src_mac) != _MAC_LEN:
        raise CodecError("bad_mac", f"MACs must be 6 bytes, got {len(dst_mac)}/{len(src_mac)}")
    if not 0 <= ethertype <= 0xFFFF:
        raise CodecError("bad_ethertype", f"ethertype {ethertype} does not fit 16 bits")
    return header(vni) + bytes(dst_mac) + bytes(src_mac) + ethertype.to_bytes(2, "big")


def encode(prefix: bytes, packet: Buffer) -> bytes:
    """The UDP payload carrying ``packet`` to the peer whose :func:`prefix` this is."""
    return prefix + packet


def decode(datagram: Buffer, *, vni: int, mac: bytes) -> tuple[int, int]:
    """Validate a received VXLAN datagram for our ``vni`` and VTEP ``mac``.

    Returns ``(ethertype, offset)``: the inner payload is ``datagram[offset:]``. Only the I
    flag is checked; other flag and reserved bits are ignored as RFC 7348 section 5 says.
    Runs per packet, so it compares slices in place instead of unpacking the header.
    """
    size = len(datagram)
    if size < _IPV4_MIN and (size < PREFIX_LEN or datagram[20:22] == _ETH_IPV4):
        raise CodecError("truncated", f"{size} bytes")
    if not datagram[0] & FLAG_I:
        raise CodecError("bad_flags", f"flags 0x{datagram[0]:02x} without the I flag")
    if (datagram[4] << 16 | datagram[5] << 8 | datagram[6]) != vni:
        got = int.from_bytes(datagram[4:7], "big")
        raise CodecError("wrong_vni", f"VNI {got}, expected {vni}")
    ethertype = datagram[20] << 8 | datagram[21]
    if ethertype == ETHERTYPE_IPV4:
        if datagram[8:14] != mac:
            raise CodecError("foreign_mac", f"destination {format_mac(bytes(datagram[8:14]))}")
    elif ethertype == ETHERTYPE_ARP:
        dst = datagram[8:14]
        if dst != mac and dst != BROADCAST:
            raise CodecError("foreign_mac", f"destination {format_mac(bytes(dst))}")
    else:
        raise CodecError("bad_ethertype", f"inner ethertype 0x{ethertype:04x}")
    return ethertype, PREFIX_LEN


def vtep_mac(public_ip: str, vni: int) -> bytes:
    """A VTEP MAC that survives restarts, so peers' neighbour/fdb entries stay valid.

    flannel picks a random MAC per start and republishes it; deriving it from the public IP
    and VNI gives the same address every time. Locally administered and unicast.
    """
    try:
        address = ipaddress.ip_address(public_ip)
    except ValueError as e:
        raise CodecError("bad_address", str(e)) from None
    if not 0 <= vni <= MAX_VNI:
        raise CodecError("bad_vni", f"VNI {vni} does not fit 24 bits")
    digest = hashlib.sha256(_VTEP_SALT + address.packed + vni.to_bytes(3, "big")).digest()
    return bytes(((digest[0] & 0xFE) | 0x02,)) + digest[1:_MAC_LEN]


def format_mac(mac: bytes) -> str:
    """``aa:bb:cc:dd:ee:ff``, as flannel publishes ``VtepMAC`` (Go's HardwareAddr.String)."""
    if len(mac) != _MAC_LEN:
        raise CodecError("bad_mac", f"{len(mac)} bytes")
    return mac.hex(":")


def parse_mac(text: str) -> bytes:
    """Six colon-separated hex pairs (either case) to 6 bytes; nothing else is a MAC here."""
    if not _MAC_RE.fullmatch(text):
        raise CodecError("bad_mac", repr(text))
    return bytes.fromhex(text.replace(":", ""))
