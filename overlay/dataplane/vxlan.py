"""VXLAN in userspace (RFC 7348, as the kernel's vxlan device and flannel.1 speak it).

The udp dataplane with two differences. TX: ``headroom`` makes the udp dataplane read every
packet 22 bytes into its datagram and copy the peer's precomputed prefix (VXLAN header +
inner Ethernet header, ``Peer.prefix``) in front, so a GSO group is still one contiguous
slice. RX: ``vxlan_rules`` makes the udp dataplane's receive check each datagram's VXLAN
header and inner Ethernet header (I flag, VNI, ethertype, our VTEP MAC,
``encap.gso.vxlan_reason``) before the inner packet gets the udp backend's checks, in the
same pass that coalesces TCP runs; ARP requests for our VTEP address are handed back and
answered here, so a kernel peer without a static neighbour entry still reaches us.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from ipaddress import IPv4Network

from control.lease import Lease
from control.peer_table import PeerTable
from encap import arp, vxlan
from encap.errors import CodecError
from overlay.dataplane.counters import Counters
from overlay.dataplane.udp import UdpDataplane
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
