"""TUN -> peer: the send direction of the dataplane (``on_tun_readable`` and its stages).

One drain reads the TUN into an arena, packets back to back; consecutive packets to one
peer of one length (the last may be shorter) leave in one ``sendmsg`` with UDP_SEGMENT,
which the kernel cuts into one datagram per packet. With TSO on the TUN (``tun_tso``), a
TCP super-packet is one read, cut in place into segments (``encap.tso``). Its C twin is
encap/csrc/drains_send.c.

A packet (or a super-packet's segment) longer than the TUN's MTU was queued before the
MTU was lowered (the kernel checks every packet it routes into the TUN against the MTU
of the moment): with DF it is dropped and answered with ICMP frag-needed carrying the
MTU, as the kernel answers the packets after it; without DF it goes as it is, the kernel
fragmenting its datagram. Only a packet that is too long costs more than a comparison.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from errno import EINVAL, EIO
from functools import partial

from encap import gso, icmp, native
from encap import tso as tso_codec
from encap.errors import CodecError
from overlay.dataplane.base import Dataplane
from overlay.dataplane.counters import BATCH_MAX
from overlay.dataplane.limits import BUDGET, MAX_DATAGRAM
from tun.offload import VNET_HDR_LEN

DF = 0x40  # in the IPv4 header's byte 6
VNET_NONE = bytes(VNET_HDR_LEN)  # what _send_ipv6 gets in front of a packet without one


class SendPath(Dataplane):
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
        longest = self.mtu or MAX_DATAGRAM  # a longer packet was queued at a larger MTU
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
                if length >= 40 and arena[body] >> 4 == 6:  # vxlan's IPv6 half, or a drop
                    vnet = bytes(scratch) if skip else VNET_NONE
                    self._send_ipv6(vnet + arena[body : body + length], True)
                    continue
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
            if length > longest and not (tso and scratch[1]) and arena[body + 6] & DF:
                self._too_big(bytes(arena[body : body + length]))
                continue
            # A super-packet or a partial checksum (DATA_VALID, the other flag, needs
            # nothing from us).
            if tso and (scratch[1] or scratch[0] & needs_csum):
                _, gso_type, _, gso_size, start, offset = unpack_vnet(scratch)
                try:
                    if gso_type == tso_codec.GSO_TCPV4:
                        count, stride, last = segment(arena, at, length, gso_size, prefix)
                        first = (stride if count > 1 else last) - headroom
                        if first > longest and arena[body + 6] & DF:  # cut at a larger MTU
                            self._too_big(bytes(arena[body : body + first]))
                            continue
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
        self._flush_ipv6()
        return lengths, addrs

    def _send_ipv6(self, frame: bytes, hold: bool = False) -> None:
        """An IPv6 packet read from the TUN (``frame``: its virtio_net_hdr, then the
        packet; the native drains call this too): the vxlan dataplane with EnableIPv6
        sends it (``overlay.dataplane.ipv6``; ``hold``: this drain's, may wait for
        ``_flush_ipv6`` at its end); here it is counted as not IPv4."""
        self.counters.drops["tx_not_ipv4"] += 1
        if self.tap is not None:
            self.tap.drop("tx_not_ipv4", frame[VNET_HDR_LEN:], None)

    def _flush_ipv6(self) -> None:
        """The end of a drain: what ``_send_ipv6`` held leaves (vxlan's IPv6 half)."""

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
                # kernel refuses the cmsg. Any other error (EMSGSIZE: a datagram above
                # the route's MTU, the underlay's lowered under a packet without DF; a
                # later EINVAL) costs only this group its batching.
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
        if self._answer("tx_no_route", packet, icmp.build_dest_unreachable):
            self.counters.icmp_unreachable_sent += 1

    def _too_big(self, packet: bytes) -> None:
        """A packet with DF longer than the TUN's MTU (queued before the MTU was lowered):
        ICMP frag-needed with the MTU back into the TUN (rate-limited), so the sender's
        path MTU discovery converges."""
        if self._answer("tx_too_big", packet, partial(icmp.build_frag_needed, mtu=self.mtu)):
            self.counters.icmp_frag_needed_sent += 1

    def _answer(self, reason: str, packet: bytes, build: Callable[..., bytes]) -> bool:
        """Count ``packet`` dropped for ``reason`` and write the ICMP error ``build(packet,
        src=...)`` makes into the TUN, from the TUN's address (our subnet's network
        address), unless it is one of the packets no error may answer or the rate limit
        is spent: whether one was written."""
        self.counters.drops[reason] += 1
        if self.tap is not None:
            self.tap.drop(reason, packet, None)
        if not icmp.may_send_error_for(packet) or not self.icmp_limit.allow():
            return False
        try:
            reply = build(packet, src=self.own_net.to_bytes(4, "big"))
        except CodecError:
            return False
        if not self.tun.write(reply):
            return False
        if self.tap is not None:
            self.tap.inner("rx", reply)
        return True
