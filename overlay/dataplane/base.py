"""What both directions of a dataplane share: the TUN, the socket, the peer table, the
counters, the buffers, the kernel features probed once, and the native drains
(``encap.native.Drains``) that run both directions' wake-ups in C. ``send`` and
``receive`` hold the two directions; ``udp.UdpDataplane`` joins them."""

from __future__ import annotations

import mmap
import socket
from ipaddress import IPv4Network
from typing import TYPE_CHECKING, Any

from control.peer_table import PeerTable
from encap import native
from overlay.dataplane.counters import Counters
from overlay.dataplane.limits import BUDGET, MAX_DATAGRAM, TX_ARENA
from overlay.dataplane.rate_limiter import RateLimiter
from overlay.dataplane.udp_socket import enable_udp_gro, probe_udp_segment
from overlay.observe.tap import Tap
from tun.device import TunDevice
from tun.offload import VNET_HDR_LEN

if TYPE_CHECKING:
    from overlay.impair.links import Links


class Dataplane:
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
        busy_poll_us: int = 0,
    ) -> None:
        # After a wake-up, keep polling both directions this long (overlay.dataplane.busy_poll).
        self.busy_poll_us = busy_poll_us
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
        # Impairment (overlay.dataplane.impaired): the models of the impaired links, None
        # while nothing is impaired; what the wake-ups then hand over is in ``impaired``.
        self.links: Links | None = None
        self.impaired: frozenset[str] = frozenset()  # directions impaired: "out", "in"
        # The per-byte and per-packet work in C (encap.native), else the pure reference.
        self.native = native.AVAILABLE
        self._drains: Any = None  # native.Drains, made on first use (_native_drains)
        # vxlan: (our VNI bytes, our VTEP MAC) that every received datagram must carry.
        self.vxlan_rules: tuple[bytes, bytes] | None = None
        # Two datagrams' worth: a gathered run (on_socket_readable_gro) stays within the
        # first 64 KiB, and the next receive always has room for a whole datagram.
        self._rx_buffer = bytearray(2 * MAX_DATAGRAM)
        self._rx_view = memoryview(self._rx_buffer)
        # Anonymous pages, faulted in as the drain first writes them: a bytearray is
        # zeroed (so resident) at once, 1 MiB of every idle daemon's RSS.
        self._tx_arena = mmap.mmap(-1, TX_ARENA)
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

    def ipv6_status(self) -> dict[str, int]:
        """What the IPv6 half reports (vxlan with EnableIPv6); nothing here."""
        return {}

    def set_tap(self, tap: Tap | None) -> None:
        """Attach (None: detach) what an `overlay trace` sees, to every path of this
        dataplane (vxlan's IPv6 half too): read by the drains once per wake-up."""
        self.tap = tap

    def sockets(self) -> list[socket.socket]:
        """The sockets this dataplane receives on (closed with it)."""
        return [self.sock]

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

    def _native_drains(self) -> Any:
        """The native reader callbacks (``native.Drains``), made once the dataplane is
        complete (a subclass sets its own attributes after ours: the first start() or
        reader call); None without the module. It keeps its counts until its flush(),
        which every Counters.snapshot() calls first."""
        if self._drains is None and self.native and native.Drains is not None:
            self._drains = native.Drains(self, BUDGET)
            self.counters.pending.append(self._drains.flush)
        return self._drains
