"""Crafted inner TCP segments for the checksum interop tests, and the kernel's view of
them (/proc/net/snmp of a namespace)."""

from __future__ import annotations

import socket
import struct
from typing import Any

from encap.checksum import internet_checksum, ones_complement_sum
from encap.ipv4 import build_header


def tcp_segment(
    src: str, dst: str, checksum: str, dport: int = 9, payload: bytes = b"x" * 100
) -> bytes:
    """An IPv4 TCP segment (ACK, to a port nobody listens on, so the receiver answers with
    a RST) whose checksum is ``"complete"``, ``"partial"`` (the folded pseudo-header sum,
    as a kernel with checksum offload hands it over) or ``"corrupt"``."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40123, dport, 1000, 2000, 5 << 4, 0x10, 512, 0, 0))
    tcp += payload
    pseudo = s + d + struct.pack("!BBH", 0, 6, len(tcp))
    good = internet_checksum(pseudo + tcp + b"\0" * (len(tcp) % 2))
    value = {
        "complete": good,
        "partial": ones_complement_sum(pseudo),
        "corrupt": good ^ 0x5A5A,
    }[checksum]
    tcp[16:18] = value.to_bytes(2, "big")
    return build_header(src=s, dst=d, protocol=6, payload_length=len(tcp)) + bytes(tcp)


RAW_SEND = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)\n"
    "for h in sys.argv[2:]:\n"
    "    s.sendto(bytes.fromhex(h),(sys.argv[1],0))\n"
)


def snmp(bed: Any, where: str) -> dict[str, int]:
    """The namespace's /proc/net/snmp as {"Tcp.InCsumErrors": n, ...}."""
    lines = bed.exec(where, ["cat", "/proc/net/snmp"], capture_output=True, text=True, check=True)
    rows = [line.split() for line in lines.stdout.splitlines()]
    counters: dict[str, int] = {}
    for names, values in zip(rows[::2], rows[1::2], strict=True):
        group = names[0].rstrip(":")
        for name, value in zip(names[1:], values[1:], strict=True):
            counters[f"{group}.{name}"] = int(value)
    return counters
