"""VXLAN in userspace (RFC 7348, as the kernel's vxlan device and flannel.1 speak it).

The udp dataplane with two differences. TX: every packet is read into the arena 22 bytes
after where its datagram starts, and the peer's precomputed prefix (VXLAN header + inner
Ethernet header, ``Peer.prefix``) is copied in front, so a GSO group is still one
contiguous slice. RX: each datagram's VXLAN header and inner Ethernet header are checked
(I flag, VNI, ethertype, our VTEP MAC) before the inner packet gets the udp backend's
checks; ARP requests for our VTEP address are answered, so a kernel peer without a static
neighbour entry still reaches us.
"""

from __future__ import annotations

import os

from control.peer_table import Peer
from encap import arp, gso, vxlan
from encap.errors import CodecError
from overlay.backends.udp import BUDGET, GRO_CMSG_SPACE, MAX_DATAGRAM, MSG_TRUNC, UdpDataplane

HEADROOM = vxlan.PREFIX_LEN
IPV4 = b"\x08\x00"
ARP = b"\x08\x06"


class VxlanDataplane(UdpDataplane):
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

    # -- TUN -> peer ---------------------------------------------------------------------

    def _read_tun(self) -> tuple[list[int], list[tuple[str, int]]]:
        """As the udp backend's, with the peer's 22-byte prefix in front of each packet."""
        readv = os.readv
        fd = self.tun.fd
        arena = self._tx_arena
        view = self._tx_view
        skip = self.tun.offset
        scratch = self._vnet_scratch
        limit = len(arena) - MAX_DATAGRAM - HEADROOM
        lookup = self.peers.lookup
        drops = self.counters.drops
        lengths: list[int] = []
        addrs: list[tuple[str, int]] = []
        last_dst = b""
        peer: Peer | None = None
        at = 0
        for _ in range(BUDGET):
            if at > limit:
                break
            body = at + HEADROOM
            try:
                if skip:
                    length = readv(fd, [scratch, view[body:]]) - skip
                else:
                    length = readv(fd, [view[body:]])
            except BlockingIOError:
                break
            if length < 20 or arena[body] >> 4 != 4:
                drops["tx_not_ipv4"] += 1
                continue
            dst = arena[body + 16 : body + 20]
            if dst != last_dst:
                peer = lookup(dst)
                if peer is None or not peer.prefix:
                    self._no_route(bytes(arena[body : body + length]))
                    last_dst = b""
                    continue
                last_dst = dst
            assert peer is not None
            view[at:body] = peer.prefix
            lengths.append(HEADROOM + length)
            addrs.append(peer.addr)
            at = body + length
        return lengths, addrs

    # -- peer -> TUN ---------------------------------------------------------------------

    def on_socket_readable(self) -> None:
        recv = self.sock.recvfrom_into
        buf = self._rx_buffer
        drops = self.counters.drops
        for _ in range(BUDGET):
            try:
                size, (source_ip, _port) = recv(buf)
            except BlockingIOError:
                break
            except OSError:
                drops["rx_socket_error"] += 1
                continue
            self._write_pieces(self._inner_pieces(source_ip, size, size))

    def on_socket_readable_gro(self) -> None:
        recv = self.sock.recvmsg_into
        buffers = [self._rx_buffer]
        gro_size = gso.gro_size
        drops = self.counters.drops
        moved = 0
        while moved < BUDGET:
            try:
                size, ancdata, flags, (source_ip, _port) = recv(buffers, GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError:
                drops["rx_socket_error"] += 1
                continue
            segment = gro_size(ancdata, size) if ancdata else size
            moved += -(-size // segment)
            if flags & MSG_TRUNC:
                drops["rx_truncated"] += 1
                continue
            self._write_pieces(self._inner_pieces(source_ip, size, segment))

    def _inner_pieces(self, source_ip: str, size: int, segment: int) -> list[tuple[int, int]]:
        """The (start, end) of the inner IPv4 packets to write to the TUN, for the
        ``segment``-byte datagrams in the RX buffer; everything else counted and dropped."""
        buf = self._rx_buffer
        drops = self.counters.drops
        peer = self.peers.by_public_ip(source_ip)
        if peer is None:
            drops["rx_unknown_peer"] += -(-size // segment)
            return []
        theirs = peer.net >> peer.shift
        their_shift = peer.shift
        own_net, own_shift = self._own
        from_bytes = int.from_bytes
        vni = self.vni_bytes
        mac = self.mac
        pieces: list[tuple[int, int]] = []
        for start in range(0, size, segment):
            end = min(start + segment, size)
            inner = start + HEADROOM
            if end - inner < 20:
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
            length = end - inner
            if buf[inner] >> 4 != 4 or buf[inner] & 0x0F < 5:
                drops["rx_not_ipv4"] += 1
                continue
            if (buf[inner + 2] << 8 | buf[inner + 3]) != length:
                drops["rx_bad_length"] += 1
                continue
            if from_bytes(buf[inner + 12 : inner + 16], "big") >> their_shift != theirs:
                drops["rx_foreign_source"] += 1
                continue
            if from_bytes(buf[inner + 16 : inner + 20], "big") >> own_shift != own_net:
                drops["rx_not_our_subnet"] += 1
                continue
            pieces.append((inner, end))
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
