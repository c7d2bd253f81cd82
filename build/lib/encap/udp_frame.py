"""flannel's udp backend framing: the UDP payload *is* the inner IPv4 packet, nothing added.

Encapsulation is the identity; decapsulation validates what a peer sent us, because
flannel's C proxy writes whatever arrives into the TUN (reference/flannel.md).
"""

from __future__ import annotations

from encap import ipv4
from encap.errors import CodecError

PORT = 8285
# IPv4 (20) + UDP (8) outer headers: TUN MTU = underlay MTU - OVERHEAD.
OVERHEAD = 28


def encode(packet: ipv4.Buffer) -> ipv4.Buffer:
    """The datagram to send for ``packet`` (the packet itself)."""
    return packet


def decode(datagram: ipv4.Buffer) -> ipv4.IPv4Header:
    """Validate a received datagram as one inner IPv4 packet and return its header.

    Trailing bytes after the IPv4 total length are rejected: a flannel peer never sends them.
    """
    header = ipv4.parse(datagram)
    if header.total_length != len(datagram):
        raise CodecError(
            "bad_length", f"IPv4 total length {header.total_length} != datagram {len(datagram)}"
        )
    return header
