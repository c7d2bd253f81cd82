"""Ethernet/IPv4 ARP (RFC 826), so a kernel VXLAN peer without a static neighbour entry for
our VTEP address can resolve it over the overlay.
"""

from __future__ import annotations

from dataclasses import dataclass

from encap.errors import CodecError
from encap.ipv4 import Buffer

REQUEST = 1
REPLY = 2
LENGTH = 28

_FIXED = bytes.fromhex("000108000604")  # hardware Ethernet, protocol IPv4, 6/4


@dataclass(frozen=True, slots=True)
class ArpPacket:
    """One Ethernet/IPv4 ARP message; MACs are 6 bytes, IPv4 addresses 4 bytes."""

    operation: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes


def parse(payload: Buffer) -> ArpPacket:
    """Decode an ARP payload (after the Ethernet header); trailing link padding is ignored."""
    size = len(payload)
    if size < len(_FIXED):
        raise CodecError("truncated", f"{size} bytes is shorter than an ARP header")
    if payload[:6] != _FIXED:
        raise CodecError("not_ethernet_ipv4", f"ARP header {bytes(payload[:6]).hex()}")
    if size < LENGTH:
        raise CodecError("truncated", f"{size} bytes is shorter than an Ethernet/IPv4 ARP")
    return ArpPacket(
        operation=payload[6] << 8 | payload[7],
        sender_mac=bytes(payload[8:14]),
        sender_ip=bytes(payload[14:18]),
        target_mac=bytes(payload[18:24]),
        target_ip=bytes(payload[24:28]),
    )


def build(
    operation: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes
) -> bytes:
    """The 28-byte Ethernet/IPv4 ARP payload."""
    if len(sender_mac) != 6 or len(target_mac) != 6:
        raise CodecError(
            "bad_mac", f"MACs must be 6 bytes, got {len(sender_mac)}/{len(target_mac)}"
        )
    if len(sender_ip) != 4 or len(target_ip) != 4:
        raise CodecError(
            "bad_address", f"IPv4 addresses must be 4 bytes, got {len(sender_ip)}/{len(target_ip)}"
        )
    if not 0 <= operation <= 0xFFFF:
        raise CodecError("bad_operation", f"operation {operation} does not fit 16 bits")
    return (
        _FIXED
        + operation.to_bytes(2, "big")
        + bytes(sender_mac)
        + bytes(sender_ip)
        + bytes(target_mac)
        + bytes(target_ip)
    )


def reply(request: ArpPacket, our_mac: bytes) -> bytes:
    """The is-at answer to ``request``: we own its target IP at ``our_mac``.

    The caller decides whether to answer (operation is REQUEST, target IP is ours).
    """
    return build(REPLY, our_mac, request.target_ip, request.sender_mac, request.sender_ip)
