"""IPv6 on the userspace vxlan datapath (EnableIPv6), as the kernel's ``flannel-v6.<VNI>``
speaks it: inner IPv6 in VXLAN (inner Ethernet type 0x86DD, the peer's BackendV6Data
VTEP MAC) over a second UDP socket bound to our IPv6 underlay address, to each peer's
PublicIPv6.

The pure-Python path, one packet at a time, for both directions: the TUN's IPv6 packets
reach ``send`` from the send drain (Python's or the native one's, which hand over any
IPv6 packet with its virtio_net_hdr: the IPv4 path pays nothing more than the version
test it already made), and ``on_socket_readable`` is the IPv6 socket's own reader. The
outer UDP checksum is the kernel's: a UDP socket over IPv6 always sends one, and the
kernel drops a received datagram without one, exactly what a vxlan device does with its
defaults (udp6zerocsumtx and udp6zerocsumrx off); tests/netns/test_dual_stack.py
checks both on the wire.

An attached ``overlay trace`` (``tap``, set with the dataplane's by ``set_tap``) sees
what the IPv4 path shows it: inner packets, outer datagrams (``peer`` the (address, port)
of the IPv6 socket) and drops with their reason; without one, each packet pays one None
test.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from functools import partial
from ipaddress import IPv6Network

from control.peer_table import PeerStats, PeerTable
from encap import ipv6, tso, vxlan
from encap.errors import CodecError
from overlay.dataplane.counters import Counters
from overlay.dataplane.limits import BUDGET, MAX_DATAGRAM
from overlay.dataplane.rate_limiter import RateLimiter
from overlay.observe.tap import Tap
from tun.device import TunDevice
from tun.offload import VNET_HDR_LEN

HEADROOM = vxlan.PREFIX_LEN
# An IPv6 underlay's header is 20 bytes longer than an IPv4 one's: the IPv6 MTU is the
# TUN's (underlay - 50) less 20, flannel-v6.<VNI>'s underlay - 70.
IPV6_EXTRA_OVERHEAD = 20
_ETH_IPV6 = vxlan.ETHERTYPE_IPV6.to_bytes(2, "big")
_VNET_PLAIN = bytes(VNET_HDR_LEN)
_GSO_TCPV6 = 4  # virtio_net_hdr gso_type
Buffer = bytes | bytearray | memoryview
# impair6(side, buffer, size, peer, release): True when the datagram goes on now.
Impair = Callable[
    [str, Buffer, int, tuple[str, int], Callable[[Buffer, tuple[str, int], float], None]], bool
]


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
        self.port = port
        self.icmp_limit = icmp_limit  # shared with the IPv4 path: one budget of errors
        self.neighbor_adverts = 0
        self.tap: Tap | None = None  # an attached `overlay trace` (overlay.observe.tap)
        # Impairment (the dataplane's ``impair6``, overlay.dataplane.impaired): None
        # while nothing is impaired.
        self.impair: Impair | None = None
        self._rx_buffer = bytearray(MAX_DATAGRAM)
        self._rx_view = memoryview(self._rx_buffer)

    # -- TUN -> peer --------------------------------------------------------------------

    def send(self, frame: bytes, mtu: int) -> None:
        """One IPv6 packet read from the TUN (``frame``: its virtio_net_hdr, zeros when the
        TUN has none, then the packet) to the peer owning its destination; ``mtu``: the
        TUN's (0: no limit)."""
        packet = bytearray(frame[VNET_HDR_LEN:])  # the drains hand over 40 bytes or more
        if frame[1] != 0:  # a GSO packet: the TUN does not offer TSO6, so none comes
            self._tx_drop("tx_ipv6_gso_unsupported", packet)
            return
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
        impair = self.impair
        if impair is not None and not impair("tx", datagram, len(datagram), peer.addr, self._held):
            return  # dropped, or held for later (``_held``)
        self._send(datagram, peer.addr, peer.stats)

    def _send(self, datagram: Buffer, addr: tuple[str, int], stats: PeerStats | None) -> None:
        """``datagram`` to ``addr``, counted (and traced) sent or dropped."""
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
        counters = self.counters
        counters.tx_packets += 1
        counters.tx_bytes += len(datagram)
        counters.tx_packets6 += 1
        counters.tx_bytes6 += len(datagram)
        if stats is not None:
            stats.tx_packets += 1
            stats.tx_bytes += len(datagram)
            stats.last_tx = time.monotonic()

    def _held(self, datagram: Buffer, addr: tuple[str, int], now: float) -> None:
        """A datagram impairment held (delayed, duplicated, corrupted), due now."""
        peer = self.peers.by_public_ipv6(addr[0])
        self._send(datagram, addr, peer.stats if peer is not None else None)

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
        that crossed only veths, goes in as a TCP super-packet the kernel cuts)."""
        recv = self.sock.recvfrom_into
        buf = self._rx_buffer
        drops, drops6 = self.counters.drops, self.counters.drops6
        tap, impair = self.tap, self.impair
        for _ in range(BUDGET):
            try:
                size, source = recv(buf)
            except BlockingIOError:
                break
            except OSError:
                drops["rx_socket_error"] += 1
                drops6["rx_socket_error"] += 1
                continue
            if impair is not None:  # dropped, or held for later (``_received_held``)?
                if not impair("rx", buf, size, source[:2], partial(self._received_held, mtu)):
                    continue
            if tap is not None:
                reason = self._receive_traced(tap, size, source[:2], mtu)
            else:
                reason = self._receive(size, source[0], mtu)
            if reason is not None:
                drops[reason] += 1
                drops6[reason] += 1

    def _received_held(self, mtu: int, datagram: Buffer, source: tuple[str, int], _: float) -> None:
        """A received datagram impairment held, due now: taken as ``on_socket_readable``
        takes one."""
        size = len(datagram)
        self._rx_buffer[:size] = datagram
        if self.tap is not None:
            reason = self._receive_traced(self.tap, size, source, mtu)
        else:
            reason = self._receive(size, source[0], mtu)
        if reason is not None:
            self.counters.drops[reason] += 1
            self.counters.drops6[reason] += 1

    def _tx_drop(self, reason: str, packet: Buffer) -> None:
        """A packet read from the TUN that does not go: counted (and traced)."""
        self.counters.drops[reason] += 1
        self.counters.drops6[reason] += 1
        if self.tap is not None:
            self.tap.drop(reason, packet, None)

    def _receive_traced(self, tap: Tap, size: int, source: tuple[str, int], mtu: int) -> str | None:
        """``_receive`` with the datagram, then its drop or the packet written into the
        TUN, shown to ``tap`` (as the IPv4 path's ``_deliver_traced``)."""
        view = self._rx_view
        tap.outer("rx", view[:size], source)
        written = self.counters.rx_packets
        reason = self._receive(size, source[0], mtu)
        if reason is not None:
            tap.drop(reason, view[:size], source)
        elif self.counters.rx_packets != written:
            tap.inner("rx", view[HEADROOM:size])
        return reason

    def _receive(self, size: int, source: str, mtu: int) -> str | None:
        """The datagram ``buf[:size]`` from ``source``: written into the TUN (None), a
        neighbour solicitation answered (None too), or the reason it was dropped."""
        buf = self._rx_buffer
        sources = self.peers.sources6_of(source)
        if not sources:
            return "rx_unknown_peer"
        if size < HEADROOM:
            return "rx_vxlan_truncated"
        if not buf[0] & vxlan.FLAG_I:
            return "rx_vxlan_bad_flags"
        if buf[4:7] != self.vni_bytes:
            return "rx_vxlan_wrong_vni"
        if buf[20:22] != _ETH_IPV6:
            return "rx_vxlan_bad_ethertype"
        dst_mac = buf[8:14]
        if dst_mac != self.mac:
            if dst_mac == self.solicited_mac:
                return self._answer_solicitation(size, source)
            return "rx_vxlan_foreign_mac"
        target = ipv6.solicited_target(self._rx_view[HEADROOM:size])
        if target is not None:
            return self._answer_solicitation(size, source)
        reason = ipv6.drop_reason6(buf, HEADROOM, size, sources, self.own)
        if reason is not None:
            return reason
        return self._write(size, mtu, source)

    def _write(self, size: int, mtu: int, source: str) -> str | None:
        view = self._rx_view
        buf = self._rx_buffer
        header = _VNET_PLAIN
        length = size - HEADROOM
        if mtu and length > mtu and buf[HEADROOM + 6] == ipv6.PROTO_TCP:
            if not self.tun.vnet_hdr:
                return "rx_too_big"
            header = self._tcp_super_header(mtu, size)
        try:
            if self.tun.vnet_hdr:
                os.writev(self.tun.fd, [header, view[HEADROOM:size]])
            else:
                os.write(self.tun.fd, view[HEADROOM:size])
        except BlockingIOError:
            return "rx_tun_full"
        except OSError:
            return "rx_tun_error"
        counters = self.counters
        counters.rx_packets += 1
        counters.rx_bytes += size
        counters.rx_packets6 += 1
        counters.rx_bytes6 += size
        peer = self.peers.by_public_ipv6(source)
        if peer is not None:
            stats = peer.stats
            stats.rx_packets += 1
            stats.rx_bytes += size
            stats.last_rx = time.monotonic()
        return None

    def _tcp_super_header(self, mtu: int, size: int) -> bytes:
        """The virtio_net_hdr that has the kernel cut the checked TCP packet in the RX
        buffer into segments of ``mtu`` bytes: GSO_TCPV6, its checksum made partial again
        (the pseudo-header sum, which the kernel's segmentation expects)."""
        buf = self._rx_buffer
        l4 = HEADROOM + ipv6.HEADER_LEN
        header_len = ipv6.HEADER_LEN + (buf[l4 + 12] >> 4) * 4
        pseudo = ipv6.pseudo_sum6(buf, HEADROOM, ipv6.PROTO_TCP, size - l4) % 0xFFFF
        buf[l4 + 16 : l4 + 18] = pseudo.to_bytes(2, "big")
        gso_size = mtu - header_len
        return bytes((tso.NEEDS_CSUM, _GSO_TCPV6)) + b"".join(
            value.to_bytes(2, "little") for value in (header_len, gso_size, ipv6.HEADER_LEN, 16)
        )

    def _answer_solicitation(self, size: int, source: str) -> str | None:
        """A neighbour solicitation for our VTEP address, answered with an advertisement
        from our VTEP MAC (as ARP is for the IPv4 VTEP address); anything else multicast
        to us is not ours."""
        inner = self._rx_view[HEADROOM:size]
        if ipv6.solicited_target(inner) != self.vtep_ip:
            return "rx_ndp_not_for_us"
        advert = ipv6.build_neighbor_advertisement(inner, target=self.vtep_ip, mac=self.mac)
        reply = vxlan.prefix(
            self.vni, bytes(self._rx_buffer[14:20]), self.mac, vxlan.ETHERTYPE_IPV6
        )
        try:
            self.sock.sendto(reply + advert, (source, self.port))
        except OSError:
            return "tx_ndp_reply_failed"
        self.neighbor_adverts += 1
        return None
