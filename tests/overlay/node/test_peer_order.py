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
from overlay.node.peer_order import SMALL_BATCH, Busiest, PeerOrder, rebuilt

# Subnets sharing network addresses with different lengths (the order's tie-break),
# enough of them for a batch to take either way (bisect, or a re-sort).
SUBNETS = [
    IPv4Network(f"10.{a}.{b}.0/{length}")
    for a in range(3)
    for b in (0, 16, 32, 48)
    for length in (20, 24)
] + [IPv4Network(f"10.9.{b}.0/24") for b in range(SMALL_BATCH + 8)]

# (subnet index, public IP's last byte or None to remove it); a batch of a few changes
# (inserted one by one) or of more than SMALL_BATCH (a re-sort)
change = st.tuples(st.integers(0, len(SUBNETS) - 1), st.one_of(st.none(), st.integers(1, 4)))
batch = st.one_of(
    st.lists(change, max_size=6),
    st.lists(change, min_size=SMALL_BATCH + 1, max_size=len(SUBNETS), unique_by=lambda c: c[0]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(batch, min_size=1, max_size=8))
def test_the_order_kept_by_batches_is_the_order_made_from_scratch(
    batches: list[list[tuple[int, int | None]]],
) -> None:
    table, order = PeerTable(8285), PeerOrder()
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
