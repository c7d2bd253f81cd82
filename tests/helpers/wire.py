"""The underlay of the dataplane unit tests: two network namespaces and real sockets.

``Underlay``: our node's namespace (192.0.2.1) and the peers' (192.0.2.2 = peer A, .3 = B,
.99 = a stranger), joined by a veth pair (jumbo frames, so a VXLAN datagram of a 1472-byte
packet is a GSO segment too) with static neighbour entries, so a send is delivered before
it returns (nothing waits for ARP). A ``Wire`` is one test's sockets on it: the
dataplane's own (``overlay.dataplane.udp_socket.open_socket``, in our namespace) and one socket
for all the peers (IP_PKTINFO picks a send's source address and reports a receive's
destination; UDP_GRO hands over a GSO send as it was sent, with its segment size).
Sockets are opened in a namespace by a thread that enters it (setns), and stay there.

``failing_sendmsg``: runs a call with every sendmsg() of its thread failing with an errno
(seccomp): the EIO a device without checksum offload gives a GSO send cannot be produced
on this kernel (it falls back to software checksums, and it has no xfrm transforms).
"""

from __future__ import annotations

import ctypes
import os
import platform
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from encap import gso
from overlay.dataplane.udp_socket import open_socket

T = TypeVar("T")

OURS = "192.0.2.1"
PEER_A, PEER_B, STRANGER = "192.0.2.2", "192.0.2.3", "192.0.2.99"
IP_PKTINFO = 8  # Linux; not in Python's socket module
SO_NO_CHECK = 11
SO_MEMINFO = 55  # u32[9]: rmem_alloc first
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(name: str, call: Callable[[], T]) -> T:
    """``call()`` in a thread inside network namespace ``name``."""
    return _in_thread(lambda: (_enter(name), call())[1])


def _enter(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def _in_thread(call: Callable[[], T]) -> T:
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class Underlay:
    def __init__(self, prefix: str) -> None:
        self.ours, self.theirs = f"{prefix}-u1", f"{prefix}-u2"
        self.our_link, self.their_link = f"{prefix}u1", f"{prefix}u2"
        self.made: list[str] = []
        try:
            for ns in (self.ours, self.theirs):
                _sh("ip", "netns", "add", ns)
                self.made.append(ns)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "link", "add", self.our_link, "netns", self.ours, "type", "veth",
                "peer", self.their_link, "netns", self.theirs)  # fmt: skip
            _sh("ip", "-n", self.ours, "addr", "add", f"{OURS}/24", "dev", self.our_link)
            for ip in (PEER_A, PEER_B, STRANGER):
                _sh("ip", "-n", self.theirs, "addr", "add", f"{ip}/24", "dev", self.their_link)
            macs = {}
            for ns, link in ((self.ours, self.our_link), (self.theirs, self.their_link)):
                _sh("ip", "-n", ns, "link", "set", link, "up", "mtu", "9000")
                macs[ns] = _sh("ip", "-n", ns, "-br", "link", "show", link).split()[2]
            for ip in (PEER_A, PEER_B, STRANGER):
                self._neighbour(self.ours, self.our_link, ip, macs[self.theirs])
            self._neighbour(self.theirs, self.their_link, OURS, macs[self.ours])
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _neighbour(ns: str, link: str, ip: str, mac: str) -> None:
        _sh("ip", "-n", ns, "neigh", "replace", ip, "lladdr", mac, "dev", link, "nud", "permanent")

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        self.made.clear()


def _rmem(sock: socket.socket) -> int:
    value: int = struct.unpack_from("=I", sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[0]
    return value


def _wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 2
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"the underlay did not deliver {what}")
        time.sleep(0.0005)


class Wire:
    def __init__(self, underlay: Underlay, port: int = 8285, sock_class: Any = None) -> None:
        self.port = port
        self.sock: socket.socket = in_netns(underlay.ours, lambda: open_socket(OURS, port))
        if sock_class is not None:  # the same socket, as another socket class
            self.sock = sock_class(fileno=self.sock.detach())
            self.sock.setblocking(False)
        self.peers: socket.socket = in_netns(underlay.theirs, self._peer_socket)
        self.log: list[tuple[bytes, int, tuple[str, int]]] = []  # (data, gso size, to)

    def _peer_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for force in (33, 32):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE: a drain's worth and more
            sock.setsockopt(socket.SOL_SOCKET, force, 64 << 20)
        sock.setsockopt(gso.SOL_UDP, gso.UDP_GRO, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind(("0.0.0.0", self.port))
        sock.setblocking(False)
        return sock

    def queue(self, data: bytes, segment: int = 0, source: str = PEER_A) -> None:
        """A datagram from ``source`` to us (with ``segment``: a GSO send of ``segment``-byte
        datagrams), there when this returns."""
        info = struct.pack("=i4s4s", 0, socket.inet_aton(source), bytes(4))
        ancdata = [(socket.IPPROTO_IP, IP_PKTINFO, info)]
        if segment and len(data) > segment:
            ancdata += gso.segment_cmsg(segment)
        before = _rmem(self.sock)
        self.peers.sendmsg([data], ancdata, 0, (OURS, self.port))
        _wait_for(lambda: _rmem(self.sock) > before, "a datagram to us")

    def sent(self) -> list[tuple[bytes, int, tuple[str, int]]]:
        """Every send the peers have seen so far: (data, GSO segment size or 0, to)."""
        while select.select([self.peers], [], [], 0.002)[0]:
            while True:
                try:
                    data, ancdata, _, _ = self.peers.recvmsg(1 << 17, 256)
                except BlockingIOError:
                    break
                to = ""
                for level, kind, value in ancdata:
                    if (level, kind) == (socket.IPPROTO_IP, IP_PKTINFO):
                        to = socket.inet_ntoa(value[8:12])  # ipi_addr: the destination
                size = gso.gro_size(ancdata, 0)
                self.log.append((data, size if size < len(data) else 0, (to, self.port)))
        return self.log

    def datagrams(self) -> list[tuple[bytes, tuple[str, int]]]:
        """What went on the wire: each GSO send cut into its datagrams."""
        out = []
        for data, size, addr in self.sent():
            for a, b in gso.split_points(len(data), size or len(data)):
                out.append((data[a:b], addr))
        return out

    def close(self) -> None:
        self.sock.close()
        self.peers.close()


_SECCOMP_ARCH = {"x86_64": (0xC000003E, 46), "aarch64": (0xC00000B7, 211)}  # (audit arch, sendmsg)


def failing_sendmsg(error: int, call: Callable[[], T]) -> T:
    """``call()`` in a thread whose sendmsg() calls all fail with ``error`` (a seccomp
    filter, which only that thread carries and which goes with it)."""
    arch, nr = _SECCOMP_ARCH[platform.machine()]

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    program = b"".join(
        (
            op(0x20, 4),  # ld [4]: arch
            op(0x15, arch, 0, 3),  # jeq arch, else allow
            op(0x20, 0),  # ld [0]: syscall number
            op(0x15, nr, 0, 1),  # jeq sendmsg, else allow
            op(0x06, 0x00050000 | error),  # ret SECCOMP_RET_ERRNO | error
            op(0x06, 0x7FFF0000),  # ret SECCOMP_RET_ALLOW
        )
    )
    code = ctypes.create_string_buffer(program)

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Prog(len(program) // 8, ctypes.cast(code, ctypes.c_void_p))

    def filtered() -> T:
        if _libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
            raise OSError(ctypes.get_errno(), "seccomp")
        return call()

    return _in_thread(filtered)
