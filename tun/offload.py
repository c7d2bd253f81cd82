"""TUN offload plumbing: the virtio_net_hdr and the ioctls behind IFF_VNET_HDR.

With IFF_VNET_HDR every read from and write to the TUN carries a 10-byte
``struct virtio_net_hdr`` in front of the packet. Writes may be TCP super-packets
(GSO_TCPV4) that the kernel forwards whole and segments only if some device on the way
needs it. Reads are plain packets while TUNSETOFFLOAD is 0; with ``TSO`` (CSUM | TSO4 | TSO6) the
kernel may hand us TCP super-packets and partial checksums, which ``encap.tso`` finishes.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
# What we offer the kernel: IPv4 and IPv6 TCP super-packets (which need checksum offload
# too; IPv6 ones go to vxlan's IPv6 half, else are dropped as not IPv4, one count per
# super-packet). Not TSO_ECN (the kernel then cuts CWR-marked ones itself) nor USO (UDP
# super-packets).
TSO = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

# struct virtio_net_hdr (include/uapi/linux/virtio_net.h): flags, gso_type, hdr_len,
# gso_size, csum_start, csum_offset, in native byte order (no TUNSETVNETLE). The GSO
# headers themselves are built by encap.gso.tcp_super_header.
VNET_HDR_LEN = 10
# The header of a plain packet: no GSO, checksum already complete.
PLAIN = bytes(VNET_HDR_LEN)

_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags, padding to 40 bytes


class TunLost(OSError):
    """The old fd is closed and no new one could be attached: the TUN is unusable."""


def tun_flags(fd: int) -> int:
    """The IFF_* flags the TUN attached to ``fd`` runs with (TUNGETIFF)."""
    name_flags = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    flags: int = _IFREQ.unpack(name_flags)[1]
    return flags


def set_offload(fd: int, features: int) -> None:
    """TUNSETOFFLOAD: which TUN_F_* offloads the kernel may use on packets it hands us."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, features)


def _attach(name: str, flags: int) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
        if flags & IFF_VNET_HDR:
            set_offload(fd, 0)  # never super-packets or partial checksums to us
    except OSError:
        os.close(fd)
        raise
    return fd


def reopen_with_vnet_hdr(name: str, old_fd: int, close_old: Callable[[], None]) -> tuple[int, bool]:
    """Re-attach the TUN ``name`` with IFF_VNET_HDR; return (new non-blocking fd, whether
    the header is on).

    The flag can only be chosen when a file attaches to the device, so: mark the device
    persistent (it survives its last fd, keeping its address, MTU and routes), close the
    old fd through ``close_old()``, attach a new one with the flag, clear persist again
    (the device still goes away with our fd, as before). If the kernel refuses the flag
    the device is re-attached as it was. Raises OSError if the device cannot be made
    persistent (nothing changed then), TunLost if it cannot be re-attached at all.
    """
    flags = tun_flags(old_fd) & (IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE)
    fcntl.ioctl(old_fd, TUNSETPERSIST, 1)
    close_old()
    try:
        fd, vnet = _attach(name, flags | IFF_VNET_HDR), True
    except OSError:
        try:
            fd, vnet = _attach(name, flags), False
        except OSError as e:
            raise TunLost(e.errno, f"re-attaching TUN {name}: {e.strerror}") from None
    fcntl.ioctl(fd, TUNSETPERSIST, 0)
    return fd, vnet
