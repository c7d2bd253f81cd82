"""VXLAN in userspace (RFC 7348, as the kernel's vxlan device and flannel.1 speak it).

The udp dataplane with two differences. TX: ``headroom`` makes the udp dataplane read every
packet 22 bytes into its datagram and copy the peer's precomputed prefix (VXLAN header +
inner Ethernet header, ``Peer.prefix``) in front, so a GSO group is still one contiguous
slice. RX: ``vxlan_rules`` makes the udp dataplane's receive check each datagram's VXLAN
header and inner Ethernet header (I flag, VNI, ethertype, our VTEP MAC,
``encap.gso.vxlan_reason``) before the inner packet gets the udp backend's checks, in the
same pass that coalesces TCP runs; ARP requests for our VTEP address are handed back and
answered here, so a kernel peer without a static neighbour entry still reaches us.

With EnableIPv6 an ``Ipv6Path`` (``overlay.dataplane.ipv6``) carries the IPv6 half over
its own socket: the send drain hands it the TUN's IPv6 packets, and its socket has its
own reader (with the native module both are the drains': ``Drains.tx`` sends the IPv6
packets itself, ``Drains.rx6`` is the IPv6 socket's reader; ``Ipv6Path`` is their
reference and the path a trace or an impairment takes).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Network

from control.lease import Lease
from control.peer_table import PeerTable
from encap import arp, vxlan
from encap.errors import CodecError
from overlay.dataplane.counters import Counters
from overlay.dataplane.ipv6 import Ipv6Path
from overlay.dataplane.udp import UdpDataplane
from overlay.impair.rules import Rules
from overlay.observe.tap import Tap
from tun.device import TunDevice

HEADROOM = vxlan.PREFIX_LEN


def vtep_mac_of(lease: Lease) -> bytes | None:
    """The VtepMAC a vxlan lease publishes; None when missing or malformed."""
    data = lease.backend_data or {}
    text = next((v for k, v in data.items() if k.lower() == "vtepmac"), None)
    if not isinstance(text, str):
        return None
    try:
        return vxlan.parse_mac(text)
    except CodecError:
        return None


def vxlan_prefix_for(vni: int, mac: bytes) -> Callable[[Lease], bytes]:
    """The peer table's per-peer prefix: VXLAN header + Ethernet header to its VTEP MAC."""

    def prefix_for(lease: Lease) -> bytes:
        peer_mac = vtep_mac_of(lease)
        return vxlan.prefix(vni, peer_mac, mac) if peer_mac is not None else b""

    return prefix_for


def vtep6_mac_of(lease: Lease) -> bytes | None:
    """The VtepMAC of flannel-v6.<VNI> a dual-stack lease publishes in BackendV6Data."""
    return vtep_mac_of(replace(lease, backend_data=lease.backend_v6_data))


def vxlan6_prefix_for(vni: int, mac: bytes) -> Callable[[Lease], bytes]:
    """The IPv6 half's prefix: to the peer's BackendV6Data VTEP MAC, inner type 0x86DD."""

    def prefix6_for(lease: Lease) -> bytes:
        peer_mac = vtep6_mac_of(lease)
        if peer_mac is None:
            return b""
        return vxlan.prefix(vni, peer_mac, mac, vxlan.ETHERTYPE_IPV6)

    return prefix6_for


class VxlanDataplane(UdpDataplane):
    headroom = HEADROOM

    def __init__(
        self,
        tun: TunDevice,
        sock: socket.socket,
        peers: PeerTable,
        own_subnet: IPv4Network,
        counters: Counters,
        *,
        vni: int,
        mac: bytes,
        vtep_ip: bytes,
        port: int,
        offload: bool = True,
        tun_tso: bool = False,
        mtu: int = 0,
        busy_poll_us: int = 0,
    ) -> None:
        super().__init__(
            tun,
            sock,
            peers,
            own_subnet,
            counters,
            offload=offload,
            tun_tso=tun_tso,
            mtu=mtu,
            busy_poll_us=busy_poll_us,
        )
        self.vni = vni
        self.vni_bytes = vxlan.header(vni)[4:7]
        self.mac = mac
        self.vtep_ip = vtep_ip  # our subnet's network address, the VTEP address peers ARP
        self.port = port
        self.arp_replies = 0
        # Checked on every received datagram before its inner packet (encap.gso.vxlan_reason).
        self.vxlan_rules = (self.vni_bytes, mac)
        self.ipv6: Ipv6Path | None = None  # the IPv6 half (EnableIPv6): attach_ipv6

    def attach_ipv6(self, path: Ipv6Path) -> None:
        """Carry IPv6 too, over ``path`` (before start)."""
        self.ipv6 = path

    def _register(self, loop: asyncio.AbstractEventLoop) -> None:
        """The IPv4 readers, and the IPv6 socket's: the native drains' ``rx6`` (which
        hands a wake-up with a trace or an impairment to ``Ipv6Path.on_socket_readable``),
        else that method. Registered again with the IPv4 ones: a new MTU makes new drains."""
        super()._register(loop)
        if self.ipv6 is not None:
            drains = self._native_drains()
            reader = drains.rx6 if drains is not None else self._ipv6_readable
            loop.remove_reader(self.ipv6.sock.fileno())
            loop.add_reader(self.ipv6.sock.fileno(), reader)

    def _unregister(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.ipv6 is not None:
            loop.remove_reader(self.ipv6.sock.fileno())
        super()._unregister(loop)

    def _ipv6_readable(self) -> None:
        """The IPv6 socket's reader without the native module."""
        if self.ipv6 is not None:
            self.ipv6.on_socket_readable(self.mtu)

    def set_impairment(self, rules: Rules) -> None:
        super().set_impairment(rules)
        if self.ipv6 is not None:  # its IPv6 half asks impair6 per datagram while impaired
            self.ipv6.impair = self.impair6 if self.links is not None else None

    def set_tap(self, tap: Tap | None) -> None:
        super().set_tap(tap)
        if self.ipv6 is not None:
            self.ipv6.tap = tap

    def ipv6_status(self) -> dict[str, int]:
        if self._drains is not None:  # the IPv6 half's counts the drains still hold
            self._drains.flush()
        return self.ipv6.status() if self.ipv6 is not None else {}

    def sockets(self) -> list[socket.socket]:
        return [*super().sockets(), *((self.ipv6.sock,) if self.ipv6 is not None else ())]

    def _send_ipv6(self, frame: bytes, hold: bool = False) -> None:
        if self.ipv6 is None:
            super()._send_ipv6(frame, hold)
        else:
            self.ipv6.send(frame, self.mtu, hold)

    def _flush_ipv6(self) -> None:
        if self.ipv6 is not None:
            self.ipv6.flush_tx()

    def _answer_arp(self, start: int, end: int, source: tuple[str, int]) -> None:
        """Reply to "who has <our VTEP address>" from a peer (rare: off the hot path)."""
        frame = bytes(self._rx_buffer[start:end])
        try:
            vxlan.decode(frame, vni=self.vni, mac=self.mac)
            request = arp.parse(frame[HEADROOM:])
        except CodecError as e:
            self.counters.drops[f"rx_arp_{e.reason}"] += 1
            return
        if request.operation != arp.REQUEST or request.target_ip != self.vtep_ip:
            self.counters.drops["rx_arp_not_for_us"] += 1
            return
        reply = vxlan.prefix(self.vni, request.sender_mac, self.mac, vxlan.ETHERTYPE_ARP)
        reply += arp.reply(request, self.mac)
        try:
            self.sock.sendto(reply, (source[0], self.port))
            self.arp_replies += 1
        except OSError:
            self.counters.drops["tx_arp_reply_failed"] += 1
