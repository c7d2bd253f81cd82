"""peer -> TUN: the receive direction of the dataplane (``on_socket_readable[_gro]`` and
its stages).

With UDP_GRO one ``recvmsg`` returns up to 64 same-sized datagrams of one sender (when the
sender used GSO; single datagrams are gathered the same way); each is validated on its
own. The TUN has IFF_VNET_HDR, so a run of one TCP flow's segments goes in as one
GSO_TCPV4 super-packet that the kernel forwards to the pod whole. Its C twin is
encap/csrc/drains_receive.c.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from encap import gso, native
from overlay.dataplane.base import Dataplane
from overlay.dataplane.counters import BATCH_MAX
from overlay.dataplane.limits import BUDGET, MAX_DATAGRAM
from overlay.dataplane.udp_socket import GRO_CMSG_SPACE, MSG_TRUNC

# Where a receive goes: (source, bytes in the RX buffer, datagram size) -> written or not.
Deliver = Callable[[tuple[str, int], int, int], None]


class ReceivePath(Dataplane):
    def on_socket_readable(self) -> None:
        """One datagram per recvfrom_into (no GRO): validate it and write it to the TUN."""
        drains = self._native_drains() if self.tap is None and self.native else None
        if drains is not None:  # this method and _deliver, in C
            drains.rx()
            drains.flush()
            return
        self._receive_each(self._deliver)

    def _receive(self, deliver: Deliver) -> None:
        """One wake-up's receives, each handed to ``deliver`` (``_deliver``, or the
        impaired path's, ``overlay.dataplane.impaired``)."""
        if self.gro:
            self._receive_gro(deliver)
        else:
            self._receive_each(deliver)

    def _receive_each(self, deliver: Deliver) -> None:
        """on_socket_readable's loop."""
        recv = self.sock.recvfrom_into
        buf = self._rx_buffer
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
        self._receive_gro(self._deliver)

    def _receive_gro(self, deliver: Deliver) -> None:
        """on_socket_readable_gro's loop: receive, split, gather."""
        recv = self.sock.recvmsg_into
        view = self._rx_view
        whole = [self._rx_buffer]  # no run open: receive at the front, no new slice
        gro_size = gso.gro_size
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
