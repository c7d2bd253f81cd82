"""Issue 19: the status answer's rows kept between answers (``PeerRows``) are byte for
byte what a dict per peer encoded with ``json.dumps`` gives, for any peers, counters and
workers' reports; a kept row never outlives what it shows (a counter, a lease, a removed
or new peer all show in the next answer); and ``BusiestWalk`` picks what offering every
peer to ``Busiest`` picks."""

from __future__ import annotations

import heapq
import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from hypothesis import given, settings
from hypothesis import strategies as st

from control.lease import Lease
from control.peer_table import Peer, PeerTable
from overlay.node.peer_order import Busiest, PeerOrder
from overlay.node.peer_rows import BusiestWalk, PeerRows, Reported, row, traffic
from overlay.observe.slices import STEP

NOW, WALL = 5000.0, 1_765_000_000.0
CLOCK = (NOW, WALL)


def _clock() -> tuple[float, float]:
    return CLOCK


def _lease(i: int, ip: int = 1, v6: bool = False) -> Lease:
    if not v6:
        return Lease(IPv4Network(f"10.{i >> 8}.{i & 255}.0/24"), IPv4Address(f"198.18.0.{ip}"))
    return Lease(
        IPv4Network(f"10.{i >> 8}.{i & 255}.0/24"),
        IPv4Address(f"198.18.0.{ip}"),
        ipv6_subnet=IPv6Network(f"fd00:{i}::/64"),
        public_ipv6=IPv6Address(f"2001:db8::{ip}"),
    )


def _order(leases: list[Lease]) -> tuple[PeerTable, PeerOrder]:
    table, order = PeerTable(8285), PeerOrder()
    order.apply(table, *table.apply(leases, []))
    return table, order


def _answer(kept: PeerRows, peers: list[Peer], reported: Reported, counted: bool) -> str:
    """All rows as the status socket asks for them: STEP peers at a time, one walk."""
    kept.begin(len(peers))
    pieces = [
        kept.encode(peers, start, min(start + STEP, len(peers)), reported, counted)
        for start in range(0, len(peers), STEP)
    ]
    kept.end()
    return ", ".join(pieces)


def _reference(peers: list[Peer], reported: Reported, counted: bool) -> str:
    return json.dumps([row(p, reported, counted, NOW, WALL) for p in peers])[1:-1]


counts = st.integers(0, 2**40)
moments = st.one_of(st.just(0.0), st.floats(1.0, NOW, allow_nan=False))
stats = st.tuples(counts, counts, counts, counts, moments, moments)
idle = st.just((0, 0, 0, 0, 0.0, 0.0))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.one_of(idle, idle, stats)), min_size=1, max_size=70),
    st.lists(st.dictionaries(st.integers(0, 69), st.lists(counts, min_size=6, max_size=6))),
    st.booleans(),
)
def test_kept_rows_are_the_rows_json_dumps_makes(
    peers_spec: list[tuple[bool, tuple[int, int, int, int, float, float]]],
    reports: list[dict[int, list[int]]],
    counted: bool,
) -> None:
    _, order = _order([_lease(i, 1 + i % 200, v6) for i, (v6, _) in enumerate(peers_spec)])
    peers = order.peers
    for peer, (_, (txp, txb, rxp, rxb, ltx, lrx)) in zip(peers, peers_spec, strict=True):
        s = peer.stats
        s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes, s.last_tx, s.last_rx = (
            txp,
            txb,
            rxp,
            rxb,
            ltx,
            lrx,
        )
    reported: Reported = [
        {peers[i].name: [float(n) for n in v] for i, v in r.items() if i < len(peers)}
        for r in reports
    ]
    kept = PeerRows(_clock)
    for _ in range(2):  # made, then taken from what was kept
        assert _answer(kept, peers, reported, counted) == _reference(peers, reported, counted)


def test_a_changed_counter_shows_in_the_next_answer() -> None:
    _, order = _order([_lease(i) for i in range(3 * STEP)])
    kept = PeerRows(_clock)
    first = _answer(kept, order.peers, [], True)
    assert first == _answer(kept, order.peers, [], True)  # kept: the same text
    for at in (0, STEP + 3, 3 * STEP - 1):  # in each slice, an idle peer sends or receives
        s = order.peers[at].stats
        s.tx_packets, s.tx_bytes, s.last_tx = 2, 2800, NOW - 1.5
        assert _answer(kept, order.peers, [], True) == _reference(order.peers, [], True)
        s.rx_packets, s.rx_bytes, s.last_rx = 1, 100, NOW - 0.5
        assert _answer(kept, order.peers, [], True) == _reference(order.peers, [], True)
    (changed,) = (r for r in json.loads(f"[{_answer(kept, order.peers, [], True)}]")[:1])
    assert changed["rx_bytes"] == 100 and changed["last_tx_s"] == 1.5


def test_an_edited_lease_a_removed_and_a_new_peer_show_in_the_next_answer() -> None:
    table, order = _order([_lease(i) for i in range(3 * STEP)])
    kept = PeerRows(_clock)
    _answer(kept, order.peers, [], True)
    edited, removed, new = _lease(STEP + 1, ip=99), _lease(2 * STEP), _lease(5 * STEP)
    order.apply(table, *table.apply([edited, new], [removed.ident]))
    answer = json.loads(f"[{_answer(kept, order.peers, [], True)}]")
    assert answer == json.loads(f"[{_reference(order.peers, [], True)}]")
    by_subnet = {r["subnet"]: r for r in answer}
    assert by_subnet[str(edited.subnet)]["public_ip"] == "198.18.0.99"
    assert str(removed.subnet) not in by_subnet
    assert str(new.subnet) in by_subnet and len(answer) == 3 * STEP


def test_the_rows_of_removed_peers_are_dropped_by_a_later_walk() -> None:
    table, order = _order([_lease(i) for i in range(4 * STEP)])
    kept = PeerRows(_clock)
    _answer(kept, order.peers, [], True)
    assert len(kept) == 4 * STEP
    order.apply(table, *table.apply([], [_lease(i).ident for i in range(2 * STEP)]))
    _answer(kept, order.peers, [], True)
    assert len(kept) == 2 * STEP
    assert _answer(kept, order.peers, [], True) == _reference(order.peers, [], True)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.just(0), st.just(0), st.integers(0, 9)), max_size=60),
    st.integers(0, 70),
    st.booleans(),
)
def test_the_busiest_walk_picks_what_offering_every_peer_picks(
    traffic_of: list[int], limit: int, with_report: bool
) -> None:
    _, order = _order([_lease(i) for i in range(len(traffic_of))])
    peers = order.peers
    for peer, t in zip(peers, traffic_of, strict=True):
        peer.stats.tx_bytes = t
    reported: Reported = [{peers[0].name: [0, 5, 0, 0, 0, 0]}] if with_report and peers else []
    every = Busiest(limit)
    for peer in peers:
        every.offer(peer, traffic(peer, reported))
    walk = BusiestWalk(reported, limit)
    for start in range(0, len(peers), 7):  # in slices, as the daemon walks
        walk.walk(peers[start : start + 7])
    assert walk.chosen() == every.chosen()
    expected = heapq.nlargest(limit, peers, key=lambda p: traffic(p, reported))
    assert {p.name for p in walk.chosen()} == {p.name for p in expected}


def test_a_batch_that_changes_nothing_keeps_the_list_and_its_kept_slices() -> None:
    table, order = _order([_lease(i) for i in range(2 * STEP)])
    before = order.peers
    order.apply(table, *table.apply([_lease(3)], []))  # a renewal: the same lease
    assert order.peers is before
