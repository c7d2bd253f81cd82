"""flannel's udp backend: TUN <-> UDP socket, one inner IPv4 packet per datagram.

The two handlers are drain loops registered with ``loop.add_reader``: each callback moves
every queued packet (up to a budget, so the other direction is not starved) instead of one
packet per wake-up. Each handler is a few stages, one method each; the per-packet rules
(GSO grouping, receive validation, TCP coalescing) are sans-IO functions in ``encap.gso``.

With ``offload`` (the default) the kernel batches for us, while every datagram on the
wire stays one inner IPv4 packet no larger than the TUN MTU, so flannel's C proxy and
kernel peers still interoperate:

- TX: one drain reads the TUN into an arena, packets back to back; consecutive packets to
  one peer of one length (the last may be shorter) leave in one ``sendmsg`` with
  UDP_SEGMENT, which the kernel cuts into one datagram per packet. With TSO on the TUN
  (``tun_tso``), a TCP super-packet is one read, cut in place into segments
  (``encap.tso``).
- RX: with UDP_GRO one ``recvmsg`` returns up to 64 same-sized datagrams of one sender
  (when the sender used GSO; single datagrams are gathered the same way); each is
  validated on its own. The TUN has IFF_VNET_HDR, so a run of one TCP flow's segments
  goes in as one GSO_TCPV4 super-packet that the kernel forwards to the pod whole.

Everything is probed once; without it (old kernel, ``--no-offload``) the plain per-packet
``sendto``/``recvfrom_into``/``write`` path runs. ``features()`` says what is active.

When the native module loaded (``native``, ``encap.native``) the reader callbacks that
``start()`` registers are C methods, ``native.Drains``' ``tx`` and ``rx``: the whole
wake-up (reads, routing, cutting, GSO planning, sends; receives, gathering, validation,
TUN writes; the counts) without Python but for the rare events that need it (a packet
without a route, an ARP request, a drop). The Python stages below are the same steps
written out: the reference, the path a trace takes (``tap``: ``Drains`` hands such a
wake-up to these methods) and the path without the module; the unit tests run both and
compare them.

At a low packet rate every Python object a wake-up touches is a cache miss, so a
``Drains`` (made at the first ``start()``, dropped at ``stop()``) reads the dataplane's
fixed attributes once: the fds, the vnet header, headroom, tso, gro, tun_gso, mtu, our
subnet, the vxlan rules, the peer table, the counters and the two buffers (exported for
its lifetime). Per wake-up it reads only what may change: ``tap``, ``gso`` (TX) and the
peer table's ``routes`` and ``senders``; it keeps its last route and sender lookups while
those two are the same objects (``PeerTable`` swaps both on every change, so a changed
lease is used at the next wake-up). Its counts stay in C and reach ``counters`` and the
peers' ``PeerStats`` at ``flush()``: at the end of a wake-up when the last flush is a
second old, from every ``Counters.snapshot()`` / ``settle()`` (the dataplane puts
``flush`` in ``counters.pending``), and at ``stop()``; drops are added at once.

What each of these choices bought is in bench/results/design-measurements.md.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from errno import EINVAL, EIO
from ipaddress import IPv4Network
from typing import Any

from control.peer_table import PeerTable
from encap import gso, icmp, native
from encap import tso as tso_codec
from encap.errors import CodecError
from overlay.dataplane.counters import BATCH_MAX, Counters
from overlay.observe.tap import Tap
from tun.device import TunDevice
from tun.offload import VNET_HDR_LEN

# Packets moved per wake-up before yielding to the loop (bounds the other direction's wait).
BUDGET = 256
SOCKET_BUFFER = 32 * 1024 * 1024
MAX_DATAGRAM = 65535
# One drain's packets, back to back (BUDGET packets of a 1500-byte MTU fit with room).
TX_ARENA = 1024 * 1024
# recvmsg ancillary space for the UDP_GRO cmsg (one int).
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: "flags & IntFlag" runs enum code (~0.6 us)


class RateLimiter:
    """Token bucket: ``rate`` events per second with a burst of ``burst``."""

    def __init__(self, rate: float = 100.0, burst: int = 100) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def open_socket(address: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The UDP socket peers send to, bound to the underlay address, with large buffers.

    Exclusive to this daemon: no SO_REUSEADDR, with which any local user could bind the
    same port (UDP shares a port between sockets that all set it, whatever their uid)
    and read the overlay's traffic. With ``reuse_port`` several sockets (one per worker)
    share the address, the kernel picking one per datagram by a hash of its 4-tuple;
    the kernel admits a socket to a SO_REUSEPORT group only with the effective uid of
    the group's first socket, so only our own processes can join
    (tests/netns/test_hardening.py tries it as nobody)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
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


class UdpDataplane:
    # Bytes in front of each packet in a datagram (flannel's udp framing adds none).
    headroom = 0
    arp_replies = 0  # flannel's udp has no ARP; VxlanDataplane answers it for its VTEP

    def __init__(
        self,
        tun: TunDevice,
        sock: socket.socket,
        peers: PeerTable,
        own_subnet: IPv4Network,
        counters: Counters,
        *,
        offload: bool = True,
        tun_tso: bool = False,
        mtu: int = 0,
    ) -> None:
        self.offload = offload  # batching/offloads allowed (probed features permitting)
        # The TUN's MTU: a received TCP packet beyond it goes into the TUN as a super-packet
        # of MTU-sized segments (encap.gso.plan_tun_writes; 0: never).
        self.mtu = mtu
        self.tun = tun
        self.sock = sock
        self.peers = peers
        self.counters = counters
        self.own_net = int(own_subnet.network_address)
        self.own_shift = 32 - own_subnet.prefixlen
        self._own = (self.own_net >> self.own_shift, self.own_shift)  # as gso.valid_pieces
        self.icmp_limit = RateLimiter()
        self.tap: Tap | None = None  # an attached `overlay trace` (overlay.observe.tap)
        # The per-byte and per-packet work in C (encap.native), else the pure reference.
        self.native = native.AVAILABLE
        self._drains: Any = None  # native.Drains, made on first use (_native_drains)
        # vxlan: (our VNI bytes, our VTEP MAC) that every received datagram must carry.
        self.vxlan_rules: tuple[bytes, bytes] | None = None
        # Two datagrams' worth: a gathered run (on_socket_readable_gro) stays within the
        # first 64 KiB, and the next receive always has room for a whole datagram.
        self._rx_buffer = bytearray(2 * MAX_DATAGRAM)
        self._rx_view = memoryview(self._rx_buffer)
        self._tx_arena = bytearray(TX_ARENA)
        self._tx_view = memoryview(self._tx_arena)
        self._vnet_scratch = bytearray(VNET_HDR_LEN)  # TUN reads' virtio_net_hdr, ignored
        # Probed kernel features; a GSO send failing with EIO turns gso off (_send_groups).
        self.gso = offload and probe_udp_segment(sock)
        self._gso_sent = False  # a GSO send has worked once
        self.gro = offload and enable_udp_gro(sock)
        # TCP super-packets into the TUN pay only when GRO hands us runs of segments.
        self.tun_gso = self.gro and tun.enable_vnet_hdr()
        # TCP super-packets out of the TUN (TSO4, partial checksums), cut here into the
        # segments of one GSO send (the node passes tun_tso unless --no-tun-tso).
        self.tso = tun_tso and self.gso and tun.vnet_hdr and tun.enable_tso()

    def features(self) -> dict[str, bool]:
        """What the daemon may report: which offloads are active on this dataplane."""
        return {
            "native": self.native,
            "offload": self.offload,
            "udp_gso": self.gso,
            "udp_gro": self.gro,
            "tun_gso": self.tun_gso,
            "tun_tso": self.tso,
        }

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        drains = self._native_drains()
        if drains is not None:
            # The callbacks below, in C: no Python per wake-up. With a trace attached they
            # hand the wake-up to these methods.
            loop.add_reader(self.tun.fd, drains.tx)
            loop.add_reader(self.sock.fileno(), drains.rx)
            return
        loop.add_reader(self.tun.fd, self.on_tun_readable)
        rx = self.on_socket_readable_gro if self.gro else self.on_socket_readable
        loop.add_reader(self.sock.fileno(), rx)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.tun.fd)
        loop.remove_reader(self.sock.fileno())
        drains, self._drains = self._drains, None
        if drains is not None:  # its counts now; a start() after this makes a new one
            if drains.flush in self.counters.pending:
                self.counters.pending.remove(drains.flush)
            drains.flush()

    def _native_drains(self) -> Any:
        """The native reader callbacks (``native.Drains``), made once the dataplane is
        complete (a subclass sets its own attributes after ours: the first start() or
        reader call); None without the module. It keeps its counts until its flush(),
        which every Counters.snapshot() calls first."""
        if self._drains is None and self.native and native.Drains is not None:
            self._drains = native.Drains(self, BUDGET)
            self.counters.pending.append(self._drains.flush)
        return self._drains

    # -- TUN -> peer ---------------------------------------------------------------------

    def on_tun_readable(self) -> None:
        drains = self._native_drains() if self.tap is None and self.native else None
        if drains is not None:  # this method and the stages below, in C
            drains.tx()
            drains.flush()  # the counts now: a caller of this method may read them
            return
        lengths, addrs = self._read_tun()
        if not lengths:
            return
        # One packet (a ping, an ACK at low rate) or a trace attached (which sees every
        # packet): one sendto each, without planning groups (~1 us less per hop).
        if self.gso and len(lengths) > 1 and self.tap is None:
            self._send_groups(lengths, addrs)
        else:
            self._send_each(lengths, addrs, 0, len(lengths))

    def _read_tun(self) -> tuple[list[int], list[tuple[str, int]]]:
        """Stage 1: drain the TUN (up to BUDGET) into the TX arena, drop what cannot go,
        route the rest. Kept datagrams lie back to back from offset 0, so a GSO group is
        one contiguous slice; each packet is read ``headroom`` bytes into its datagram and
        the peer's prefix (vxlan: VXLAN + Ethernet header) copied in front: one readv per
        packet, the cheapest read measured."""
        headroom = self.headroom
        # Room for one more read of any size, and for cutting it into segments.
        limit = len(self._tx_arena) - 2 * MAX_DATAGRAM - headroom - 3
        readv = os.readv
        fd = self.tun.fd
        arena = self._tx_arena
        view = self._tx_view
        skip = self.tun.offset
        scratch = self._vnet_scratch  # receives the virtio_net_hdr, if the TUN has one
        tso = self.tso
        unpack_vnet = tso_codec.VNET.unpack
        needs_csum = tso_codec.NEEDS_CSUM
        segment = native.segment_tcp4 if self.native else tso_codec.segment_tcp4
        region = tso_codec.partial_region
        partial: list[tso_codec.Region] = []  # completed in one call after the drain
        supers = 0
        lookup = self.peers.lookup
        lengths: list[int] = []
        addrs: list[tuple[str, int]] = []
        keep = lengths.append
        route = addrs.append
        last_dst: bytes | bytearray = b""
        addr = ("", 0)
        prefix = b""
        at = 0
        for _ in range(BUDGET):
            if at > limit:
                break
            body = at + headroom
            try:
                if skip:
                    length = readv(fd, [scratch, view[body:]]) - skip
                else:
                    length = readv(fd, [view[body:]])
            except BlockingIOError:
                break
            if length < 20 or arena[body] >> 4 != 4:
                self._tx_drop("tx_not_ipv4", body, length)
                continue
            dst = arena[body + 16 : body + 20]
            if dst != last_dst:  # a bulk drain is mostly one destination: saves ~0.5 us
                peer = lookup(dst)
                if peer is None or len(peer.prefix) != headroom:
                    self._no_route(bytes(arena[body : body + length]))
                    last_dst = b""
                    continue
                last_dst = dst
                addr = peer.addr
                prefix = peer.prefix
            # A super-packet or a partial checksum (DATA_VALID, the other flag, needs
            # nothing from us).
            if tso and (scratch[1] or scratch[0] & needs_csum):
                _, gso_type, _, gso_size, start, offset = unpack_vnet(scratch)
                try:
                    if gso_type == tso_codec.GSO_TCPV4:
                        count, stride, last = segment(arena, at, length, gso_size, prefix)
                        lengths.extend([stride] * (count - 1))
                        keep(last)
                        addrs.extend([addr] * count)
                        at += (count - 1) * stride + last
                        supers += 1
                        continue
                    if gso_type != tso_codec.GSO_NONE:
                        raise CodecError("gso_unsupported", f"gso_type {gso_type}")
                    partial.append(region(body, length, start, offset))
                except CodecError as e:
                    self._tx_drop(f"tx_{e.reason}", body, length)
                    continue
            if headroom:
                view[at:body] = prefix
            keep(headroom + length)
            route(addr)
            at = body + length
        if partial:
            (native.finish_checksums if self.native else tso_codec.finish_checksums)(arena, partial)
        self.counters.tx_tun_super_packets += supers
        return lengths, addrs

    def _tx_drop(self, reason: str, at: int, length: int) -> None:
        """A packet read from the TUN that cannot go (rare: off the per-packet path)."""
        self.counters.drops[reason] += 1
        if self.tap is not None:
            self.tap.drop(reason, self._tx_view[at : at + max(length, 0)], None)

    def _sent(self, addr: tuple[str, int], packets: int, size: int, now: float) -> None:
        """One send of ``packets`` datagrams (``size`` bytes) to ``addr``: the batch-size
        histogram and the peer's counters (a node's oldest lease's, as on receive)."""
        self.counters.tx_batch[min(packets, BATCH_MAX)] += 1
        peer = self.peers.by_public_ip(addr[0])
        if peer is not None:
            stats = peer.stats
            stats.tx_packets += packets
            stats.tx_bytes += size
            stats.last_tx = now

    def _send_groups(self, lengths: list[int], addrs: list[tuple[str, int]]) -> None:
        """Stage 2 (GSO): one sendmsg per group; the kernel cuts it into one datagram per
        packet, a third of a sendto's cost per packet."""
        sendmsg = self.sock.sendmsg
        view = self._tx_view
        drops = self.counters.drops
        sent_to = self._sent
        now = time.monotonic()
        sends = sent = sent_bytes = 0
        at = 0
        plan = native.plan_groups if self.native else gso.plan_groups
        for start, end in plan(lengths, addrs):
            first = at
            at += sum(lengths[start:end])
            if end - start == 1:
                self._send_each(lengths, addrs, start, end, first)
                continue
            try:
                sendmsg([view[first:at]], gso.segment_cmsg(lengths[start]), 0, addrs[start])
            except BlockingIOError:
                drops["tx_socket_full"] += end - start
                continue
            except OSError as e:
                # EIO: the route's device cannot checksum a GSO send (wireguard-go turns GSO
                # off for good then, so do we); EINVAL before any GSO send worked: the
                # kernel refuses the cmsg. A later EINVAL (e.g. a packet above the
                # underlay MTU) costs only this group its batching.
                if e.errno == EIO or (e.errno == EINVAL and not self._gso_sent):
                    self.gso = False
                self._send_each(lengths, addrs, start, end, first)
                continue
            self._gso_sent = True
            sends += 1
            sent += end - start
            sent_bytes += at - first
            sent_to(addrs[start], end - start, at - first, now)
        self.counters.tx_packets += sent
        self.counters.tx_bytes += sent_bytes
        self.counters.tx_gso_sends += sends

    def _send_each(
        self, lengths: list[int], addrs: list[tuple[str, int]], start: int, end: int, at: int = 0
    ) -> None:
        """Stage 2 (plain): one sendto per packet (packets ``start:end``, the first at
        arena offset ``at``); with a trace attached, each reported as it leaves."""
        sendto = self.sock.sendto
        view = self._tx_view
        drops = self.counters.drops
        tap = self.tap
        headroom = self.headroom
        sent_to = self._sent
        now = time.monotonic()
        sent = sent_bytes = 0
        for i in range(start, end):
            length = lengths[i]
            first = at
            at += length
            try:
                sendto(view[first:at], addrs[i])
            except BlockingIOError:
                drops["tx_socket_full"] += 1
                if tap is not None:
                    tap.drop("tx_socket_full", view[first + headroom : at], None)
                continue
            except OSError:
                drops["tx_send_error"] += 1
                if tap is not None:
                    tap.drop("tx_send_error", view[first + headroom : at], None)
                continue
            sent += 1
            sent_bytes += length
            sent_to(addrs[i], 1, length, now)
            if tap is not None:
                tap.inner("tx", view[first + headroom : at])
                tap.outer("tx", view[first:at], addrs[i])
        self.counters.tx_packets += sent
        self.counters.tx_bytes += sent_bytes

    def _no_route(self, packet: bytes) -> None:
        """ICMP net unreachable back into the TUN, as flannel's proxy does (rate-limited),
        from the TUN's address as flannel's proxy sends it (``tun_addr``): the node's
        router address in the overlay, so ``ping`` says which node had no route. The
        kernel takes it because the TUN has accept_local (``tun.netlink``)."""
        self.counters.drops["tx_no_route"] += 1
        if self.tap is not None:
            self.tap.drop("tx_no_route", packet, None)
        if not icmp.may_send_error_for(packet) or not self.icmp_limit.allow():
            return
        tun_address = self.own_net.to_bytes(4, "big")  # our subnet's network address
        reply = icmp.build_dest_unreachable(packet, src=tun_address)
        if self.tun.write(reply):
            self.counters.icmp_unreachable_sent += 1
            if self.tap is not None:
                self.tap.inner("rx", reply)

    # -- peer -> TUN ---------------------------------------------------------------------

    def on_socket_readable(self) -> None:
        """One datagram per recvfrom_into (no GRO): validate it and write it to the TUN."""
        drains = self._native_drains() if self.tap is None and self.native else None
        if drains is not None:  # this method and _deliver, in C
            drains.rx()
            drains.flush()
            return
        recv = self.sock.recvfrom_into
        buf = self._rx_buffer
        deliver = self._deliver
        for _ in range(BUDGET):
            try:
                size, source = recv(buf)
            except BlockingIOError:
                break
            except OSError:
                self._rx_drop("rx_socket_error", 0, None)
                continue
            if not size:  # an empty datagram (anyone may send one)
                self._rx_drop("rx_not_ipv4", 0, source)
                continue
            deliver(source, size, size)

    def on_socket_readable_gro(self) -> None:
        """One recvmsg may hold up to 64 datagrams of one sender (UDP_GRO): split them.

        GRO only coalesces what the sender sent with GSO. A run of single datagrams (the
        kernel's vxlan device, flannel's C proxy) from one source, all of one size but
        the last, is gathered back to back in the RX buffer and delivered as if GRO had
        coalesced it, so its TCP segments still reach the TUN as super-packets. A run
        ends at a datagram that does not fit it, at 64 KiB, or when the socket is empty:
        gathering never waits for more."""
        drains = self._native_drains() if self.tap is None and self.native else None
        if drains is not None:  # this method and _deliver, in C
            drains.rx()
            drains.flush()
            return
        recv = self.sock.recvmsg_into
        view = self._rx_view
        whole = [self._rx_buffer]  # no run open: receive at the front, no new slice
        gro_size = gso.gro_size
        deliver = self._deliver
        moved = coalesced = 0
        at = run_size = 0  # the open run: its bytes so far, its datagram size
        run_source = ("", 0)
        while moved < BUDGET:
            try:
                size, ancdata, flags, source = recv([view[at:]] if at else whole, GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError:
                self._rx_drop("rx_socket_error", 0, None)
                moved += 1
                continue
            if not size:  # an empty datagram (anyone may send one)
                self._rx_drop("rx_not_ipv4", 0, source)
                moved += 1
                continue
            segment = gro_size(ancdata, size) if ancdata else size
            moved += -(-size // segment)
            if flags & MSG_TRUNC:  # more than 64 KiB coalesced: cannot split it safely
                self._rx_drop("rx_truncated", 0, source)
                continue
            single = segment == size
            if at:
                if single and source == run_source and size <= run_size:
                    at += size
                    if size < run_size or at + run_size > MAX_DATAGRAM:
                        deliver(run_source, at, run_size)  # a short one ends the run
                        at = 0
                    continue
                deliver(run_source, at, run_size)  # then this one starts from the front
                view[:size] = view[at : at + size]
                at = 0
            if single:
                if 2 * size > MAX_DATAGRAM:  # a second one would not fit: nothing to gather
                    deliver(source, size, size)
                    continue
                at, run_size, run_source = size, size, source
                continue
            coalesced += 1
            deliver(source, size, segment)
        if at:
            deliver(run_source, at, run_size)
        self.counters.rx_gro_receives += coalesced

    def _rx_drop(self, reason: str, size: int, source: tuple[str, int] | None) -> None:
        """A receive that goes nowhere (rare: off the per-packet path)."""
        self.counters.drops[reason] += 1
        if self.tap is not None:
            self.tap.drop(reason, self._rx_view[:size], source)

    def _deliver(self, source: tuple[str, int], size: int, segment: int) -> None:
        """Validate the ``segment``-byte datagrams in the RX buffer (one receive from
        ``source``) and write them to the TUN: as super-packets when the TUN takes them,
        else one by one. A node's datagrams may come from inside any of its leases."""
        count = -(-size // segment)
        self.counters.rx_batch[min(count, BATCH_MAX)] += 1
        sources = self.peers.sources_of(source[0])
        if not sources:
            self._unknown_peer(source, size, segment)
            return
        buf = self._rx_buffer
        drops = self.counters.drops
        arp: list[int] | None = [] if self.vxlan_rules is not None else None
        if self.tap is not None:
            received, received_bytes, supers = self._deliver_traced(source, size, segment, sources)
        elif self.tun_gso:
            plan = native.plan_tun_writes if self.native else gso.plan_tun_writes
            writes = plan(
                buf, size, segment, sources, self._own, drops, self.vxlan_rules, arp, self.mtu
            )
            received, received_bytes, supers = self._write_planned(writes)
        else:
            check = native.valid_pieces if self.native else gso.valid_pieces
            pieces = check(buf, size, segment, sources, self._own, drops, self.vxlan_rules, arp)
            received, received_bytes, supers = self._write_pieces(pieces)
        counters = self.counters
        counters.rx_packets += received
        counters.rx_bytes += received_bytes
        counters.rx_tun_super_packets += supers
        if received:
            peer = self.peers.by_public_ip(source[0])
            if peer is not None:
                stats = peer.stats
                stats.rx_packets += received
                stats.rx_bytes += received_bytes
                stats.last_rx = time.monotonic()
        if arp:
            for at in arp:
                self._answer_arp(at, min(at + segment, size), source)

    def _unknown_peer(self, source: tuple[str, int], size: int, segment: int) -> None:
        self.counters.drops["rx_unknown_peer"] += -(-size // segment)
        if self.tap is not None:
            for start, end in gso.split_points(size, segment):
                self.tap.drop("rx_unknown_peer", self._rx_view[start:end], source)

    def _answer_arp(self, start: int, end: int, source: tuple[str, int]) -> None:
        """vxlan answers ARP for its VTEP address; flannel's udp framing has none."""

    def _deliver_traced(
        self,
        source: tuple[str, int],
        size: int,
        segment: int,
        sources: tuple[tuple[int, int], ...],
    ) -> tuple[int, int, int]:
        """``_deliver`` with a trace attached: the reference rules one datagram at a time,
        each reported (outer, then inner or its drop) and written on its own."""
        tap = self.tap
        assert tap is not None
        buf = self._rx_buffer
        view = self._rx_view
        drops = self.counters.drops
        rules = self.vxlan_rules
        skip = gso.VXLAN_HEADROOM if rules is not None else 0
        pieces: list[tuple[int, int]] = []
        for base, end in gso.split_points(size, segment):
            tap.outer("rx", view[base:end], source)
            if rules is not None:
                reason = gso.vxlan_reason(buf, base, end, rules)
                if reason == "arp":
                    self._answer_arp(base, end, source)
                    continue
            else:
                reason = None
            if reason is None:
                reason = gso.drop_reason(buf, base + skip, end, sources, self._own)
            if reason is not None:
                drops[reason] += 1
                tap.drop(reason, view[base:end], source)
                continue
            tap.inner("rx", view[base + skip : end])
            pieces.append((base + skip, end))
        return self._write_pieces(pieces)

    def _write_pieces(self, pieces: list[tuple[int, int]]) -> tuple[int, int, int]:
        """Stage 2 (plain): one write per packet (behind a plain virtio_net_hdr if the TUN
        has IFF_VNET_HDR, as when the daemon opened it so but offloads are off). Returns
        (packets, bytes, super-packets) written."""
        view = self._rx_view
        write = os.write
        writev = os.writev
        fd = self.tun.fd
        vnet = self.tun.vnet_hdr
        plain = gso.VNET_PLAIN
        drops = self.counters.drops
        received = received_bytes = 0
        for start, end in pieces:
            try:
                if vnet:
                    writev(fd, [plain, view[start:end]])
                else:
                    write(fd, view[start:end])
            except BlockingIOError:
                drops["rx_tun_full"] += 1
                continue
            except OSError:
                drops["rx_tun_error"] += 1
                continue
            received += 1
            received_bytes += end - start
        return received, received_bytes, 0

    def _write_planned(self, writes: list[gso.Write]) -> tuple[int, int, int]:
        """Stage 2 (TUN with IFF_VNET_HDR): one writev per planned write; runs of one TCP
        flow's segments go in as one GSO_TCPV4 super-packet (``gso.plan_tun_writes``)."""
        writev = os.writev
        fd = self.tun.fd
        drops = self.counters.drops
        received = received_bytes = supers = 0
        for buffers, packets, size in writes:
            try:
                writev(fd, buffers)
            except BlockingIOError:
                drops["rx_tun_full"] += packets
                continue
            except OSError:
                drops["rx_tun_error"] += packets
                continue
            supers += packets > 1
            received += packets
            received_bytes += size
        return received, received_bytes, supers


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
