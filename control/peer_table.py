"""The table the dataplane reads: destination address -> peer, and public IP -> peer.

Lookups are dict probes keyed by the masked destination (all leases of a network share
SubnetLen, so there is usually one probe), not flannel's linear first-match scan. The
native drains (encap/csrc/) read ``routes`` and ``senders`` directly, so a wake-up
routes and attributes its packets without calling back into Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from control.lease import Lease

Sources = tuple[tuple[int, int], ...]


class PeerStats:
    """Per-peer traffic counters, plain attributes bumped on the hot path (once per send
    group or receive, not per packet) and read at scrape time. ``last_rx``/``last_tx`` are
    ``time.monotonic()`` values (0.0: never), the same clock in every worker process.
    Carried over when a peer's lease changes, so a renewed or edited lease keeps them."""

    __slots__ = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "last_tx", "last_rx")

    def __init__(self) -> None:
        self.tx_packets = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.rx_bytes = 0
        self.last_tx = 0.0
        self.last_rx = 0.0

    def snapshot(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class Peer:
    lease: Lease
    # (public IP as str, UDP port): the sendto() address, built once.
    addr: tuple[str, int]
    net: int  # subnet network address as an int
    shift: int  # 32 - prefix length
    # Encapsulation bytes put before every packet to this peer (VXLAN + Ethernet header),
    # computed once here instead of per packet; empty for flannel's udp framing.
    prefix: bytes = b""
    stats: PeerStats = field(default_factory=PeerStats, compare=False)
    name: str = ""  # the subnet as text (``10.244.3.0/24``): how status and metrics name it

    def owns(self, address: bytes) -> bool:
        """Whether a 4-byte address lies inside this peer's subnet."""
        return int.from_bytes(address, "big") >> self.shift == self.net >> self.shift


def _age(peer: Peer) -> tuple[int, str]:
    return peer.lease.create_revision, peer.lease.key


class PeerTable:
    """Peers by subnet, with O(1) lookups for the hot path. Not thread-safe (one loop).

    Every change is a batch (``apply``; ``upsert``, ``remove`` and ``replace_all`` are
    batches too) applied copy-on-write: the objects the hot path reads (``routes``, the
    per-length route dicts, ``senders``) are never changed once published; a batch copies
    the ones it touches, changes the copies and publishes them together at its end. A
    reader between two batches sees the table before or after a whole batch, never part
    of one, and the cost of a batch is a few dict copies in C plus its own changes (not
    a rebuild and sort of every peer)."""

    def __init__(self, port: int, prefix_for: Callable[[Lease], bytes] | None = None) -> None:
        self.port = port
        self.prefix_for = prefix_for
        self._by_subnet: dict[IPv4Network, Peer] = {}
        # Public IP -> its peers by subnet (a node may hold several leases): the index a
        # batch recomputes the touched public IPs' entries from.
        self._by_ip: dict[str, dict[IPv4Network, Peer]] = {}
        # [(shift, {masked destination: peer})], longest prefix first.
        self.routes: list[tuple[int, dict[int, Peer]]] = []
        self._by_public_ip: dict[str, Peer] = {}
        self._sources: dict[str, Sources] = {}
        # Public IP as an int -> (sources_of(ip), by_public_ip(ip).stats): what a receive
        # from that address needs, keyed by what C has at hand (the sockaddr).
        self.senders: dict[int, tuple[Sources, PeerStats]] = {}

    def __len__(self) -> int:
        return len(self._by_subnet)

    def __contains__(self, subnet: object) -> bool:
        return subnet in self._by_subnet

    def peers(self) -> list[Peer]:
        return list(self._by_subnet.values())

    def get(self, subnet: IPv4Network) -> Peer | None:
        return self._by_subnet.get(subnet)

    def upsert(self, lease: Lease) -> bool:
        """Add or replace the peer for ``lease.subnet``; True when anything changed."""
        return bool(self.apply([lease], [])[0])

    def remove(self, subnet: IPv4Network) -> Peer | None:
        peer = self._by_subnet.get(subnet)
        self.apply([], [subnet])
        return peer

    def replace_all(self, leases: list[Lease]) -> tuple[list[Lease], list[Lease]]:
        """Make the table hold exactly ``leases``; return (added or changed, removed).

        Compares content, not only subnets, so a changed PublicIP or VtepMAC is applied.
        """
        wanted = {lease.subnet for lease in leases}
        return self.apply(leases, [s for s in self._by_subnet if s not in wanted])

    def apply(
        self, leases: Iterable[Lease], removed: Iterable[IPv4Network]
    ) -> tuple[list[Lease], list[Lease]]:
        """One batch: the peers of ``removed`` go, then each of ``leases`` is added or
        replaces its subnet's peer; published at once. Returns what changed: (added or
        changed leases, removed leases); a lease equal to its subnet's peer (and of the
        same age) is no change."""
        edits: dict[int, dict[int, Peer | None]] = {}  # shift -> {masked net: peer or None}
        touched: set[str] = set()
        gone: list[Lease] = []
        for subnet in removed:
            peer = self._by_subnet.pop(subnet, None)
            if peer is not None:
                self._unindex(peer, edits, touched)
                gone.append(peer.lease)
        changed: dict[IPv4Network, Lease] = {}
        for lease in leases:
            old = self._by_subnet.get(lease.subnet)
            if old is not None and lease.same_as(old.lease):
                continue
            if old is not None:
                self._unindex(old, edits, touched)
            peer = self._by_subnet[lease.subnet] = self._peer(lease, old)
            self._by_ip.setdefault(peer.addr[0], {})[lease.subnet] = peer
            edits.setdefault(peer.shift, {})[peer.net >> peer.shift] = peer
            touched.add(peer.addr[0])
            changed[lease.subnet] = lease
        if edits:
            self._publish(edits, touched)
        return list(changed.values()), gone

    def _unindex(
        self, peer: Peer, edits: dict[int, dict[int, Peer | None]], touched: set[str]
    ) -> None:
        ip = peer.addr[0]
        of_ip = self._by_ip.get(ip, {})
        of_ip.pop(peer.lease.subnet, None)
        if not of_ip:
            self._by_ip.pop(ip, None)
        edits.setdefault(peer.shift, {})[peer.net >> peer.shift] = None
        touched.add(ip)

    def _peer(self, lease: Lease, old: Peer | None = None) -> Peer:
        return Peer(
            lease=lease,
            addr=(str(lease.public_ip), self.port),
            net=int(lease.subnet.network_address),
            shift=32 - lease.subnet.prefixlen,
            prefix=self.prefix_for(lease) if self.prefix_for else b"",
            stats=old.stats if old is not None else PeerStats(),
            name=str(lease.subnet),
        )

    def _publish(self, edits: dict[int, dict[int, Peer | None]], touched: set[str]) -> None:
        """Copies of what the batch touched, changed, then swapped in together."""
        routes = dict(self.routes)
        for shift, changes in edits.items():
            table = routes[shift].copy() if shift in routes else {}
            for key, peer in changes.items():
                if peer is None:
                    table.pop(key, None)
                else:
                    table[key] = peer
            if table:
                routes[shift] = table
            else:
                routes.pop(shift, None)
        # .copy(), not dict(): it stays a block copy when entries have been deleted.
        by_ip, sources = self._by_public_ip.copy(), self._sources.copy()
        senders = self.senders.copy()
        for ip in touched:
            of_ip = self._by_ip.get(ip)
            if not of_ip:
                by_ip.pop(ip, None)
                sources.pop(ip, None)
                senders.pop(int(IPv4Address(ip)), None)
                continue
            # Oldest first, so a public IP maps to its oldest lease (control.lease_rules).
            ordered = sorted(of_ip.values(), key=_age)
            by_ip[ip] = ordered[0]
            sources[ip] = tuple((p.net >> p.shift, p.shift) for p in ordered)
            senders[int(IPv4Address(ip))] = (sources[ip], ordered[0].stats)
        # Swap whole objects: the hot path never sees a half-built table.
        self.routes = sorted(routes.items())
        self._by_public_ip, self._sources, self.senders = by_ip, sources, senders

    def lookup(self, address: bytes | bytearray | memoryview) -> Peer | None:
        """The peer whose subnet holds the 4-byte ``address`` (longest prefix wins)."""
        value = int.from_bytes(address, "big")
        for shift, table in self.routes:
            peer = table.get(value >> shift)
            if peer is not None:
                return peer
        return None

    def by_public_ip(self, ip: str) -> Peer | None:
        """The peer that sends from public IP ``ip``: the oldest of its leases (lowest
        create revision, then key), whatever order they were learnt in."""
        return self._by_public_ip.get(ip)

    def sources_of(self, ip: str) -> tuple[tuple[int, int], ...]:
        """Where inner sources of datagrams from public IP ``ip`` may lie: ``(network >>
        shift, shift)`` of every lease that carries it (a node may hold several); empty
        for an unknown sender."""
        return self._sources.get(ip, ())
