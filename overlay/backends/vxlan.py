"""VXLAN in userspace (RFC 7348, as the kernel's vxlan device and flannel.1 speak it).

The udp dataplane with two differences. TX: ``headroom`` makes the udp dataplane read every
packet 22 bytes into its datagram and copy the peer's precomputed prefix (VXLAN header +
inner Ethernet header, ``Peer.prefix``) in front, so a GSO group is still one contiguous
slice. RX: each datagram's VXLAN header and inner Ethernet header are checked
(I flag, VNI, ethertype, our VTEP MAC) before the inner packet gets the udp backend's
checks; ARP requests for our VTEP address are answered, so a kernel peer without a static
neighbour entry still reaches us.
"""

from __future__ import annotations

from encap import arp, gso, vxlan
from encap.errors import CodecError
from overlay.backends.udp import UdpDataplane

HEADROOM = vxlan.PREFIX_LEN
MIN_FRAME = HEADROOM + 20  # a VXLAN datagram that can hold an IPv4 header
IPV4 = b"\x08\x00"
ARP = b"\x08\x06"


class VxlanDataplane(UdpDataplane):
    headroom = HEADROOM

    def __init__(
        self, *args: object, vni: int, mac: bytes, vtep_ip: bytes, port: int, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.vni = vni
        self.vni_bytes = vxlan.header(vni)[4:7]
        self.mac = mac
        self.vtep_ip = vtep_ip  # our subnet's network address, the VTEP address peers ARP
        self.port = port
        self.arp_replies = 0

    # -- peer -> TUN ---------------------------------------------------------------------

    def _deliver(self, source_ip: str, size: int, segment: int) -> None:
        """A GRO batch whose datagrams all carry one valid header is coalesced into TUN
        super-packets like the udp backend's; anything else goes through the per-frame
        checks (which also answer ARP)."""
        if segment < size and self.tun_gso and self._same_headers(size, segment):
            peer = self.peers.by_public_ip(source_ip)
            if peer is not None:
                theirs = (peer.net >> peer.shift, peer.shift)
                drops = self.counters.drops
                self._write_planned(
                    gso.plan_tun_writes(
                        self._rx_buffer, size, segment, theirs, self._own, drops, skip=HEADROOM
                    )
                )
                return
        self._write_pieces(self._inner_pieces(source_ip, size, segment))

    def _same_headers(self, size: int, segment: int) -> bool:
        """Whether every datagram of a GRO receive carries the same, valid VXLAN and
        Ethernet header (one sender's GSO batch always does): then the inner packets can
        be coalesced into TUN super-packets like the udp backend's. A datagram too short
        to hold an IPv4 header behind it goes the per-frame way, which counts it as
        rx_vxlan_truncated however it was batched."""
        buf = self._rx_buffer
        first = buf[:HEADROOM]
        last = size % segment or segment
        if (
            last < MIN_FRAME
            or segment < MIN_FRAME
            or not first[0] & 0x08
            or first[4:7] != self.vni_bytes
            or first[8:14] != self.mac
            or first[20:22] != IPV4
        ):
            return False
        return all(
            buf[start : start + HEADROOM] == first for start in range(segment, size, segment)
        )

    def _inner_pieces(self, source_ip: str, size: int, segment: int) -> list[tuple[int, int]]:
        """The (start, end) of the inner IPv4 packets to write to the TUN, for the
        ``segment``-byte datagrams in the RX buffer; everything else counted and dropped."""
        buf = self._rx_buffer
        drops = self.counters.drops
        peer = self.peers.by_public_ip(source_ip)
        if peer is None:
            drops["rx_unknown_peer"] += -(-size // segment)
            return []
        theirs = (peer.net >> peer.shift, peer.shift)
        ours = self._own
        check = gso.drop_reason
        vni = self.vni_bytes
        mac = self.mac
        pieces: list[tuple[int, int]] = []
        for start in range(0, size, segment):
            end = min(start + segment, size)
            if end - start < MIN_FRAME:
                drops["rx_vxlan_truncated"] += 1
                continue
            if not buf[start] & 0x08:
                drops["rx_vxlan_bad_flags"] += 1
                continue
            if buf[start + 4 : start + 7] != vni:
                drops["rx_vxlan_wrong_vni"] += 1
                continue
            ethertype = buf[start + 20 : start + 22]
            if ethertype != IPV4:
                if ethertype == ARP:
                    self._answer_arp(start, end, source_ip)
                else:
                    drops["rx_vxlan_bad_ethertype"] += 1
                continue
            if buf[start + 8 : start + 14] != mac:
                drops["rx_vxlan_foreign_mac"] += 1
                continue
            reason = check(buf, start + HEADROOM, end, theirs, ours)
            if reason is None:
                pieces.append((start + HEADROOM, end))
            else:
                drops[reason] += 1
        return pieces

    def _answer_arp(self, start: int, end: int, source_ip: str) -> None:
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
            self.sock.sendto(reply, (source_ip, self.port))
            self.arp_replies += 1
        except OSError:
            self.counters.drops["tx_arp_reply_failed"] += 1
