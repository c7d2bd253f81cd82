"""rtnetlink for the many per-peer objects, without pyroute2's per-message cost.

A node with thousands of peers has three kernel objects per peer (neighbour, fdb entry,
route). pyroute2 builds and parses each message as a tree of Python objects and waits
for each answer, ~3 ms a peer; here requests are packed with ``struct``, sent many per
``sendmsg`` (as one buffer: the kernel runs them in order and acknowledges each), and
the acknowledgements read back in bulk, so a batch of thousands costs the kernel's own
work plus a few microseconds of Python per message. Dumps are parsed for the handful
of attributes a check needs, not decoded whole. Both families: a message's family follows
from its address (4 bytes: IPv4, 16: IPv6), and the IPv6 dumps are asked for on their own
(a node without IPv6 does not pay for them).

Links, addresses and the vxlan device stay with pyroute2 (``overlay.kernel.objects``):
a node has a few of them.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NLMSG_ERROR_CODE = struct.Struct("=i")
RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
RTATTR = struct.Struct("=HH")  # length, type
U32 = struct.Struct("=I")

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x400, 0x300
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 9, 15
RTA_METRICS, RTAX_MTU = 8, 2  # a route's metrics (nested), its MTU among them
NDA_DST, NDA_LLADDR = 1, 2
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2  # the kernel's own routes (IPv6: one per address, fe80::/64, ff00::/8)
RTPROT_STATIC = 4  # what pyroute2 (and so we, before) wrote
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
AF_BRIDGE = 7
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # errors without a copy of the request
SO_RCVBUFFORCE = 33

CHUNK = 256  # requests per sendmsg: their acknowledgements fit the receive buffer
RECEIVE_BUFFER = 4 << 20
READ_SIZE = 256 << 10
DUMP_RETRIES = 3
# Seconds a receive waits: a kernel that never answers is an error, not a hang.
ANSWER_TIMEOUT = 10.0


@dataclass(frozen=True)
class Request:
    """One rtnetlink message without its header: type, flags (beyond REQUEST|ACK), body."""

    type: int
    flags: int
    body: bytes


def family_of(address: bytes) -> int:
    """AF_INET for a packed IPv4 address, AF_INET6 for a packed IPv6 one."""
    if len(address) == 4:
        return socket.AF_INET
    if len(address) == 16:
        return socket.AF_INET6
    raise ValueError(f"not a packed IPv4 or IPv6 address: {len(address)} bytes")


def attr(kind: int, payload: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    size = RTATTR.size + len(payload)
    return RTATTR.pack(size, kind) + payload + b"\0" * (-size % 4)


def route_request(
    add: bool,
    dst: bytes,
    dst_len: int,
    *,
    gateway: bytes | None = None,
    oif: int | None = None,
    onlink: bool = False,
    mtu: int = 0,
) -> Request:
    """Replace (``add``) or delete a route of the main table (the family: ``dst``'s). A
    deletion matches any scope and protocol, as ``ip route del`` does. A device route is
    scope link in IPv4; IPv6 routes have no scope (the kernel keeps them universe).
    ``mtu``: the route's own MTU (``ip route ... mtu N``), below its device's; 0: none."""
    family = family_of(dst)
    if add:
        link = gateway is None and not onlink and family == socket.AF_INET
        scope = RT_SCOPE_LINK if link else RT_SCOPE_UNIVERSE
        header = RTMSG.pack(
            family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, scope, RTN_UNICAST,
            RTNH_F_ONLINK if onlink else 0,
        )  # fmt: skip
    else:
        header = RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, 0, RT_SCOPE_NOWHERE, 0, 0)
    body = header + attr(RTA_TABLE, U32.pack(RT_TABLE_MAIN)) + attr(RTA_DST, dst)
    if gateway is not None:
        body += attr(RTA_GATEWAY, gateway)
    if oif is not None:
        body += attr(RTA_OIF, U32.pack(oif))
    if add and mtu:
        body += attr(RTA_METRICS, attr(RTAX_MTU, U32.pack(mtu)))
    if add:
        return Request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)
    return Request(RTM_DELROUTE, 0, body)


def neighbour_request(add: bool, ifindex: int, dst: bytes, lladdr: bytes) -> Request:
    """A permanent ARP (IPv6: neighbour discovery) entry (replace), or its deletion."""
    body = NDMSG.pack(family_of(dst), ifindex, NUD_PERMANENT, 0, 0) + attr(NDA_DST, dst)
    if add:
        body += attr(NDA_LLADDR, lladdr)
        return Request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)
    return Request(RTM_DELNEIGH, 0, body)


def fdb_request(add: bool, ifindex: int, lladdr: bytes, dst: bytes) -> Request:
    """A permanent fdb entry of a vxlan device (``bridge fdb replace ... self``): the MAC
    is reached through the remote ``dst`` (IPv4, or IPv6 on flannel-v6.<VNI>); or its
    deletion (that MAC and remote only)."""
    family_of(dst)  # a remote of another size is a bug, not a message the kernel refuses
    body = NDMSG.pack(AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF, 0)
    body += attr(NDA_LLADDR, lladdr) + attr(NDA_DST, dst)
    if add:
        return Request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)
    return Request(RTM_DELNEIGH, 0, body)


def attrs(data: bytes, start: int, end: int, wanted: frozenset[int]) -> dict[int, bytes]:
    """The payloads of the ``wanted`` rtattrs in ``data[start:end]``; stops as soon as
    it has them all (the kernel puts the ones a check reads first)."""
    found: dict[int, bytes] = {}
    while start + 4 <= end:
        size, kind = RTATTR.unpack_from(data, start)
        if size < 4:
            break
        if kind in wanted:
            found[kind] = data[start + 4 : start + size]
            if len(found) == len(wanted):
                break
        start += (size + 3) & ~3
    return found


ROUTE_ATTRS = frozenset({RTA_TABLE, RTA_DST, RTA_GATEWAY, RTA_OIF, RTA_MULTIPATH})
NEIGHBOUR_ATTRS = frozenset({NDA_DST, NDA_LLADDR})


class DumpedRoute(NamedTuple):
    family: int  # AF_INET or AF_INET6
    dst: int  # network address as an int
    dst_len: int
    gateway: int | None
    oif: int | None
    onlink: bool
    scope: int
    table: int
    multipath: bool
    protocol: int


# The layouts the kernel dumps our objects in, read with one unpack each (anything else
# takes the general attribute walk): a route as rtmsg + RTA_TABLE, RTA_DST, then
# RTA_GATEWAY (or RTA_PREFSRC) and RTA_OIF; a neighbour as ndmsg + NDA_DST, NDA_LLADDR;
# an fdb entry as ndmsg + NDA_LLADDR, NDA_DST.
FAST_ROUTE = struct.Struct("=BBBBBBBBI HHI HH4s HH4s HHI")
FAST_NEIGHBOUR = struct.Struct("=BxxxiHBB HH4s HH6s")
FAST_FDB = struct.Struct("=BxxxiHBB HH6s2x HH4s")
RTA_PREFSRC = 7
FAST_ROUTE_LAYOUT = (8, RTA_TABLE, 8, RTA_DST, 8, 8, RTA_OIF)
FAST_THIRD = (RTA_GATEWAY, RTA_PREFSRC)


ZERO = {socket.AF_INET: bytes(4), socket.AF_INET6: bytes(16)}  # RTA_DST of a default route
LINK_LOCAL6 = 0xFE80 >> 6  # fe80::/10, the top 10 bits
MULTICAST6 = 0xFF  # ff00::/8


def _route(data: bytes, start: int, end: int) -> DumpedRoute | None:
    """An IPv4 or IPv6 unicast route message (None: another family or type)."""
    family, dst_len, _, _, table, protocol, scope, kind, flags = RTMSG.unpack_from(data, start)
    if family not in ZERO or kind != RTN_UNICAST:
        return None
    got = attrs(data, start + RTMSG.size, end, ROUTE_ATTRS)
    if RTA_TABLE in got:
        table = U32.unpack(got[RTA_TABLE])[0]
    gateway, oif = got.get(RTA_GATEWAY), got.get(RTA_OIF)
    return DumpedRoute(
        family=family,
        dst=int.from_bytes(got.get(RTA_DST, ZERO[family]), "big"),
        dst_len=dst_len,
        gateway=int.from_bytes(gateway, "big") if gateway else None,
        oif=U32.unpack(oif)[0] if oif else None,
        onlink=bool(flags & RTNH_F_ONLINK),
        scope=scope,
        table=table,
        multipath=RTA_MULTIPATH in got,
        protocol=protocol,
    )


# A main-table unicast route as a check compares it: (family, destination as an int, its
# length, gateway as an int or None, output device index or None, onlink). The family
# keeps 10.0.0.0/8 and ::a00:0/8 apart.
RouteKey = tuple[int, int, int, int | None, int | None, bool]
# A permanent neighbour: (device index, packed address, MAC); an fdb entry: (device
# index, MAC, packed remote). 4 or 16 bytes: the family is in the address's size.
NeighbourKey = tuple[int, bytes, bytes]
FdbKey = tuple[int, bytes, bytes]


class Rtnl:
    """One NETLINK_ROUTE socket of this thread's network namespace, for batches and dumps
    (not thread-safe: the kernel worker thread owns it)."""

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        self.sock.bind((0, 0))
        for option, level, value in (
            (NETLINK_CAP_ACK, SOL_NETLINK, 1),
            (SO_RCVBUFFORCE, socket.SOL_SOCKET, RECEIVE_BUFFER),
        ):
            try:
                self.sock.setsockopt(level, option, value)
            except OSError:
                pass  # an old kernel, or not root: smaller chunks still fit the default
        self.sock.settimeout(ANSWER_TIMEOUT)
        self._seq = int.from_bytes(os.urandom(2), "big") << 8

    def close(self) -> None:
        self.sock.close()

    def _next(self) -> int:
        self._seq = (self._seq + 1) & 0x3FFFFFFF  # room above for a chunk's run
        return self._seq

    def run(self, requests: Sequence[Request]) -> list[int]:
        """Send every request (CHUNK per sendmsg), in order; the errno of each (0: done)."""
        return [code for code, _ in self._exchange(requests, NLM_F_ACK)]

    def route_get(self, addresses: Sequence[bytes]) -> list[DumpedRoute | None]:
        """``ip route get`` for each address (IPv4 or IPv6), all sent together; None where
        the kernel has no route (or a multipath one, which is not one hop)."""
        requests = [
            Request(
                RTM_GETROUTE,
                0,
                RTMSG.pack(family_of(a), len(a) * 8, 0, 0, 0, 0, 0, 0, 0) + attr(RTA_DST, a),
            )
            for a in addresses
        ]
        return [
            _route(*reply) if reply is not None else None
            for _, reply in self._exchange(requests, 0)
        ]

    def _exchange(
        self, requests: Sequence[Request], ack: int
    ) -> list[tuple[int, tuple[bytes, int, int] | None]]:
        """Each request's errno and, for a request answered with a message (a get), that
        message (data, body start, end). With ``ack`` every request is answered by an
        acknowledgement; without, by its answer or an error: one message each."""
        results: list[tuple[int, tuple[bytes, int, int] | None]] = []
        for start in range(0, len(requests), CHUNK):
            results += self._exchange_chunk(requests[start : start + CHUNK], ack)
        return results

    def _exchange_chunk(
        self, requests: Sequence[Request], ack: int
    ) -> list[tuple[int, tuple[bytes, int, int] | None]]:
        first = self._next()
        parts = []
        for offset, request in enumerate(requests):
            flags = NLM_F_REQUEST | ack | request.flags
            size = NLMSG_HEADER.size + len(request.body)
            header = NLMSG_HEADER.pack(size, request.type, flags, first + offset, 0)
            parts.append(header + request.body)
        self._seq = first + len(requests)  # one netlink datagram: sent whole or not at all
        self.sock.send(b"".join(parts))
        results: list[tuple[int, tuple[bytes, int, int] | None] | None] = [None] * len(requests)
        waiting = len(requests)
        while waiting:
            data = self.sock.recv(READ_SIZE)
            for kind, _, seq, start, end in _messages(data):
                index = seq - first
                if not 0 <= index < len(results) or results[index] is not None:
                    continue  # a late answer to something else
                if kind == NLMSG_ERROR:
                    results[index] = (-NLMSG_ERROR_CODE.unpack_from(data, start)[0], None)
                else:
                    results[index] = (0, (data, start, end))
                waiting -= 1
        return [r for r in results if r is not None]

    def _dump(self, kind: int, body: bytes) -> list[tuple[bytes, int, int]]:
        """(data, body start, end) of each message of a dump; redone when the kernel says
        it was interrupted by a change (a consistent picture, or an error)."""
        for _ in range(DUMP_RETRIES):
            seq = self._next()
            size = NLMSG_HEADER.size + len(body)
            self.sock.send(NLMSG_HEADER.pack(size, kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
            found: list[tuple[bytes, int, int]] = []
            interrupted = done = False
            while not done:
                data = self.sock.recv(READ_SIZE)
                for mtype, flags, mseq, start, end in _messages(data):
                    if mseq != seq:
                        continue  # a late answer to something else
                    interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                    if mtype == NLMSG_DONE:
                        done = True
                    elif mtype == NLMSG_ERROR:
                        code = -NLMSG_ERROR_CODE.unpack_from(data, start)[0]
                        raise OSError(code, f"rtnetlink dump: {os.strerror(code)}")
                    else:
                        found.append((data, start, end))
            if not interrupted:
                return found
        raise OSError(errno.EAGAIN, "rtnetlink dump kept being interrupted by changes")

    def routes(self, family: int = socket.AF_INET) -> set[RouteKey]:
        """The unicast routes of the main table of one family; IPv6 without the kernel's
        own (an address's, fe80::/64 on every device), which no one programs."""
        if family == socket.AF_INET6:
            return self._routes6()
        request = RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        found: set[RouteKey] = set()
        size = FAST_ROUTE.size
        for data, start, end in self._dump(RTM_GETROUTE, request):
            if end - start >= size:
                (family, dst_len, _, _, _, _, _, kind, flags, l1, t1, table, l2, t2, dst,
                 l3, t3, third, l4, t4, oif) = FAST_ROUTE.unpack_from(data, start)  # fmt: skip
                if (l1, t1, l2, t2, l3, l4, t4) == FAST_ROUTE_LAYOUT and t3 in FAST_THIRD:
                    if family == socket.AF_INET and kind == RTN_UNICAST and table == RT_TABLE_MAIN:
                        gateway = int.from_bytes(third, "big") if t3 == RTA_GATEWAY else None
                        onlink = bool(flags & RTNH_F_ONLINK)
                        dst_int = int.from_bytes(dst, "big")
                        found.add((socket.AF_INET, dst_int, dst_len, gateway, oif, onlink))
                    continue
            route = _route(data, start, end)
            if route is not None and route.table == RT_TABLE_MAIN:
                found.add(route[:6])
        return found

    def _routes6(self) -> set[RouteKey]:
        """IPv6 routes take the general walk: they are laid out with more attributes
        (priority, cache info, preference) and a node has a peer's worth of them only on
        host-gw or flannel-v6.<VNI>. fe80::/10 and ff00::/8 are the kernel's on every
        device, whoever added them."""
        request = RTMSG.pack(socket.AF_INET6, 0, 0, 0, 0, 0, 0, 0, 0)
        found: set[RouteKey] = set()
        for data, start, end in self._dump(RTM_GETROUTE, request):
            route = _route(data, start, end)
            if (
                route is not None
                and route.family == socket.AF_INET6
                and route.table == RT_TABLE_MAIN
                and route.protocol != RTPROT_KERNEL
                and route.dst >> 118 != LINK_LOCAL6
                and route.dst >> 120 != MULTICAST6
            ):
                found.add(route[:6])
        return found

    def neighbours(self, ifindexes: set[int], family: int = socket.AF_INET) -> set[NeighbourKey]:
        """The permanent neighbours (ARP entries; IPv6: neighbour discovery) of one family
        on these devices."""
        request = NDMSG.pack(family, 0, 0, 0, 0)
        found: set[NeighbourKey] = set()
        for data, start, end in self._dump(RTM_GETNEIGH, request):
            if end - start >= FAST_NEIGHBOUR.size:
                (entry_family, ifindex, state, _, _, l1, t1, dst, l2, t2,
                 mac) = FAST_NEIGHBOUR.unpack_from(data, start)  # fmt: skip
                if (l1, t1, l2, t2) == (8, NDA_DST, 10, NDA_LLADDR):
                    if state & NUD_PERMANENT and entry_family == family and ifindex in ifindexes:
                        found.add((ifindex, dst, mac))
                    continue
            entry_family, ifindex, state, _, _ = NDMSG.unpack_from(data, start)
            if entry_family != family or ifindex not in ifindexes or not state & NUD_PERMANENT:
                continue
            got = attrs(data, start + NDMSG.size, end, NEIGHBOUR_ATTRS)
            if NDA_DST in got and NDA_LLADDR in got:
                found.add((ifindex, got[NDA_DST], got[NDA_LLADDR]))
        return found

    def fdb(self, ifindex: int) -> set[FdbKey]:
        """Each fdb entry of one vxlan device that has a remote (IPv4, or IPv6 on
        flannel-v6.<VNI>)."""
        request = IFINFOMSG.pack(AF_BRIDGE, 0, ifindex, 0, 0)  # the device: ifi_index
        found: set[FdbKey] = set()
        for data, start, end in self._dump(RTM_GETNEIGH, request):
            if end - start >= FAST_FDB.size:
                family, index, _, _, _, l1, t1, mac, l2, t2, dst = FAST_FDB.unpack_from(data, start)
                if (l1, t1, l2, t2) == (10, NDA_LLADDR, 8, NDA_DST):
                    if family == AF_BRIDGE and index == ifindex:
                        found.add((index, mac, dst))
                    continue
            family, index, _, _, _ = NDMSG.unpack_from(data, start)
            if family != AF_BRIDGE or index != ifindex:
                continue
            got = attrs(data, start + NDMSG.size, end, NEIGHBOUR_ATTRS)
            dst, lladdr = got.get(NDA_DST), got.get(NDA_LLADDR)
            if dst is not None and lladdr is not None and len(dst) in (4, 16):
                found.add((index, lladdr, dst))
        return found


def _messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, sequence, body start, end) of each netlink message in ``data``."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        size, kind, flags, seq, _ = NLMSG_HEADER.unpack_from(data, offset)
        if size < NLMSG_HEADER.size:
            break
        yield kind, flags, seq, offset + NLMSG_HEADER.size, offset + size
        offset += (size + 3) & ~3
