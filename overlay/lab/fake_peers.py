"""Fake peers for scale runs: thousands of leases of nodes that do not exist, written into
a testbed's etcd as flanneld writes them, and a few *live* ones that answer pings.

Addresses: the underlay is the benchmarking range 198.18.0.0/15 (room for 131,070 public
IPs on the testbed's bridge, so host-gw and DirectRouting find every fake peer "on our L2
segment"), the overlay network 10.0.0.0/8 (65,536 /24 leases). Both live only inside the
testbed's namespaces, which have no route out. A fake peer's public IP is an address
nobody holds: packets to it die on the bridge. A live peer's public IP is added to the
bridge in the underlay namespace, where ``EchoPeers`` answers ICMP echo requests sent
to its subnet, in the backend's framing (flannel's udp, VXLAN) or, for host-gw, by that
namespace's own kernel.
"""

from __future__ import annotations

import json
import random
import select
import socket
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from control.lease import subnet_key
from encap import vxlan
from overlay.lab.etcd import EtcdGateway
from overlay.lab.netns import entered
from tun.rtnl import IPRoute

SCALE_UNDERLAY = "198.18.0.0/15"
SCALE_NETWORK = "10.0.0.0/8"
LEASE_PREFIX = "/coreos.com/network/subnets/"
LEASE_TTL = 24 * 3600
VNI = 1
FIRST_PUBLIC = 256  # fake public IPs start above the nodes' (underlay .1, .2, ...)
PORTS = {"udp": 8285, "vxlan": vxlan.PORT}
ICMP_ECHO, ICMP_ECHO_REPLY = 8, 0


@dataclass(frozen=True)
class FakePeer:
    subnet: IPv4Network
    public_ip: IPv4Address

    @property
    def mac(self) -> str:
        """The VTEP MAC a vxlan node with this public IP publishes (as ours derive it)."""
        return vxlan.format_mac(vxlan.vtep_mac(str(self.public_ip), VNI))

    @property
    def key(self) -> str:
        return LEASE_PREFIX + subnet_key(self.subnet)

    def value(self, backend: str) -> str:
        """The lease value flanneld's backend of that type writes."""
        record: dict[str, object] = {"PublicIP": str(self.public_ip), "PublicIPv6": None}
        if backend == "vxlan":
            record["BackendType"] = "vxlan"
            record["BackendData"] = {"VNI": VNI, "VtepMAC": self.mac}
        elif backend == "host-gw":
            record["BackendType"] = "host-gw"
        return json.dumps(record, separators=(",", ":"))

    def probe_address(self) -> IPv4Address:
        """The address in its subnet that a live peer answers for."""
        return self.subnet.network_address + 1


class FakePeers:
    """``count`` leases from the top of ``network`` down (``own`` skipped), public IPs
    from the bottom of ``underlay`` up; the first ``live`` of them answer. ``peers`` is
    what the registry holds, updated by every write made through this object."""

    def __init__(
        self,
        backend: str,
        count: int,
        *,
        own: IPv4Network,
        live: int = 0,
        underlay: str = SCALE_UNDERLAY,
        network: str = SCALE_NETWORK,
    ) -> None:
        self.backend = backend
        self.own = own
        self.underlay = IPv4Network(underlay)
        self.network = IPv4Network(network)
        self._next_subnet = 0
        self._next_ip = FIRST_PUBLIC
        self.peers: dict[IPv4Network, FakePeer] = {}
        for _ in range(count):
            peer = FakePeer(self._fresh_subnet(), self._fresh_ip())
            self.peers[peer.subnet] = peer
        self.live = list(self.peers.values())[:live]

    def _fresh_subnet(self) -> IPv4Network:
        size = 1 << (32 - self.own.prefixlen)
        top = int(self.network.broadcast_address) + 1
        while True:
            self._next_subnet += 1
            start = top - size * self._next_subnet
            if start < int(self.network.network_address):
                raise ValueError(f"{self.network} has no free /{self.own.prefixlen} left")
            subnet = IPv4Network((start, self.own.prefixlen))
            if subnet != self.own:
                return subnet

    def _fresh_ip(self) -> IPv4Address:
        address = self.underlay.network_address + self._next_ip
        if address >= self.underlay.broadcast_address - 16:  # the etcd members live there
            raise ValueError(f"{self.underlay} has no public IP left for a fake peer")
        self._next_ip += 1
        return address

    def write_all(self, gateway: EtcdGateway, lease: str) -> None:
        """Every peer, in transactions of etcd's maximum size."""
        items = [(p.key, p.value(self.backend)) for p in self.peers.values()]
        gateway.put_many(items, lease)

    def churn(self, gateway: EtcdGateway, changes: int, lease: str, seed: int = 19) -> float:
        """``changes`` single writes, a third each adds, deletes and edits (a new public IP,
        and so a new VTEP MAC) of peers that are not live, in random order, as fast as etcd
        takes them. Returns the wall time the last one was acknowledged."""
        rng = random.Random(seed)
        live = {p.subnet for p in self.live}
        candidates = [s for s in self.peers if s not in live]
        touched = rng.sample(candidates, min(len(candidates), changes - changes // 3))
        deletes, edits = touched[: changes // 3], touched[changes // 3 :]
        plan: list[tuple[str, IPv4Network | None]] = [("add", None)] * (changes // 3)
        plan += [("delete", s) for s in deletes] + [("edit", s) for s in edits]
        rng.shuffle(plan)
        for kind, subnet in plan:
            if kind == "delete":
                assert subnet is not None
                gateway.delete(self.peers.pop(subnet).key)
                continue
            peer = FakePeer(subnet or self._fresh_subnet(), self._fresh_ip())
            self.peers[peer.subnet] = peer
            gateway.put(peer.key, peer.value(self.backend), lease)
        return time.time()


class EchoPeers(threading.Thread):
    """The live peers of a testbed, in its underlay namespace: their public IPs on the
    bridge, and ICMP echo requests to their subnets answered. udp and vxlan: this thread
    decapsulates, answers and encapsulates back to the sending node (to its VTEP MAC, for
    vxlan); host-gw: the namespace's kernel answers (the probe address on its ``lo``)."""

    def __init__(self, netns: str, bridge: str, backend: str, peers: list[FakePeer]) -> None:
        super().__init__(daemon=True, name="echo-peers")
        self.netns = netns
        self.backend = backend
        self.peers = peers
        self.answered = 0
        self._halt = threading.Event()
        self._sockets: list[socket.socket] = []
        with IPRoute(netns=netns, flags=0) as ipr:
            (index,) = ipr.link_lookup(ifname=bridge)
            (lo,) = ipr.link_lookup(ifname="lo")
            for peer in peers:
                prefixlen = IPv4Network(SCALE_UNDERLAY).prefixlen
                ipr.addr("add", index=index, address=str(peer.public_ip), prefixlen=prefixlen)
                if backend == "host-gw":
                    ipr.addr("add", index=lo, address=str(peer.probe_address()), prefixlen=32)
        if backend in PORTS:
            with entered(netns):
                for peer in peers:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.bind((str(peer.public_ip), PORTS[backend]))
                    self._sockets.append(sock)

    def run(self) -> None:
        port = PORTS.get(self.backend)
        while self._sockets and not self._halt.is_set():
            readable, _, _ = select.select(self._sockets, [], [], 0.2)
            for sock in readable:
                data, (source, _) = sock.recvfrom(65535)
                reply = self._reply(data, source)
                if reply is not None:
                    sock.sendto(reply, (source, port))
                    self.answered += 1

    def _reply(self, datagram: bytes, source: str) -> bytes | None:
        """The echo reply to a request in ``datagram``, framed back to ``source``."""
        head = b""
        if self.backend == "vxlan":
            if len(datagram) < vxlan.PREFIX_LEN:
                return None
            theirs = vxlan.vtep_mac(source, VNI)
            head = vxlan.prefix(VNI, theirs, datagram[8:14])  # to them, from the MAC asked
            datagram = datagram[vxlan.PREFIX_LEN :]
        packet = bytearray(datagram)
        ihl = (packet[0] & 0x0F) * 4 if packet else 0
        if len(packet) < ihl + 8 or packet[9] != 1 or packet[ihl] != ICMP_ECHO:
            return None
        packet[12:16], packet[16:20] = packet[16:20], packet[12:16]
        packet[ihl] = ICMP_ECHO_REPLY
        checksum = int.from_bytes(packet[ihl + 2 : ihl + 4], "big") + (ICMP_ECHO << 8)
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
        packet[ihl + 2 : ihl + 4] = checksum.to_bytes(2, "big")
        return head + bytes(packet)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=2)
        for sock in self._sockets:
            sock.close()
