"""The TUN device: opened with python-pytun, driven through its raw non-blocking fd.

pytun's read()/write() allocate a new object per call and hold the GIL across the
syscall; the dataplane uses ``os.read``/``os.write`` on ``fileno()`` in drain loops.
"""

from __future__ import annotations

import errno
import os

import pytun


class TunError(OSError):
    """A TUN device could not be opened or configured; the message says what to do."""


class TunDevice:
    def __init__(self, name: str = "flannel0", *, multi_queue: bool = False) -> None:
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI
        if multi_queue:
            flags |= pytun.IFF_MULTI_QUEUE
        try:
            self._dev = pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else None
            text = e.args[1] if len(e.args) > 1 else str(e)
            if code in (errno.EPERM, errno.EACCES):
                raise TunError(
                    code,
                    f"cannot create TUN device {name}: {text} "
                    "(needs root or CAP_NET_ADMIN, and access to /dev/net/tun)",
                ) from None
            if code == errno.ENOENT:
                raise TunError(code, "cannot open /dev/net/tun: load the tun module") from None
            raise TunError(code or 0, f"cannot create TUN device {name}: {text}") from None
        self.name: str = self._dev.name
        self.fd: int = self._dev.fileno()
        os.set_blocking(self.fd, False)

    def read_batch(self, limit: int = 64, size: int = 65535) -> list[bytes]:
        """Up to ``limit`` packets that are already queued (never blocks)."""
        packets = []
        read = os.read
        fd = self.fd
        for _ in range(limit):
            try:
                packets.append(read(fd, size))
            except BlockingIOError:
                break
        return packets

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Write one packet; False when the queue is full (the caller counts the drop)."""
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        self._dev.close()
