"""IPv6 on the userspace vxlan datapath (EnableIPv6), as the kernel's ``flannel-v6.<VNI>``
speaks it: inner IPv6 in VXLAN (inner Ethernet type 0x86DD, the peer's BackendV6Data
VTEP MAC) over a second UDP socket bound to our IPv6 underlay address, to each peer's
PublicIPv6.

With the native module the drains do this half's work in C (``encap/csrc/drains_ipv6.c``):
``Drains.tx`` sends the IPv6 packets it reads from the TUN itself, and ``Drains.rx6`` is
the IPv6 socket's reader, one C call per wake-up as on the IPv4 path. This class is
their reference (the tests compare the two on real sockets) and what runs without the
module, with a trace or an impairment attached (``_one_by_one``: the drains hand the
packet or the wake-up over), and for the rare events the drains hand over (no route,
beyond the MTU, a super-packet the cut refuses: ``send``; a possible neighbour
solicitation: ``_native_ndp``). Here the TUN's IPv6 packets reach ``send`` from the send
drain (Python's, or the native one's for what it hands over, with the virtio_net_hdr:
the IPv4 path pays nothing more than the version test it already made), and
``on_socket_readable`` is the IPv6 socket's reader. With the offloads the work is per
super-packet, as on the IPv4 path: the TUN offers TSO6, so an IPv6 TCP flow arrives as
64 KiB GSO_TCPV6 super-packets, cut here (``segment_tcp6``) and sent with UDP_SEGMENT;
a drain's small packets (ACKs, UDP) leave in groups of one size to one peer, one GSO
send each (``_join``, ``flush_tx``), as the IPv4 drains send theirs; UDP_GRO hands the
receiver the peer's GSO sends whole, and each flow's validated
segments go into the TUN as one GSO_TCPV6 super-packet (``ipv6.plan_tun_writes6``). The
outer UDP checksum is the kernel's: a UDP socket over IPv6 always sends one, and the
kernel drops a received datagram without one, exactly what a vxlan device does with its
defaults (udp6zerocsumtx and udp6zerocsumrx off); tests/netns/test_dual_stack.py
checks both on the wire.

An attached ``overlay trace`` (``tap``, set with the dataplane's by ``set_tap``) or an
impairment (``impair``, the dataplane's ``impair6`` while a rule is set) takes the way the
IPv4 path takes with a trace: one datagram at a time. A super-packet is still cut, but
its segments leave one ``sendto`` each, each put to the model and reported; each
datagram of a GRO receive is put to the model, reported and checked on its own (the
reference rules, ``_check``), and the valid ones written as usual (a flow's run still one
super-packet, reported per datagram before, as the tap's contract says). Without either,
each packet, super-packet or receive pays one None test. The IPv6 half counts its own
share of the node's counts (``tx_packets6``..., ``drops6``, beside the totals), for
/metrics' family label: segments of a super-packet as packets, as the IPv4 path counts.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from errno import EINVAL, EIO
from functools import partial
from ipaddress import IPv6Network

from control.peer_table import Peer, PeerStats, PeerTable
from encap import gso, ipv6, native, tso, vxlan
from encap.errors import CodecError
from overlay.dataplane.counters import Counters
from overlay.dataplane.limits import BUDGET, MAX_DATAGRAM
from overlay.dataplane.rate_limiter import RateLimiter
from overlay.dataplane.udp_socket import (
    GRO_CMSG_SPACE,
    MSG_TRUNC,
    enable_udp_gro,
    probe_udp_segment,
)
from overlay.observe.tap import Tap
from tun.device import TunDevice
from tun.offload import VNET_HDR_LEN

HEADROOM = vxlan.PREFIX_LEN
# An IPv6 underlay's header is 20 bytes longer than an IPv4 one's: the IPv6 MTU is the
# TUN's (underlay - 50) less 20, flannel-v6.<VNI>'s underlay - 70.
IPV6_EXTRA_OVERHEAD = 20
_ETH_IPV6 = vxlan.ETHERTYPE_IPV6.to_bytes(2, "big")
Buffer = bytes | bytearray | memoryview
Address = tuple[str, int]
# Releases a datagram impairment held (data, peer, now).
Release = Callable[[Buffer, Address, float], None]
# impair6(side, buffer, size, peer, release): True when the datagram ``buffer[:size]``
# goes on now; else it was dropped or held, to be released later through ``release``.
Impair = Callable[[str, Buffer, int, Address, Release], bool]


# Room for one super-packet cut in place: the packet, and every segment's prefix and
# headers (tso.segment_tcp6's ``gso_no_room`` refuses what would not fit).
TX_ARENA6 = 3 * MAX_DATAGRAM


class Ipv6Path:
    """Both directions of the IPv6 half of a userspace vxlan dataplane."""

    def __init__(
        self,
        tun: TunDevice,
        sock: socket.socket,
        peers: PeerTable,
        own_subnet: IPv6Network,
        counters: Counters,
        *,
        vni: int,
        mac: bytes,
        port: int,
        icmp_limit: RateLimiter,
        offload: bool = False,
    ) -> None:
        self.tun = tun
        self.sock = sock
        self.peers = peers
        self.counters = counters
        self.own = (
            int(own_subnet.network_address) >> 128 - own_subnet.prefixlen,
            128 - own_subnet.prefixlen,
        )
        # Our VTEP address (peers' neighbour entries point at it) and the TUN's address,
        # from which ICMPv6 errors come: the subnet's first address, as flannel-v6's /128.
        self.vtep_ip = own_subnet.network_address.packed
        self.vni = vni
        self.vni_bytes = vxlan.header(vni)[4:7]
        self.mac = mac
        self.solicited_mac = ipv6.solicited_node_mac(self.vtep_ip)
        # What every received datagram's VXLAN and Ethernet headers must carry.
        self.vxlan_rules = (self.vni_bytes, mac, self.solicited_mac)
        self.port = port
        self.icmp_limit = icmp_limit  # shared with the IPv4 path: one budget of errors
        self.neighbor_adverts = 0
        self._tap: Tap | None = None
        self._impair: Impair | None = None
        self._one_by_one = False  # a trace or an impairment attached: one test per packet
        # The offloads, probed on this socket as the IPv4 dataplane probes its own: UDP
        # GSO for the segments of a TSO6 super-packet (off for good after an EIO), UDP
        # GRO only when the TUN takes super-packets (IFF_VNET_HDR) to write runs into.
        self.gso = offload and probe_udp_segment(sock)
        self._gso_sent = False
        self.gro = offload and tun.vnet_hdr and enable_udp_gro(sock)
        # What the offloads did (overlay status: ipv6_* counters), beside the shared ones.
        self.tun_super_packets_read = 0
        self.gso_sends = 0
        self.gro_receives = 0
        self.tun_super_packets_written = 0
        self._rx_buffer = bytearray(MAX_DATAGRAM)
        self._rx_view = memoryview(self._rx_buffer)
        self._tx_arena = bytearray(TX_ARENA6) if offload else bytearray()
        self._tx_view = memoryview(self._tx_arena)
        # The open group of a drain's small packets (ACKs, UDP): consecutive datagrams to
        # one peer of one length (the last may be shorter), back to back, leave in one
        # GSO send at its end (``flush_tx``), as the IPv4 drains group theirs.
        self._group = bytearray(gso.MAX_GSO_BYTES) if self.gso else bytearray()
        self._group_view = memoryview(self._group)
        self._group_peer: Peer | None = None
        self._group_len = self._group_size = self._group_last = self._group_count = 0
        # What valid_pieces6 drops, counted here first, then in drops and drops6 (only
        # when it dropped anything: one truth test per receive otherwise).
        self._rx_drops: Counter[str] = Counter()

    @property
    def tap(self) -> Tap | None:
        """An attached `overlay trace` (overlay.observe.tap), None without one."""
        return self._tap

    @tap.setter
    def tap(self, tap: Tap | None) -> None:
        self._tap = tap
        self._one_by_one = tap is not None or self._impair is not None

    @property
    def impair(self) -> Impair | None:
        """Impairment (the dataplane's ``impair6``, overlay.dataplane.impaired): None
        while nothing is impaired."""
        return self._impair

    @impair.setter
    def impair(self, impair: Impair | None) -> None:
        self._impair = impair
        self._one_by_one = impair is not None or self._tap is not None

    def status(self) -> dict[str, int]:
        """What ``overlay status`` shows of the IPv6 half."""
        return {
            "ndp_replies": self.neighbor_adverts,
            "ipv6_tx_tun_super_packets": self.tun_super_packets_read,
            "ipv6_tx_gso_sends": self.gso_sends,
            "ipv6_rx_gro_receives": self.gro_receives,
            "ipv6_rx_tun_super_packets": self.tun_super_packets_written,
        }

    # -- TUN -> peer --------------------------------------------------------------------

    def send(self, frame: bytes, mtu: int, hold: bool = False) -> None:
        """One IPv6 packet read from the TUN (``frame``: its virtio_net_hdr, zeros when the
        TUN has none, then the packet) to the peer owning its destination; ``mtu``: the
        TUN's (0: no limit). A TCP super-packet (TSO6) leaves as its segments. ``hold``
        (a drain's packet; the drain calls ``flush_tx`` at its end): a plain packet joins
        the open group instead of leaving at once."""
        if frame[1] != tso.GSO_NONE:
            if frame[1] == tso.GSO_TCPV6 and self._tx_arena:
                self.flush_tx()  # what the drain read before it leaves first
                self._send_super(frame, mtu)  # its segments one by one if GSO is off
            else:  # TSO6 is offered only with the offloads; USO is never offered
                self._tx_drop("tx_ipv6_gso_unsupported", memoryview(frame)[VNET_HDR_LEN:])
            return
        packet = bytearray(frame[VNET_HDR_LEN:])  # the drains hand over 40 bytes or more
        if frame[0] & tso.NEEDS_CSUM:
            start, offset = frame[6] | frame[7] << 8, frame[8] | frame[9] << 8
            try:
                tso.finish_checksums(packet, [tso.partial_region(0, len(packet), start, offset)])
            except (CodecError, ValueError):
                self._tx_drop("tx_bad_csum_offsets", packet)
                return
        peer = self.peers.lookup6(packet[24:40])
        if peer is None or len(peer.prefix) != HEADROOM:
            self._answer("tx_no_route", packet, ipv6.build_dest_unreachable)
            return
        limit = mtu - IPV6_EXTRA_OVERHEAD if mtu else 0
        if limit and len(packet) > limit:
            too_big = partial(ipv6.build_packet_too_big, mtu=limit)
            self._answer("tx_too_big", packet, too_big)
            return
        datagram = peer.prefix + packet
        if self._one_by_one:
            impair = self._impair
            if impair is None or impair("tx", datagram, len(datagram), peer.addr, self._held):
                self._send_one(datagram, peer.addr, peer.stats)
            return  # else dropped, or held for later (``_held``)
        if self._group:
            self._join(peer, datagram)
            if not hold:
                self.flush_tx()
            return
        try:
            self.sock.sendto(datagram, peer.addr)
        except BlockingIOError:
            self._tx_drop("tx_socket_full", packet)
            return
        except OSError:
            self._tx_drop("tx_send_error", packet)
            return
        self._sent(peer.stats, 1, len(datagram))

    def _join(self, peer: Peer, datagram: bytes) -> None:
        """``datagram`` into the open group (``encap.gso.plan_groups``' rule: one peer,
        every length the first's but the last, at most MAX_SEGMENTS and MAX_GSO_BYTES),
        after sending the group it cannot join."""
        size = len(datagram)
        group = self._group_peer
        if group is not None and not (
            self._group_last == self._group_size
            and size <= self._group_size
            and peer.addr == group.addr
            and self._group_len + size <= gso.MAX_GSO_BYTES
            and self._group_count < gso.MAX_SEGMENTS
        ):
            self.flush_tx()
        if self._group_peer is None:
            self._group_peer = peer
            self._group_size = size
        self._group[self._group_len : self._group_len + size] = datagram
        self._group_len += size
        self._group_last = size
        self._group_count += 1

    def flush_tx(self) -> None:
        """The open group to its peer: one GSO send (one sendto for a single datagram or
        with GSO off since); the send drain calls this at the end of each wake-up."""
        peer = self._group_peer
        if peer is None:
            return
        end, stride = self._group_len, self._group_size
        self._group_peer = None
        self._group_len = self._group_size = self._group_last = self._group_count = 0
        self._send_group(0, end, stride, peer, self._group_view)

    def _send_one(self, datagram: Buffer, addr: Address, stats: PeerStats | None) -> None:
        """``datagram`` to ``addr`` in one sendto with a trace or an impairment attached,
        counted and traced sent or dropped."""
        try:
            self.sock.sendto(datagram, addr)
        except BlockingIOError:
            self._tx_drop("tx_socket_full", memoryview(datagram)[HEADROOM:])
            return
        except OSError:
            self._tx_drop("tx_send_error", memoryview(datagram)[HEADROOM:])
            return
        if self.tap is not None:
            self.tap.inner("tx", memoryview(datagram)[HEADROOM:])
            self.tap.outer("tx", datagram, addr)
        self._sent(stats, 1, len(datagram))

    def _held(self, datagram: Buffer, addr: Address, now: float) -> None:
        """A datagram impairment held (delayed, duplicated, corrupted), due now."""
        peer = self.peers.by_public_ipv6(addr[0])
        self._send_one(datagram, addr, peer.stats if peer is not None else None)

    def _sent(self, stats: PeerStats | None, packets: int, size: int) -> None:
        """``packets`` datagrams (``size`` bytes) sent: the node's totals, the IPv6 half's
        share of them, and the peer's (None: it left the table while a datagram was held)."""
        counters = self.counters
        counters.tx_packets += packets
        counters.tx_bytes += size
        counters.tx_packets6 += packets
        counters.tx_bytes6 += size
        if stats is not None:
            stats.tx_packets += packets
            stats.tx_bytes += size
            stats.last_tx = time.monotonic()

    def _tx_drop(self, reason: str, packet: Buffer, packets: int = 1) -> None:
        """``packets`` read from the TUN that do not go (``packet``: what a trace sees):
        counted in both tables (and traced)."""
        self.counters.drops[reason] += packets
        self.counters.drops6[reason] += packets
        if self.tap is not None:
            self.tap.drop(reason, packet, None)

    def _send_super(self, frame: bytes, mtu: int) -> None:
        """A GSO_TCPV6 super-packet: cut in the TX arena into segments behind the peer's
        prefix (``segment_tcp6``, as a NIC's TSO engine would), which leave in one
        ``sendmsg`` with UDP_SEGMENT per 64 KiB, the kernel making one datagram of each;
        with a trace or an impairment attached, one by one (``_send_each``)."""
        length = len(frame) - VNET_HDR_LEN
        peer = self.peers.lookup6(frame[VNET_HDR_LEN + 24 : VNET_HDR_LEN + 40])
        if peer is None or len(peer.prefix) != HEADROOM:
            self._answer(
                "tx_no_route", bytearray(frame[VNET_HDR_LEN:]), ipv6.build_dest_unreachable
            )
            return
        arena = self._tx_arena
        if HEADROOM + length > len(arena):
            self._tx_drop("tx_gso_bad_length", memoryview(frame)[VNET_HDR_LEN:])
            return
        arena[HEADROOM : HEADROOM + length] = memoryview(frame)[VNET_HDR_LEN:]
        gso_size = frame[4] | frame[5] << 8
        try:
            count, stride, last = native.segment_tcp6(arena, 0, length, gso_size, peer.prefix)
        except CodecError as e:
            self._tx_drop(f"tx_{e.reason}", memoryview(frame)[VNET_HDR_LEN:])
            return
        self.tun_super_packets_read += 1
        self.counters.tx_tun_super_packets += 1
        first = stride if count > 1 else last
        limit = mtu - IPV6_EXTRA_OVERHEAD if mtu else 0
        if limit and first - HEADROOM > limit:  # cut at a larger MSS than our MTU allows
            too_big = partial(ipv6.build_packet_too_big, mtu=limit)
            self._answer("tx_too_big", bytearray(arena[HEADROOM:first]), too_big)
            return
        total = (count - 1) * stride + last
        if self._one_by_one:
            self._send_each(total, stride, peer)
            return
        # A GSO send is one UDP datagram before segmentation: at most 64 segments and
        # gso.MAX_GSO_BYTES (an IPv6 payload length is 16 bits).
        per_send = max(1, min(gso.MAX_SEGMENTS, gso.MAX_GSO_BYTES // stride))
        for group in range(0, count, per_send):
            begin = group * stride
            end = min(begin + per_send * stride, total)
            self._send_group(begin, end, stride, peer)

    def _send_each(self, total: int, stride: int, peer: Peer) -> None:
        """A cut super-packet's segments (``arena[:total]``, each ``stride`` bytes, the
        last maybe shorter) with a trace or an impairment attached: each put to the model
        (``impair``), then sent and reported on its own, as the IPv4 path sends with a
        trace attached."""
        view = self._tx_view
        impair = self._impair
        for at in range(0, total, stride):
            datagram = view[at : min(at + stride, total)]
            size = len(datagram)
            if impair is not None and not impair("tx", datagram, size, peer.addr, self._held):
                continue  # dropped, or held (copied) for later
            self._send_one(datagram, peer.addr, peer.stats)

    def _send_group(
        self, begin: int, end: int, stride: int, peer: Peer, view: memoryview | None = None
    ) -> None:
        """The segments ``view[begin:end]`` (the TX arena's by default; each ``stride``
        bytes, the last maybe shorter) to ``peer``: one GSO send, or one sendto each
        without GSO."""
        view = self._tx_view if view is None else view
        packets = -(-(end - begin) // stride)
        if self.gso and packets > 1:
            try:
                self.sock.sendmsg([view[begin:end]], gso.segment_cmsg(stride), 0, peer.addr)
            except BlockingIOError:
                self._tx_drop("tx_socket_full", view[begin + HEADROOM : begin + stride], packets)
                return
            except OSError as e:  # as the IPv4 path (overlay.dataplane.send._send_groups)
                if e.errno == EIO or (e.errno == EINVAL and not self._gso_sent):
                    self.gso = False
            else:
                self._gso_sent = True
                self.gso_sends += 1
                self.counters.tx_gso_sends += 1
                self._sent(peer.stats, packets, end - begin)
                return
        sent = sent_bytes = 0
        for at in range(begin, end, stride):
            datagram = view[at : min(at + stride, end)]
            try:
                self.sock.sendto(datagram, peer.addr)
            except BlockingIOError:
                self._tx_drop("tx_socket_full", datagram[HEADROOM:])
                continue
            except OSError:
                self._tx_drop("tx_send_error", datagram[HEADROOM:])
                continue
            sent += 1
            sent_bytes += len(datagram)
        if sent:
            self._sent(peer.stats, sent, sent_bytes)

    def _answer(self, reason: str, packet: bytearray, build: Callable[..., bytes]) -> None:
        """Count ``packet`` dropped for ``reason`` and write the ICMPv6 error ``build``
        makes into the TUN (from the TUN's address), unless no error may answer it or the
        rate limit (the IPv4 path's) is spent."""
        self._tx_drop(reason, packet)
        if not ipv6.may_send_error_for(packet) or not self.icmp_limit.allow():
            return
        reply = build(packet, src=self.vtep_ip)
        if self.tun.write(reply):
            if self.tap is not None:
                self.tap.inner("rx", reply)
            self.counters.icmp_unreachable_sent += reason == "tx_no_route"
            self.counters.icmp_frag_needed_sent += reason == "tx_too_big"

    # -- peer -> TUN --------------------------------------------------------------------

    def on_socket_readable(self, mtu: int) -> None:
        """Receive up to BUDGET datagrams from the IPv6 socket, each checked and written
        into the TUN; ``mtu``: the TUN's (a longer TCP packet, a kernel peer's TSO packet
        that crossed only veths, goes in as a TCP super-packet the kernel cuts). With
        UDP_GRO one receive may hold up to 64 datagrams of one peer's GSO send."""
        if self.gro:
            self._receive_gro(mtu)
            return
        recv = self.sock.recvfrom_into
        buf = self._rx_buffer
        for _ in range(BUDGET):
            try:
                size, source = recv(buf)
            except BlockingIOError:
                break
            except OSError:
                self._rx_drop("rx_socket_error", 0, 0, None)
                continue
            self._receive_one(size, source, mtu)

    def _receive_gro(self, mtu: int) -> None:
        recv = self.sock.recvmsg_into
        whole = [self._rx_buffer]
        moved = 0
        while moved < BUDGET:
            try:
                size, ancdata, flags, source = recv(whole, GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError:
                self._rx_drop("rx_socket_error", 0, 0, None)
                moved += 1
                continue
            segment = gso.gro_size(ancdata, size) if ancdata and size else size
            moved += -(-size // segment) if segment else 1
            if flags & MSG_TRUNC:  # more than 64 KiB coalesced: cannot split it safely
                self._rx_drop("rx_truncated", 0, 0, source)
                continue
            if segment == size:
                self._receive_one(size, source, mtu)
                continue
            self.gro_receives += 1
            self.counters.rx_gro_receives += 1
            self._receive_run(size, segment, source, mtu)

    def _receive_one(self, size: int, source: Address, mtu: int) -> None:
        """One datagram ``buf[:size]``: ``_receive_run``'s rules (an empty one has no
        VXLAN header)."""
        if size:
            self._receive_run(size, size, source, mtu)
        else:
            self._rx_drop(self._check(0, 0, source[0]) or "rx_vxlan_truncated", 0, 0, source)

    def _receive_run(self, size: int, segment: int, source: Address, mtu: int) -> None:
        """The receive ``buf[:size]`` of ``segment``-byte datagrams from ``source``:
        every datagram checked in one call (``valid_pieces6``, C with the native module),
        the valid ones written (a flow's run as one super-packet); a possible neighbour
        solicitation (never in a GSO send in practice) goes through ``_check``. With a
        trace or an impairment attached, ``_receive_each``."""
        if self._one_by_one:
            self._receive_each(size, segment, source, mtu)
            return
        sources = self.peers.sources6_of(source[0])
        if not sources:
            self._rx_drop("rx_unknown_peer", 0, 0, source, -(-size // segment))
            return
        ndp: list[int] = []
        dropped = self._rx_drops
        pieces = native.valid_pieces6(
            self._rx_buffer, size, segment, sources, self.own, dropped, self.vxlan_rules, ndp
        )
        if dropped:  # counted by reason in both tables
            self.counters.drops.update(dropped)
            self.counters.drops6.update(dropped)
            dropped.clear()
        for base in ndp:
            end = min(base + segment, size)
            reason = self._check(base, end, source[0])
            if reason is None:
                pieces.append((base + HEADROOM, end))
            elif reason:
                self._rx_drop(reason, base, end, source)
        if pieces:
            self._write(pieces, mtu, source)

    def _receive_each(self, size: int, segment: int, source: Address, mtu: int) -> None:
        """``_receive_run`` with a trace or an impairment attached: each datagram put to
        the model (``impair``), then reported and checked on its own (``_take``)."""
        impair = self._impair
        release = partial(self._received_held, mtu)
        view = self._rx_view
        pieces: list[tuple[int, int]] = []
        for base, end in gso.split_points(size, segment):
            if impair is not None and not impair("rx", view[base:end], end - base, source, release):
                continue  # dropped, or held (copied) for later
            self._take(base, end, source, pieces)
        if pieces:
            self._write(pieces, mtu, source)

    def _received_held(self, mtu: int, datagram: Buffer, source: Address, _: float) -> None:
        """A received datagram impairment held, due now: taken as any other."""
        size = len(datagram)
        self._rx_buffer[:size] = datagram
        pieces: list[tuple[int, int]] = []
        self._take(0, size, source, pieces)
        if pieces:
            self._write(pieces, mtu, source)

    def _take(self, base: int, end: int, source: Address, pieces: list[tuple[int, int]]) -> None:
        """The datagram ``buf[base:end]`` shown to the trace (outer, then its drop or the
        inner packet) and checked by the reference rules: its inner packet added to
        ``pieces`` when it may go into the TUN."""
        tap = self.tap
        view = self._rx_view
        if tap is not None:
            tap.outer("rx", view[base:end], source)
        reason = self._check(base, end, source[0])
        if reason is None:
            if tap is not None:
                tap.inner("rx", view[base + HEADROOM : end])
            pieces.append((base + HEADROOM, end))
        elif reason:
            self._rx_drop(reason, base, end, source)

    def _rx_drop(
        self, reason: str, base: int, end: int, source: Address | None, packets: int = 1
    ) -> None:
        """``packets`` received datagrams (``buf[base:end]``: what a trace sees) that go
        nowhere: counted in both tables (and traced)."""
        self.counters.drops[reason] += packets
        self.counters.drops6[reason] += packets
        if self.tap is not None:
            self.tap.drop(reason, self._rx_view[base:end], source)

    def _check(self, base: int, end: int, source: str) -> str | None:
        """The datagram ``buf[base:end]`` from ``source``: None when its inner packet may
        go into the TUN, "" when it was a neighbour solicitation (answered or counted),
        else the reason it is dropped."""
        buf = self._rx_buffer
        sources = self.peers.sources6_of(source)
        if not sources:
            return "rx_unknown_peer"
        if end - base < HEADROOM:
            return "rx_vxlan_truncated"
        if not buf[base] & vxlan.FLAG_I:
            return "rx_vxlan_bad_flags"
        if buf[base + 4 : base + 7] != self.vni_bytes:
            return "rx_vxlan_wrong_vni"
        if buf[base + 20 : base + 22] != _ETH_IPV6:
            return "rx_vxlan_bad_ethertype"
        dst_mac = buf[base + 8 : base + 14]
        if dst_mac != self.mac:
            if dst_mac == self.solicited_mac:
                return self._answer_solicitation(base, end, source)
            return "rx_vxlan_foreign_mac"
        target = ipv6.solicited_target(self._rx_view[base + HEADROOM : end])
        if target is not None:
            return self._answer_solicitation(base, end, source)
        return ipv6.drop_reason6(buf, base + HEADROOM, end, sources, self.own)

    def _write(self, pieces: list[tuple[int, int]], mtu: int, source: Address) -> None:
        """Write the checked inner packets ``pieces`` of the RX buffer into the TUN: runs
        of one TCP flow as GSO_TCPV6 super-packets (``plan_tun_writes6``) when the TUN
        has IFF_VNET_HDR; a failed write's packets are counted by reason."""
        packets = size = 0
        if self.tun.vnet_hdr:
            writes = native.plan_tun_writes6(self._rx_buffer, pieces, mtu)
        else:
            writes = []
            for start, end in pieces:
                if mtu and end - start > mtu and self._rx_buffer[start + 6] == ipv6.PROTO_TCP:
                    self._rx_drop("rx_too_big", start - HEADROOM, end, source)
                    continue
                writes.append(([self._rx_view[start:end]], 1, end - start))
        supers = 0
        for buffers, count, length in writes:
            try:
                os.writev(self.tun.fd, buffers)
            except BlockingIOError:
                self._rx_drop("rx_tun_full", 0, 0, source, count)
                continue
            except OSError:
                self._rx_drop("rx_tun_error", 0, 0, source, count)
                continue
            packets += count
            size += length
            supers += count > 1
        if not packets:
            return
        self.tun_super_packets_written += supers
        counters = self.counters
        counters.rx_tun_super_packets += supers
        received_bytes = size + packets * HEADROOM
        counters.rx_packets += packets
        counters.rx_bytes += received_bytes
        counters.rx_packets6 += packets
        counters.rx_bytes6 += received_bytes
        peer = self.peers.by_public_ipv6(source[0])
        if peer is not None:
            stats = peer.stats
            stats.rx_packets += packets
            stats.rx_bytes += received_bytes
            stats.last_rx = time.monotonic()

    def _native_ndp(self, base: int, end: int, source: Address) -> bool:
        """The native drains' hand-over (``Drains.rx6``) of a datagram ``buf[base:end]``
        that may be a neighbour solicitation: ``_receive_run``'s handling of one; True
        when its inner packet goes into the TUN."""
        reason = self._check(base, end, source[0])
        if reason:
            self._rx_drop(reason, base, end, source)
        return reason is None

    def _answer_solicitation(self, base: int, end: int, source: str) -> str:
        """A neighbour solicitation for our VTEP address, answered with an advertisement
        from our VTEP MAC (as ARP is for the IPv4 VTEP address); anything else multicast
        to us is not ours. "" when answered, else the drop reason."""
        inner = self._rx_view[base + HEADROOM : end]
        if ipv6.solicited_target(inner) != self.vtep_ip:
            return "rx_ndp_not_for_us"
        advert = ipv6.build_neighbor_advertisement(inner, target=self.vtep_ip, mac=self.mac)
        reply = vxlan.prefix(
            self.vni, bytes(self._rx_buffer[base + 14 : base + 20]), self.mac, vxlan.ETHERTYPE_IPV6
        )
        try:
            self.sock.sendto(reply + advert, (source, self.port))
        except OSError:
            return "tx_ndp_reply_failed"
        self.neighbor_adverts += 1
        return ""
