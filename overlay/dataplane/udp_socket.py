"""The UDP socket a dataplane sends and receives on, and the kernel features it probes
on it (UDP GSO on send, GRO on receive)."""

from __future__ import annotations

import socket

from encap import gso

SOCKET_BUFFER = 32 * 1024 * 1024
# recvmsg ancillary space for the UDP_GRO cmsg (one int).
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: "flags & IntFlag" runs enum code (~0.6 us)


def open_socket(address: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The UDP socket peers send to, bound to the underlay address, with large buffers.

    Exclusive to this daemon: no SO_REUSEADDR, with which any local user could bind the
    same port (UDP shares a port between sockets that all set it, whatever their uid)
    and read the overlay's traffic. With ``reuse_port`` several sockets (one per worker)
    share the address, the kernel picking one per datagram by a hash of its 4-tuple;
    the kernel admits a socket to a SO_REUSEPORT group only with the effective uid of
    the group's first socket, so only our own processes can join
    (tests/netns/test_hardening.py tries it as nobody). An IPv6 ``address`` gives an
    IPv6 socket (vxlan's IPv6 half), exclusive the same way."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    # SO_{RCV,SND}BUFFORCE ignores net.core.{r,w}mem_max; allowed for CAP_NET_ADMIN.
    for force in (33, 32):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            pass
    sock.bind((address, port))
    sock.setblocking(False)
    return sock


def probe_udp_segment(sock: socket.socket) -> bool:
    """Whether the kernel knows UDP_SEGMENT (Linux >= 4.18). Setting the socket default to
    0 ("no segmentation") is harmless; per-send sizes travel in a cmsg."""
    try:
        sock.setsockopt(gso.SOL_UDP, gso.UDP_SEGMENT, 0)
    except OSError:
        return False
    return True


def enable_udp_gro(sock: socket.socket) -> bool:
    """Turn on UDP_GRO (Linux >= 5.0); False when the kernel refuses it."""
    try:
        sock.setsockopt(gso.SOL_UDP, gso.UDP_GRO, 1)
    except OSError:
        return False
    return True
