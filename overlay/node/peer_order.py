"""The peers in subnet order and the busiest of them: what a status answer and a /metrics
page walk, a slice at a time, without sorting every peer on the event loop.

``PeerOrder`` is kept beside the peer table (``control.peer_table`` stays as the
dataplane needs it), batch by batch, from what each batch changed: a status answer
takes the list as it is, instead of sorting tens of thousands of peers in one piece of
the loop (~0.4 ms at 10,000, ~3 ms at 50,000). ``Busiest`` picks the ``limit`` peers
with most traffic one peer at a time with a bounded heap, so the walk can stop and
give the loop its turn anywhere.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Iterable

from control.lease import Lease, LeaseId
from control.peer_table import Peer, PeerTable

# A batch touching more subnets than this re-sorts (O(n log n) in C, mostly sorted
# already) instead of inserting each (a list insert moves every later entry).
SMALL_BATCH = 32


def order_key(ident: LeaseId) -> int:
    """Leases by subnet (IPv4 before IPv6: an IPv6-only lease is known by its IPv6
    subnet), network address, then prefix length: the order status rows have."""
    return (ident.version == 6) << 136 | int(ident.network_address) << 8 | ident.prefixlen


class PeerOrder:
    """The peer table's peers sorted by subnet, kept up to date by ``apply`` after each
    of the table's batches. Copy-on-write: ``peers`` is a new list after a batch, never
    changed in place, so an answer built over several turns of the loop walks the list
    it started with."""

    def __init__(self, small_batch: int = SMALL_BATCH) -> None:
        self.small_batch = small_batch
        self.peers: list[Peer] = []
        self._keys: list[int] = []  # order_key of each of ``peers``

    def apply(self, table: PeerTable, changed: Iterable[Lease], removed: Iterable[Lease]) -> None:
        """Follow one batch of ``table``'s: the subnets it changed or removed take what
        the table holds for them now (a peer, or nothing)."""
        touched = {lease.ident for lease in changed} | {lease.ident for lease in removed}
        if not touched:  # no change (a renewal, a listing of the same leases): the same list
            return
        if len(touched) > self.small_batch:
            self._resort(table, touched)
            return
        keys, peers = self._keys.copy(), self.peers.copy()
        for ident in touched:
            key = order_key(ident)
            at = bisect_left(keys, key)
            present = at < len(keys) and keys[at] == key
            peer = table.get(ident)
            if peer is None:
                if present:
                    del keys[at], peers[at]
            elif present:
                peers[at] = peer  # an edited lease: the table's new Peer
            else:
                keys.insert(at, key)
                peers.insert(at, peer)
        self._keys, self.peers = keys, peers

    def _resort(self, table: PeerTable, touched: set[LeaseId]) -> None:
        by_key = dict(zip(self._keys, self.peers, strict=True))
        for ident in touched:
            peer = table.get(ident)
            if peer is None:
                by_key.pop(order_key(ident), None)
            else:
                by_key[order_key(ident)] = peer
        keys = sorted(by_key)
        self._keys, self.peers = keys, [by_key[key] for key in keys]


def rebuilt(table: PeerTable) -> list[Peer]:
    """What ``PeerOrder.peers`` holds, made from scratch (the tests' reference)."""
    return sorted(table.peers(), key=lambda peer: order_key(peer.lease.ident))


class Busiest:
    """The ``limit`` peers with most traffic among those ``offer``ed, in the order they
    were offered; of equal traffic, the first offered (as ``heapq.nlargest``). One peer
    costs a comparison with the least of those kept, so the walk over every peer can be
    cut anywhere into slices."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._heap: list[tuple[float, int, Peer]] = []  # (traffic, -position, peer)
        self._offered = 0

    def offer(self, peer: Peer, traffic: float) -> None:
        entry = (traffic, -self._offered, peer)
        self._offered += 1
        if self.limit <= 0:
            return
        if len(self._heap) < self.limit:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def chosen(self) -> list[Peer]:
        return [peer for _, _, peer in sorted(self._heap, key=lambda e: -e[1])]
