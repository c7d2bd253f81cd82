"""A TUN stand-in for the dataplane tests (the fd the dataplane reads and writes), whose
writes come back resegmented as the kernel would."""

from __future__ import annotations

import socket

from encap import gso
from tests.helpers.tcp_streams import resegment


class FakeTun:
    """A TUN stand-in: a SOCK_SEQPACKET pair keeps packet boundaries like the real fd."""

    def __init__(self, vnet_capable: bool, buffer: int = 1 << 22) -> None:
        self.kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (self.kernel, ours):  # room for a drain's worth of packets, as a TUN has
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        ours.setblocking(False)
        self.kernel.setblocking(False)
        self._ours = ours
        self.fd = ours.fileno()
        self.vnet_capable = vnet_capable
        self.vnet_hdr = False
        self.writes = 0  # TUN writes seen by written()

    @property
    def offset(self) -> int:
        return 10 if self.vnet_hdr else 0

    def enable_vnet_hdr(self) -> bool:
        self.vnet_hdr = self.vnet_capable
        return self.vnet_hdr

    def enable_tso(self) -> bool:
        return self.vnet_hdr

    def write(self, packet: bytes) -> bool:
        self._ours.send((gso.VNET_PLAIN if self.vnet_hdr else b"") + bytes(packet))
        return True

    def inject(self, packet: bytes, vnet: bytes = gso.VNET_PLAIN) -> None:
        """A packet the kernel routes into the TUN (what the dataplane reads), behind
        ``vnet`` if the TUN has IFF_VNET_HDR."""
        self.kernel.send((vnet if self.vnet_hdr else b"") + packet)

    def raw_written(self) -> list[bytes]:
        """Each write the dataplane made, as it made it."""
        out = []
        while True:
            try:
                out.append(self.kernel.recv(1 << 17))
            except BlockingIOError:
                return out

    def written(self) -> list[bytes]:
        """What the dataplane wrote, resegmented as the kernel would."""
        out = []
        for data in self.raw_written():
            self.writes += 1
            out += resegment([data[:10], data[10:]]) if self.vnet_hdr else [data]
        return out

    def close(self) -> None:
        self.kernel.close()
        self._ours.close()
