"""The table the dataplane reads: destination address -> peer, and public IP -> peer.

Lookups are dict probes keyed by the masked destination (all leases of a network share
SubnetLen, so there is usually one probe), not flannel's linear first-match scan. The
native drains (encap/csrc/) read ``routes`` and ``senders`` directly, so a wake-up
routes and attributes its packets without calling back into Python.

A dual-stack lease (EnableIPv6) is a peer in both families: its IPv6 half (``routes6``,
``lookup6``, ``sources6_of``, keyed by its IPv6 subnet and sent to at its PublicIPv6) is
indexed in the same batches and published in the same swap as the IPv4 side. Peers are
keyed by their lease's ident (``Lease.ident``), so an IPv6-only lease (``0.0.0.0-0&...``,
EnableIPv4 false) is a peer too, in IPv6 alone: it adds nothing to the IPv4 side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from control.lease import Lease, LeaseId

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
    shift: int  # address bits - prefix length (32 - prefix length for IPv4, 128 - for IPv6)
    # Encapsulation bytes put before every packet to this peer (VXLAN + Ethernet header),
    # computed once here instead of per packet; empty for flannel's udp framing.
    prefix: bytes = b""
    stats: PeerStats = field(default_factory=PeerStats, compare=False)
    name: str = ""  # the subnet as text (``10.244.3.0/24``): how status and metrics name it

    def owns(self, address: bytes) -> bool:
        """Whether an address of the subnet's family (4 or 16 bytes) lies inside it."""
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

    def __init__(
        self,
        port: int,
        prefix_for: Callable[[Lease], bytes] | None = None,
        prefix6_for: Callable[[Lease], bytes] | None = None,
    ) -> None:
        self.port = port
        self.prefix_for = prefix_for
        self.prefix6_for = prefix6_for  # the IPv6 half's prefix (vxlan: BackendV6Data's MAC)
        # Each lease's peer, by the lease's ident: its IPv4 side, or for an IPv6-only
        # lease (``0.0.0.0-0&...``, no IPv4 half) its IPv6 side.
        self._by_id: dict[LeaseId, Peer] = {}
        # Public IP -> its peers by lease (a node may hold several leases): the index a
        # batch recomputes the touched public IPs' entries from.
        self._by_ip: dict[str, dict[LeaseId, Peer]] = {}
        # [(shift, {masked destination: peer})], longest prefix first.
        self.routes: list[tuple[int, dict[int, Peer]]] = []
        self._by_public_ip: dict[str, Peer] = {}
        self._sources: dict[str, Sources] = {}
        # Public IP as an int -> (sources_of(ip), by_public_ip(ip).stats): what a receive
        # from that address needs, keyed by what C has at hand (the sockaddr).
        self.senders: dict[int, tuple[Sources, PeerStats]] = {}
        # The IPv6 halves of dual-stack and IPv6-only leases, by the lease's ident, and
        # what the hot path reads of them: [(shift, {masked destination: peer})] longest
        # prefix first, and PublicIPv6 -> ((network >> shift, shift), ...).
        self._v6: dict[LeaseId, Peer] = {}
        self._by_ip6: dict[str, dict[LeaseId, Peer]] = {}
        self.routes6: list[tuple[int, dict[int, Peer]]] = []
        self._sources6: dict[str, Sources] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, ident: object) -> bool:
        return ident in self._by_id

    def peers(self) -> list[Peer]:
        return list(self._by_id.values())

    def get(self, ident: LeaseId) -> Peer | None:
        """The peer of the lease known by ``ident`` (``Lease.ident``)."""
        return self._by_id.get(ident)

    def upsert(self, lease: Lease) -> bool:
        """Add or replace the peer for ``lease.ident``; True when anything changed."""
        return bool(self.apply([lease], [])[0])

    def remove(self, ident: LeaseId) -> Peer | None:
        peer = self._by_id.get(ident)
        self.apply([], [ident])
        return peer

    def replace_all(self, leases: list[Lease]) -> tuple[list[Lease], list[Lease]]:
        """Make the table hold exactly ``leases``; return (added or changed, removed).

        Compares content, not only subnets, so a changed PublicIP or VtepMAC is applied.
        """
        wanted = {lease.ident for lease in leases}
        return self.apply(leases, [i for i in self._by_id if i not in wanted])

    def apply(
        self, leases: Iterable[Lease], removed: Iterable[LeaseId]
    ) -> tuple[list[Lease], list[Lease]]:
        """One batch: the peers of ``removed`` go, then each of ``leases`` is added or
        replaces its lease's peer; published at once. Returns what changed: (added or
        changed leases, removed leases); a lease equal to its peer's (and of the same
        age) is no change. An IPv6-only lease is a peer in IPv6 alone."""
        edits: dict[int, dict[int, Peer | None]] = {}  # shift -> {masked net: peer or None}
        edits6: dict[int, dict[int, Peer | None]] = {}
        touched: set[str] = set()
        touched6: set[str] = set()
        gone: list[Lease] = []
        for ident in removed:
            peer = self._by_id.pop(ident, None)
            if peer is not None:
                self._unindex(ident, peer, edits, touched)
                self._unindex6(ident, edits6, touched6)
                gone.append(peer.lease)
        # Every old entry out before any new one goes in: an IPv6 subnet may pass from
        # one lease to another within a batch, and its removal must not undo its addition.
        changed = {lease.ident: lease for lease in leases}
        stats: dict[LeaseId, PeerStats] = {}
        for ident, lease in list(changed.items()):
            old = self._by_id.get(ident)
            if old is None:
                continue
            if lease.same_as(old.lease):
                del changed[ident]
                continue
            stats[ident] = old.stats
            self._unindex(ident, old, edits, touched)
            self._unindex6(ident, edits6, touched6)
        added: list[Lease] = []
        for ident, lease in changed.items():
            peer6 = self._peer6(lease, stats.get(ident) or PeerStats())
            if lease.has_ipv4:
                peer = self._peer(lease, peer6.stats if peer6 else stats.get(ident))
                self._by_ip.setdefault(peer.addr[0], {})[ident] = peer
                edits.setdefault(peer.shift, {})[peer.net >> peer.shift] = peer
                touched.add(peer.addr[0])
            elif peer6 is not None:
                peer = peer6
            else:  # IPv6 only but no IPv6 half: nothing to route it by (lease_rules refuse it)
                if self._by_id.pop(ident, None) is not None:
                    gone.append(lease)
                continue
            self._by_id[ident] = peer
            added.append(lease)
            if peer6 is not None:
                self._v6[ident] = peer6
                self._by_ip6.setdefault(peer6.addr[0], {})[ident] = peer6
                edits6.setdefault(peer6.shift, {})[peer6.net >> peer6.shift] = peer6
                touched6.add(peer6.addr[0])
        if edits or edits6:
            self._publish(edits, touched, edits6, touched6)
        return added, gone

    def _unindex(
        self,
        ident: LeaseId,
        peer: Peer,
        edits: dict[int, dict[int, Peer | None]],
        touched: set[str],
    ) -> None:
        """The IPv4 side of ``peer``'s lease, if it has one, out of the indexes."""
        if not peer.lease.has_ipv4:
            return
        ip = peer.addr[0]
        of_ip = self._by_ip.get(ip, {})
        of_ip.pop(ident, None)
        if not of_ip:
            self._by_ip.pop(ip, None)
        edits.setdefault(peer.shift, {})[peer.net >> peer.shift] = None
        touched.add(ip)

    def _unindex6(
        self, ident: LeaseId, edits: dict[int, dict[int, Peer | None]], touched: set[str]
    ) -> None:
        """The IPv6 half of the lease ``ident``, if it had one, out of the indexes."""
        peer = self._v6.pop(ident, None)
        if peer is None:
            return
        ip = peer.addr[0]
        of_ip = self._by_ip6.get(ip, {})
        of_ip.pop(ident, None)
        if not of_ip:
            self._by_ip6.pop(ip, None)
        edits.setdefault(peer.shift, {})[peer.net >> peer.shift] = None
        touched.add(ip)

    def _peer6(self, lease: Lease, stats: PeerStats) -> Peer | None:
        """The IPv6 half of a dual-stack or IPv6-only ``lease`` (None without one); it
        shares the lease's traffic counters."""
        if lease.ipv6_subnet is None or lease.public_ipv6 is None:
            return None
        return Peer(
            lease=lease,
            addr=(str(lease.public_ipv6), self.port),
            net=int(lease.ipv6_subnet.network_address),
            shift=128 - lease.ipv6_subnet.prefixlen,
            prefix=self.prefix6_for(lease) if self.prefix6_for else b"",
            stats=stats,
            name=str(lease.ipv6_subnet),
        )

    def _peer(self, lease: Lease, stats: PeerStats | None = None) -> Peer:
        return Peer(
            lease=lease,
            addr=(str(lease.public_ip), self.port),
            net=int(lease.subnet.network_address),
            shift=32 - lease.subnet.prefixlen,
            prefix=self.prefix_for(lease) if self.prefix_for else b"",
            stats=stats if stats is not None else PeerStats(),
            name=str(lease.subnet),
        )

    def _publish(
        self,
        edits: dict[int, dict[int, Peer | None]],
        touched: set[str],
        edits6: dict[int, dict[int, Peer | None]],
        touched6: set[str],
    ) -> None:
        """Copies of what the batch touched, changed, then swapped in together."""
        routes = _edited(self.routes, edits)
        routes6 = _edited(self.routes6, edits6) if edits6 else self.routes6
        sources6 = self._sources6.copy() if touched6 else self._sources6
        for ip in touched6:
            of_ip6 = self._by_ip6.get(ip)
            if of_ip6:
                ordered6 = sorted(of_ip6.values(), key=_age)
                sources6[ip] = tuple((p.net >> p.shift, p.shift) for p in ordered6)
            else:
                sources6.pop(ip, None)
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
        self.routes = routes
        self._by_public_ip, self._sources, self.senders = by_ip, sources, senders
        self.routes6, self._sources6 = routes6, sources6

    def lookup(self, address: bytes | bytearray | memoryview) -> Peer | None:
        """The peer whose subnet holds the 4-byte ``address`` (longest prefix wins)."""
        value = int.from_bytes(address, "big")
        for shift, table in self.routes:
            peer = table.get(value >> shift)
            if peer is not None:
                return peer
        return None

    def lookup6(self, address: bytes | bytearray | memoryview) -> Peer | None:
        """The IPv6 half whose IPv6 subnet holds the 16-byte ``address`` (longest prefix)."""
        value = int.from_bytes(address, "big")
        for shift, table in self.routes6:
            peer = table.get(value >> shift)
            if peer is not None:
                return peer
        return None

    def sources6_of(self, ip: str) -> Sources:
        """Where inner IPv6 sources of datagrams from PublicIPv6 ``ip`` (as the socket
        gives it: compressed, lower case) may lie; empty for an unknown sender."""
        return self._sources6.get(ip, ())

    def by_public_ipv6(self, ip: str) -> Peer | None:
        """The IPv6 half of a lease whose PublicIPv6 is ``ip`` (any of them: they share
        the node's counters only through their own lease)."""
        of_ip = self._by_ip6.get(ip)
        return min(of_ip.values(), key=_age) if of_ip else None

    def by_public_ip(self, ip: str) -> Peer | None:
        """The peer that sends from public IP ``ip``: the oldest of its leases (lowest
        create revision, then key), whatever order they were learnt in."""
        return self._by_public_ip.get(ip)

    def sources_of(self, ip: str) -> tuple[tuple[int, int], ...]:
        """Where inner sources of datagrams from public IP ``ip`` may lie: ``(network >>
        shift, shift)`` of every lease that carries it (a node may hold several); empty
        for an unknown sender."""
        return self._sources.get(ip, ())


def _edited(
    routes: list[tuple[int, dict[int, Peer]]], edits: dict[int, dict[int, Peer | None]]
) -> list[tuple[int, dict[int, Peer]]]:
    """``routes`` with ``edits`` applied to copies of the tables they touch."""
    tables = dict(routes)
    for shift, changes in edits.items():
        table = tables[shift].copy() if shift in tables else {}
        for key, peer in changes.items():
            if peer is None:
                table.pop(key, None)
            else:
                table[key] = peer
        if table:
            tables[shift] = table
        else:
            tables.pop(shift, None)
    return sorted(tables.items())
