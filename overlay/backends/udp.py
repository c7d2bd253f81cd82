"""flannel's udp backend: TUN <-> UDP socket, one inner IPv4 packet per datagram.

The two handlers are drain loops registered with ``loop.add_reader``: each callback moves
every queued packet (up to a budget, so the other direction is not starved) instead of one
packet per wake-up. Validation on receive is inline comparisons on the buffer; the full
codecs in ``encap`` are used only off the hot path (ICMP errors).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from ipaddress import IPv4Network

from control.peer_table import PeerTable
from encap import icmp
from overlay.counters import Counters
from tun.device import TunDevice

# Packets moved per wake-up before yielding to the loop (bounds the other direction's wait).
BUDGET = 256
SOCKET_BUFFER = 16 * 1024 * 1024
MAX_DATAGRAM = 65535


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


def open_socket(address: str, port: int) -> socket.socket:
    """The UDP socket peers send to, bound to the underlay address, with large buffers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    def __init__(
        self,
        tun: TunDevice,
        sock: socket.socket,
        peers: PeerTable,
        own_subnet: IPv4Network,
        counters: Counters,
        *,
        offload: bool = True,
    ) -> None:
        self.offload = offload  # batching/offloads allowed (probed features permitting)
        self.tun = tun
        self.sock = sock
        self.peers = peers
        self.counters = counters
        self.own_net = int(own_subnet.network_address)
        self.own_shift = 32 - own_subnet.prefixlen
        self.icmp_limit = RateLimiter()
        self._rx_buffer = bytearray(MAX_DATAGRAM)
        self._rx_view = memoryview(self._rx_buffer)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.tun.fd, self.on_tun_readable)
        loop.add_reader(self.sock.fileno(), self.on_socket_readable)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.tun.fd)
        loop.remove_reader(self.sock.fileno())

    # -- TUN -> peer ---------------------------------------------------------------------

    def on_tun_readable(self) -> None:
        read = os.read
        fd = self.tun.fd
        lookup = self.peers.lookup
        sendto = self.sock.sendto
        drops = self.counters.drops
        sent = sent_bytes = 0
        for _ in range(BUDGET):
            try:
                packet = read(fd, MAX_DATAGRAM)
            except BlockingIOError:
                break
            if len(packet) < 20 or packet[0] >> 4 != 4:
                drops["tx_not_ipv4"] += 1
                continue
            peer = lookup(packet[16:20])
            if peer is None:
                self._no_route(packet)
                continue
            try:
                sendto(packet, peer.addr)
            except BlockingIOError:
                drops["tx_socket_full"] += 1
                continue
            except OSError:
                drops["tx_send_error"] += 1
                continue
            sent += 1
            sent_bytes += len(packet)
        self.counters.tx_packets += sent
        self.counters.tx_bytes += sent_bytes

    def _no_route(self, packet: bytes) -> None:
        """ICMP net unreachable back into the TUN, as flannel's proxy does (rate-limited)."""
        self.counters.drops["tx_no_route"] += 1
        if not icmp.may_send_error_for(packet) or not self.icmp_limit.allow():
            return
        # Sourced from the unreachable destination: our own addresses would be dropped by
        # the kernel as martians when written into the TUN.
        reply = icmp.build_dest_unreachable(packet, src=packet[16:20])
        if self.tun.write(reply):
            self.counters.icmp_unreachable_sent += 1

    # -- peer -> TUN ---------------------------------------------------------------------

    def on_socket_readable(self) -> None:
        recv = self.sock.recvfrom_into
        buf = self._rx_buffer
        view = self._rx_view
        by_ip = self.peers.by_public_ip
        write = os.write
        fd = self.tun.fd
        own_net = self.own_net >> self.own_shift
        own_shift = self.own_shift
        drops = self.counters.drops
        received = received_bytes = 0
        for _ in range(BUDGET):
            try:
                size, (source_ip, _port) = recv(buf)
            except BlockingIOError:
                break
            except OSError:
                drops["rx_socket_error"] += 1
                continue
            peer = by_ip(source_ip)
            if peer is None:
                drops["rx_unknown_peer"] += 1
                continue
            if size < 20 or buf[0] >> 4 != 4 or buf[0] & 0x0F < 5:
                drops["rx_not_ipv4"] += 1
                continue
            if (buf[2] << 8 | buf[3]) != size:
                drops["rx_bad_length"] += 1
                continue
            if not peer.owns(buf[12:16]):
                drops["rx_foreign_source"] += 1
                continue
            if int.from_bytes(buf[16:20], "big") >> own_shift != own_net:
                drops["rx_not_our_subnet"] += 1
                continue
            try:
                write(fd, view[:size])
            except BlockingIOError:
                drops["rx_tun_full"] += 1
                continue
            except OSError:
                drops["rx_tun_error"] += 1
                continue
            received += 1
            received_bytes += size
        self.counters.rx_packets += received
        self.counters.rx_bytes += received_bytes
