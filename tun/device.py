"""The TUN device: opened with python-pytun, driven through its raw non-blocking fd.

pytun's read()/write() allocate a new object per call and hold the GIL across the
syscall; the dataplane uses ``os.read``/``os.write`` on ``fileno()`` in drain loops.

With ``vnet_hdr`` (IFF_VNET_HDR, see ``tun.offload``) every read and write carries a
10-byte virtio_net_hdr in front of the packet: ``offset`` says how many bytes to skip on
read, and ``write`` adds a plain header.
"""

from __future__ import annotations

import errno
import os

import pytun

from tun import offload


class TunError(OSError):
    """A TUN device could not be opened or configured; the message says what to do."""


class TunDevice:
    def __init__(
        self, name: str = "flannel0", *, multi_queue: bool = False, vnet_hdr: bool = False
    ) -> None:
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI
        if multi_queue:
            flags |= pytun.IFF_MULTI_QUEUE
        if vnet_hdr:
            flags |= pytun.IFF_VNET_HDR
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
        self._raw_fd: int | None = None  # set once enable_vnet_hdr() re-attached us
        self.vnet_hdr = vnet_hdr
        # TUN_F_* the kernel may use on packets it hands us (every queue fd gets the same).
        self.offload_features = 0
        if vnet_hdr:
            offload.set_offload(self.fd, self.offload_features)
        os.set_blocking(self.fd, False)

    @property
    def offset(self) -> int:
        """Bytes in front of each packet read from the TUN (the virtio_net_hdr, if on)."""
        return offload.VNET_HDR_LEN if self.vnet_hdr else 0

    def enable_vnet_hdr(self) -> bool:
        """Switch an open TUN to IFF_VNET_HDR in place (same name, address, routes): True
        when it is on. Call before the fd is registered anywhere; ``fd`` changes."""
        if self.vnet_hdr:
            return True
        try:
            fd, self.vnet_hdr = offload.reopen_with_vnet_hdr(
                self.name, self.fd, self._close_current
            )
        except offload.TunLost as e:
            raise TunError(e.errno or 0, f"{e.strerror}: the TUN device is gone") from None
        except OSError:
            return False  # nothing changed
        self._raw_fd = self.fd = fd
        return self.vnet_hdr

    def enable_tso(self) -> bool:
        """Let the kernel hand us TCP super-packets and partial checksums (``tun.offload.
        TSO``); True when it accepted. Needs IFF_VNET_HDR."""
        if not self.vnet_hdr:
            return False
        try:
            offload.set_offload(self.fd, offload.TSO)
        except OSError:
            return False
        self.offload_features = offload.TSO
        return True

    def _close_current(self) -> None:
        if self._raw_fd is None:
            self._dev.close()
        else:
            os.close(self._raw_fd)
            self._raw_fd = None

    def open_queue(self) -> int:
        """Attach one more queue to this IFF_MULTI_QUEUE device, for a worker process: a
        new non-blocking fd. The kernel applies IFF_* flags device-wide, so the new queue
        must ask for exactly ours, and it gets the same TUNSETOFFLOAD value as the first."""
        flags = offload.IFF_TUN | offload.IFF_NO_PI | offload.IFF_MULTI_QUEUE
        if self.vnet_hdr:
            flags |= offload.IFF_VNET_HDR
        try:
            fd = offload._attach(self.name, flags)
        except OSError as e:
            raise TunError(
                e.errno or 0, f"cannot attach another queue to TUN {self.name}: {e.strerror}"
            ) from None
        if self.vnet_hdr:
            try:
                offload.set_offload(fd, self.offload_features)
            except OSError:
                os.close(fd)
                raise
        return fd

    @classmethod
    def adopt_queue(cls, fd: int, name: str, *, vnet_hdr: bool, offload_features: int) -> TunDevice:
        """A TunDevice around a queue fd that another process attached (``open_queue``)
        and passed to us: a worker must not create the device itself. Keep the
        attributes in step with ``__init__``."""
        dev = cls.__new__(cls)
        dev._dev = None
        dev.name = name
        dev.fd = fd
        dev._raw_fd = fd  # close() closes it; enable_vnet_hdr() is a no-op when on
        dev.vnet_hdr = vnet_hdr
        dev.offload_features = offload_features
        os.set_blocking(fd, False)
        return dev

    def read_batch(self, limit: int = 64, size: int = 65535) -> list[bytes]:
        """Up to ``limit`` packets that are already queued (never blocks)."""
        packets = []
        read = os.read
        fd = self.fd
        skip = self.offset
        for _ in range(limit):
            try:
                data = read(fd, size + skip)
            except BlockingIOError:
                break
            packets.append(data[skip:] if skip else data)
        return packets

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Write one packet; False when the queue is full (the caller counts the drop)."""
        try:
            if self.vnet_hdr:
                os.writev(self.fd, [offload.PLAIN, packet])
            else:
                os.write(self.fd, packet)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._raw_fd is not None:
            os.close(self._raw_fd)
            self._raw_fd = None
        else:
            self._dev.close()
