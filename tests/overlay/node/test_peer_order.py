"""Issue 19: the peers in subnet order are kept batch by batch beside the peer table
(``PeerOrder``), and the busiest are picked one peer at a time (``Busiest``); each must
give exactly what is made from scratch, after any sequence of changes."""

from __future__ import annotations

import heapq
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from control.lease import Lease
from control.peer_table import PeerTable
from overlay.node.peer_order import Busiest, PeerOrder, rebuilt

SMALL_BATCH = 4  # the test's PeerOrder re-sorts beyond this (the daemon's: beyond 32)
# Subnets sharing network addresses with different lengths (the order's tie-break).
SUBNETS = [
    IPv4Network(f"10.{a}.{b}.0/{n}") for a in range(2) for b in (0, 16, 32) for n in (20, 24)
]
# (subnet index, public IP's last byte or None to remove it); a batch of a few changes
# (inserted one by one) or of more than SMALL_BATCH (a re-sort)
change = st.tuples(st.integers(0, len(SUBNETS) - 1), st.one_of(st.none(), st.integers(1, 3)))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(change, max_size=2 * SMALL_BATCH + 2), min_size=1, max_size=8))
def test_the_order_kept_by_batches_is_the_order_made_from_scratch(
    batches: list[list[tuple[int, int | None]]],
) -> None:
    table, order = PeerTable(8285), PeerOrder(SMALL_BATCH)
    published: list[tuple[list[object], list[object]]] = []
    for changes in batches:
        upserts = [
            Lease(SUBNETS[i], IPv4Address(f"192.0.2.{ip}")) for i, ip in changes if ip is not None
        ]
        removals = [SUBNETS[i] for i, ip in changes if ip is None]
        order.apply(table, *table.apply(upserts, removals))
        assert [p.name for p in order.peers] == [p.name for p in rebuilt(table)]
        # The table's own Peer objects (an edited lease's new one, with its counters).
        assert all(p is q for p, q in zip(order.peers, rebuilt(table), strict=True))
        published.append((order.peers, list(order.peers)))
    # Copy-on-write: a list once handed out (to an answer being built) never changes.
    for handed_out, as_it_was in published:
        assert handed_out == as_it_was


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40), st.integers(0, 45))
def test_the_busiest_are_those_nlargest_picks(traffic: list[int], limit: int) -> None:
    table = PeerTable(8285)
    table.apply(
        [
            Lease(IPv4Network(f"10.0.{i}.0/24"), IPv4Address("192.0.2.1"))
            for i in range(len(traffic))
        ],
        [],
    )
    peers = rebuilt(table)
    for peer, sent in zip(peers, traffic, strict=True):
        peer.stats.tx_bytes = sent
    busiest = Busiest(limit)
    for peer in peers:
        busiest.offer(peer, peer.stats.tx_bytes)
    wanted = heapq.nlargest(limit, peers, key=lambda p: p.stats.tx_bytes)
    # The same peers (ties: the first offered), in the order they were offered.
    assert busiest.chosen() == [p for p in peers if p in wanted]
    assert len(busiest.chosen()) == min(limit, len(peers))
