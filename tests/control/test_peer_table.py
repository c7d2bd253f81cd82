"""Issue 19: a burst of lease changes is applied in batches (one per watch response), each
costing what it touches, and each gives exactly the table a from-scratch build gives.

The registry is simulated as etcd keeps it (a key's create revision is the revision of
its first put after it was absent); records are drawn from a small pool so that keys
collide, overlap (two keys for one /24, a /23 over two /24s without a config), carry our
own public IP, bad values or alias spellings. After every batch the incremental book and
peer table are compared with a new book and table built from the registry's content.
Dual stack too: there the IPv6 halves clash across IPv4 buckets (two leases of different
/24s with one IPv6 /64), which a batch must settle as a fresh build does. And IPv6 only
(EnableIPv4 false): every key starts ``0.0.0.0-0``, so a table keyed by the IPv4 subnet
would hold one peer for all of them; each valid lease must be a peer of its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from control.config import NetworkConfig, config_json, parse_config
from control.lease import Lease
from control.lease_rules import LeaseBook, Record
from control.peer_table import PeerTable

SUBNETS = "/coreos.com/network/subnets/"
CONFIG = parse_config(config_json(IPv4Network("10.244.0.0/16")))
OWN_IP = IPv4Address("192.0.2.1")
NAMES = [
    "10.244.1.0-24",
    "10.244.1.0-24&fc00::-64",  # a second key for the same /24
    "10.244.2.0-24",
    "10.244.3.0-24",
    "10.244.3.0-024",  # an alias spelling: rejected
    "10.244.2.0-23",  # over .2 and .3: valid only without a config
    "10.244.4.0-25",
    "10.245.0.0-24",  # outside the config's network
]
PUBLIC = ["192.0.2.2", "192.0.2.3", "192.0.2.4", str(OWN_IP), "127.0.0.1"]
DUAL_CONFIG = parse_config(
    {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10::/56"}
)
OWN_IPV6 = IPv6Address("2001:db8::1")
# The IPv6 half's PublicIPv6, by the same index as PUBLIC (ours, then not unicast).
PUBLIC6 = ["2001:db8::2", "2001:db8::3", "2001:db8::4", str(OWN_IPV6), "ff02::1"]
DUAL_NAMES = [
    "10.244.1.0-24&fd00:10:0:1::-64",
    "10.244.2.0-24&fd00:10:0:1::-64",  # another /24, the same IPv6 /64: a clash
    "10.244.2.0-24&fd00:10:0:2::-64",  # a second key for the same /24
    "10.244.3.0-24&fd00:10:0:3::-64",
    "10.244.4.0-24",  # no IPv6 half: a peer for IPv4 only
    "10.244.5.0-24&fd00:10:0:3::-64",
    "10.244.6.0-24&fd00:10:0:06::-64",  # an alias spelling of the IPv6 half: rejected
]
V6_ONLY_CONFIG = parse_config(
    {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10::/56"}
)
V6_ONLY_NAMES = [
    "0.0.0.0-0&fd00:10:0:1::-64",
    "0.0.0.0-0&fd00:10:0:2::-64",
    "0.0.0.0-0&fd00:10:0:3::-64",
    "0.0.0.0-0&fd00:10:0:4::-64",
    "0.0.0.0-0&fd00:10:0:2::-63",  # over :2 and :3 (not IPv6SubnetLen): rejected
    "10.244.1.0-24&fd00:10:0:5::-64",  # an IPv4 half in an IPv6-only network: rejected
    "0.0.0.0-0",  # no IPv6 half: rejected
    "0.0.0.0-0&fd00:10:0:04::-64",  # an alias spelling: rejected
]

# (name, public IP index or None for a broken value, backend type) or ("delete", name)
put = st.tuples(
    st.sampled_from(NAMES),
    st.one_of(st.none(), st.integers(0, len(PUBLIC) - 1)),
    st.sampled_from(["", "vxlan"]),
)
change = st.one_of(put, st.tuples(st.just("delete"), st.sampled_from(NAMES)))


class Registry:
    """Keys as etcd keeps them: value and create revision, one revision per change."""

    def __init__(self) -> None:
        self.revision = 0
        self.keys: dict[str, tuple[bytes, int]] = {}

    def record(self, name: str, public: int | None, backend: str) -> Record:
        self.revision += 1
        if public is None:
            value = b"{not json"
        else:
            public6 = PUBLIC6[public] if "&" in name else None
            # IPv6 only: PublicIP 0.0.0.0, as flanneld writes it (its ExtAddr is nil).
            public4 = "0.0.0.0" if name.startswith("0.0.0.0-0") else PUBLIC[public]
            fields: dict[str, Any] = {"PublicIP": public4, "PublicIPv6": public6}
            if backend:
                fields["BackendType"] = backend
            value = json.dumps(fields).encode()
        key = SUBNETS + name
        created = self.keys[key][1] if key in self.keys else self.revision
        self.keys[key] = (value, created)
        return Record(key, value, True, created)

    def delete(self, name: str) -> str:
        self.revision += 1
        self.keys.pop(SUBNETS + name, None)
        return SUBNETS + name

    def apply(self, item: tuple[Any, ...]) -> Record | str:
        return self.delete(item[1]) if item[0] == "delete" else self.record(*item)

    def records(self) -> list[Record]:
        return [Record(k, v, True, c) for k, (v, c) in self.keys.items()]


def leases_of(book: LeaseBook) -> list[tuple[Lease, int]]:
    return [(lease, lease.create_revision) for lease in book.valid()]


def same_table(a: PeerTable, b: PeerTable) -> None:
    """Everything the hot path and the trace read, equal (stats are per object)."""
    assert a.routes == b.routes
    assert a.senders.keys() == b.senders.keys()
    for ip, (sources, stats) in a.senders.items():
        assert sources == b.senders[ip][0]
        peer = a.by_public_ip(str(IPv4Address(ip)))
        assert peer is not None and stats is peer.stats
    assert sorted(a.peers(), key=lambda p: p.net) == sorted(b.peers(), key=lambda p: p.net)
    for peer in a.peers():
        ip = peer.addr[0]
        assert a.by_public_ip(ip) == b.by_public_ip(ip)
        assert a.sources_of(ip) == b.sources_of(ip)
    # The IPv6 halves (issue 20): the same routes and senders, and each dual-stack
    # lease's IPv6 subnet routed to its PublicIPv6 and sharing its counters.
    assert a.routes6 == b.routes6
    for peer in a.peers():
        lease = peer.lease
        if lease.ipv6_subnet is None or lease.public_ipv6 is None:
            continue
        ip6 = str(lease.public_ipv6)
        assert a.sources6_of(ip6) == b.sources6_of(ip6)
        assert (int(lease.ipv6_subnet.network_address) >> 64, 64) in a.sources6_of(ip6)
        half = a.lookup6(lease.ipv6_subnet.network_address.packed)
        assert half is not None and half.addr == (ip6, a.port) and half.lease == lease
        assert half.stats is peer.stats


@settings(max_examples=300, deadline=None)
@given(
    initial=st.lists(put, max_size=8),
    batches=st.lists(st.lists(change, min_size=1, max_size=6), min_size=1, max_size=6),
    with_config=st.booleans(),
    own=st.sampled_from([None, "10.244.1.0-24", "10.244.2.0-24"]),
)
def test_each_batch_gives_the_table_a_fresh_build_gives(
    initial: list[tuple[Any, ...]],
    batches: list[list[tuple[Any, ...]]],
    with_config: bool,
    own: str | None,
) -> None:
    config: NetworkConfig | None = CONFIG if with_config else None
    own_key = SUBNETS + own if own else None

    def book_of(records: list[Record]) -> LeaseBook:
        book = LeaseBook(config, own_key=own_key, own_ip=OWN_IP)
        book.reset(records)
        return book

    each_batch_as_fresh(book_of, initial, batches)


def each_batch_as_fresh(
    book_of: Callable[[list[Record]], LeaseBook],
    initial: list[tuple[Any, ...]],
    batches: list[list[tuple[Any, ...]]],
) -> None:
    """Each batch applied to a book (and its peer table) leaves them as a book built
    fresh from the registry (``book_of``) and its table."""
    registry = Registry()
    book = book_of([registry.record(*item) for item in initial])
    table = PeerTable(8285)
    table.replace_all(book.valid())
    for batch in batches:
        before = {lease.ident: lease for lease in book.valid()}
        changed, removed = book.apply([registry.apply(item) for item in batch])
        fresh = book_of(registry.records())
        assert leases_of(book) == leases_of(fresh)
        # The batch's net change, applied to what was valid before, is what is valid now.
        for lease in removed:
            del before[lease.ident]
        before.update((lease.ident, lease) for lease in changed)
        assert sorted(before.values(), key=lambda x: (x.ident.version, x.ident)) == book.valid()
        table.apply(changed, [lease.ident for lease in removed])
        rebuilt = PeerTable(8285)
        rebuilt.replace_all(fresh.valid())
        same_table(table, rebuilt)
        every_lease_is_a_peer(table, book.valid())


def every_lease_is_a_peer(table: PeerTable, valid: list[Lease]) -> None:
    """Each valid lease is one peer, routed in each family it has (and an IPv6-only one
    in IPv6 alone: nothing of it on the IPv4 side)."""
    assert len(table) == len(valid)
    for lease in valid:
        peer = table.get(lease.ident)
        assert peer is not None and peer.lease == lease
        if lease.has_ipv4:
            found = table.lookup(lease.subnet.network_address.packed)
            assert found is not None and found.lease == lease
        if lease.ipv6_subnet is not None and lease.public_ipv6 is not None:
            half = table.lookup6(lease.ipv6_subnet.network_address.packed)
            assert half is not None and half.lease == lease
    if all(not lease.has_ipv4 for lease in valid):
        assert table.routes == [] and table.senders == {}


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(change, min_size=1, max_size=8), min_size=1, max_size=8))
def test_a_published_table_is_never_changed_afterwards(batches: list[list[Any]]) -> None:
    """What a reader (the native drains keep it between wake-ups) holds stays whole: a
    batch changes copies and swaps them in, never the objects already published."""
    registry = Registry()
    book = LeaseBook(None, own_ip=OWN_IP)
    table = PeerTable(8285)
    for batch in batches:
        routes, senders, routes6 = table.routes, table.senders, table.routes6
        frozen = ([(shift, dict(t)) for shift, t in routes], dict(senders))
        frozen6 = [(shift, dict(t)) for shift, t in routes6]
        changed, removed = book.apply([registry.apply(item) for item in batch])
        table.apply(changed, [lease.ident for lease in removed])
        assert ([(shift, dict(t)) for shift, t in routes], dict(senders)) == frozen
        assert [(shift, dict(t)) for shift, t in routes6] == frozen6
        if changed or removed:
            assert table.routes is not routes and table.senders is not senders


def test_a_batch_of_changes_is_one_swap_and_untouched_peers_stay_the_same_objects() -> None:
    table = PeerTable(8285)
    leases = [
        Lease(IPv4Network(f"10.244.{i}.0/24"), IPv4Address(f"192.0.2.{i}"), create_revision=i)
        for i in range(2, 12)
    ]
    table.replace_all(leases)
    kept = table.get(leases[0].subnet)
    routes = table.routes
    moved = Lease(leases[1].subnet, IPv4Address("192.0.2.99"), create_revision=40)
    new = Lease(IPv4Network("10.244.50.0/24"), IPv4Address("192.0.2.50"), create_revision=41)
    changed, removed = table.apply([moved, new, leases[3]], [leases[2].subnet])
    assert changed == [moved, new] and removed == [leases[2]]  # leases[3] is unchanged
    assert table.routes is not routes
    assert table.get(leases[0].subnet) is kept
    assert table.by_public_ip("192.0.2.99") == table.get(moved.subnet)
    assert table.by_public_ip("192.0.2.3") is None and table.sources_of("192.0.2.4") == ()
    assert table.lookup(bytes([10, 244, 4, 9])) is None
    # Removing the last peer of a length leaves no empty route table behind.
    table.replace_all([])
    assert table.routes == [] and table.senders == {} and len(table) == 0


dual_put = st.tuples(
    st.sampled_from(DUAL_NAMES),
    st.one_of(st.none(), st.integers(0, len(PUBLIC) - 1)),
    st.sampled_from(["", "vxlan"]),
)
dual_change = st.one_of(dual_put, st.tuples(st.just("delete"), st.sampled_from(DUAL_NAMES)))


@settings(max_examples=300, deadline=None)
@example(  # an IPv6 subnet passing from one lease to another in one batch (a full run found it)
    initial=[("10.244.1.0-24&fd00:10:0:1::-64", None, "")],
    batches=[
        [("10.244.2.0-24&fd00:10:0:1::-64", 0, "")],
        [("10.244.1.0-24&fd00:10:0:1::-64", 0, ""), ("10.244.2.0-24&fd00:10:0:2::-64", 0, "")],
    ],
    own=None,
)
@given(
    initial=st.lists(dual_put, max_size=8),
    batches=st.lists(st.lists(dual_change, min_size=1, max_size=6), min_size=1, max_size=6),
    own=st.sampled_from([None, DUAL_NAMES[0], DUAL_NAMES[3]]),
)
def test_each_dual_stack_batch_gives_what_a_fresh_build_gives(
    initial: list[tuple[Any, ...]],
    batches: list[list[tuple[Any, ...]]],
    own: str | None,
) -> None:
    own_key = SUBNETS + own if own else None

    def book_of(records: list[Record]) -> LeaseBook:
        book = LeaseBook(DUAL_CONFIG, own_key=own_key, own_ip=OWN_IP, own_ipv6=OWN_IPV6)
        book.reset(records)
        return book

    each_batch_as_fresh(book_of, initial, batches)


def test_ipv6_halves_route_by_longest_prefix_and_go_with_their_lease() -> None:
    """lookup6 is a longest match over the peers' IPv6 subnets; a lease without an IPv6
    half is no IPv6 peer; removing or changing a lease takes its IPv6 half with it."""
    table = PeerTable(8472, prefix6_for=lambda lease: b"v6" + lease.subnet.network_address.packed)

    def dual(i: int, v6: str | None, create_revision: int) -> Lease:
        return Lease(
            IPv4Network(f"10.244.{i}.0/24"),
            IPv4Address(f"192.0.2.{i}"),
            ipv6_subnet=IPv6Network(v6) if v6 else None,
            public_ipv6=IPv6Address(f"2001:db8::{i}") if v6 else None,
            create_revision=create_revision,
        )

    wide, narrow, v4only = (
        dual(1, "fd00:10::/56", 1),
        dual(2, "fd00:10:0:7::/64", 2),
        dual(3, None, 3),
    )
    table.replace_all([wide, narrow, v4only])
    inside_narrow = IPv6Address("fd00:10:0:7::9").packed
    inside_wide = IPv6Address("fd00:10:0:8::9").packed
    peer = table.lookup6(inside_narrow)
    assert peer is not None and peer.addr == ("2001:db8::2", 8472)
    assert peer.prefix == b"v6" + narrow.subnet.network_address.packed
    peer = table.lookup6(inside_wide)
    assert peer is not None and peer.addr == ("2001:db8::1", 8472)
    assert table.lookup6(IPv6Address("fd00:11::1").packed) is None
    assert table.sources6_of("2001:db8::3") == ()
    assert table.by_public_ipv6("2001:db8::2") == table.lookup6(inside_narrow)
    table.apply([], [narrow.subnet])
    peer = table.lookup6(inside_narrow)
    assert peer is not None and peer.addr == ("2001:db8::1", 8472)
    assert table.sources6_of("2001:db8::2") == ()
    moved = replace(wide, public_ipv6=IPv6Address("2001:db8::99"), create_revision=9)
    table.apply([moved], [])
    peer = table.lookup6(inside_wide)
    assert peer is not None and peer.addr == ("2001:db8::99", 8472)
    assert table.sources6_of("2001:db8::1") == ()
    table.replace_all([])
    assert table.routes6 == [] and table.lookup6(inside_wide) is None


v6_only_put = st.tuples(
    st.sampled_from(V6_ONLY_NAMES),
    st.one_of(st.none(), st.integers(0, len(PUBLIC) - 1)),
    st.sampled_from(["", "vxlan"]),
)
v6_only_change = st.one_of(
    v6_only_put, st.tuples(st.just("delete"), st.sampled_from(V6_ONLY_NAMES))
)


@settings(max_examples=300, deadline=None)
@example(  # two IPv6-only leases: both keys start 0.0.0.0-0, both are peers
    initial=[("0.0.0.0-0&fd00:10:0:1::-64", 0, "vxlan"), ("0.0.0.0-0&fd00:10:0:2::-64", 1, "")],
    batches=[[("delete", "0.0.0.0-0&fd00:10:0:1::-64")]],
    own=None,
)
@given(
    initial=st.lists(v6_only_put, max_size=8),
    batches=st.lists(st.lists(v6_only_change, min_size=1, max_size=6), min_size=1, max_size=6),
    own=st.sampled_from([None, V6_ONLY_NAMES[0], V6_ONLY_NAMES[2]]),
)
def test_each_ipv6_only_batch_gives_what_a_fresh_build_gives(
    initial: list[tuple[Any, ...]],
    batches: list[list[tuple[Any, ...]]],
    own: str | None,
) -> None:
    """IPv6 only (EnableIPv4 false): leases keyed ``0.0.0.0-0&<IPv6 subnet>`` are peers
    by their lease, each routed by its IPv6 subnet, none on the IPv4 side."""
    own_key = SUBNETS + own if own else None

    def book_of(records: list[Record]) -> LeaseBook:
        book = LeaseBook(V6_ONLY_CONFIG, own_key=own_key, own_ip=OWN_IP, own_ipv6=OWN_IPV6)
        book.reset(records)
        return book

    each_batch_as_fresh(book_of, initial, batches)


def test_ipv6_only_leases_are_peers_in_ipv6_alone() -> None:
    """Two IPv6-only leases: two peers, named by their IPv6 subnets, sent to at their
    PublicIPv6, sharing one counter object per lease; removing one by its ident leaves
    the other."""
    table = PeerTable(8472)

    def v6_only(i: int) -> Lease:
        return Lease(
            IPv4Network("0.0.0.0/0"),
            IPv4Address(0),
            ipv6_subnet=IPv6Network(f"fd00:10:0:{i}::/64"),
            public_ipv6=IPv6Address(f"2001:db8::{i}"),
            create_revision=i,
        )

    first, second = v6_only(1), v6_only(2)
    changed, _ = table.replace_all([first, second])
    assert changed == [first, second] and len(table) == 2
    assert sorted(p.name for p in table.peers()) == ["fd00:10:0:1::/64", "fd00:10:0:2::/64"]
    assert table.routes == [] and table.senders == {} and table.lookup(bytes(4)) is None
    peer = table.lookup6(IPv6Address("fd00:10:0:2::5").packed)
    assert peer is not None and peer.addr == ("2001:db8::2", 8472)
    assert peer is table.get(second.ident)
    assert table.sources6_of("2001:db8::1") == ((int(IPv6Address("fd00:10:0:1::")) >> 64, 64),)
    _, removed = table.apply([], [first.ident])
    assert removed == [first] and len(table) == 1
    assert table.lookup6(IPv6Address("fd00:10:0:1::5").packed) is None
    assert table.lookup6(IPv6Address("fd00:10:0:2::5").packed) is peer
