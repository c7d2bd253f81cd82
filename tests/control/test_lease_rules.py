"""Issue 10 item 3: registry data is validated before it becomes a peer.

The rules (control/lease_rules.py) on their own, the peer table's view of a public IP
with several leases, and the subnet manager's watch over a real file registry: a hostile
record is one warning with its key (never its value), the older of two overlapping
leases wins, and the newer becomes valid when the older goes.
"""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from control.config import config_json, parse_config
from control.file_registry import FileRegistry
from control.lease import Lease
from control.lease_rules import LeaseBook, Record, lease_problem
from control.peer_table import PeerTable
from control.subnet_manager import SubnetManager
from tests.helpers.watching import Recorder, wait_until

NETWORK = IPv4Network("10.244.0.0/16")
CONFIG = parse_config(config_json(NETWORK))
SUBNETS = "/coreos.com/network/subnets/"
OWN_IP = IPv4Address("192.0.2.1")
TTL = 24 * 3600


def value(public_ip: str, **extra: Any) -> bytes:
    return json.dumps({"PublicIP": public_ip, "PublicIPv6": None, **extra}).encode()


def record(name: str, public_ip: str, revision: int, **extra: Any) -> Record:
    return Record(f"{SUBNETS}{name}", value(public_ip, **extra), True, revision)


HUGE = "9" * 1_400_000  # a 1.4 MB value, as in the issue

# (case, key name, value): each must be rejected, one warning naming the key.
REJECTED = [
    ("outside-network", "10.99.3.0-24", value("192.0.2.3")),
    ("wrong-length-25", "10.244.3.0-25", value("192.0.2.3")),
    ("wrong-length-23", "10.244.2.0-23", value("192.0.2.3")),
    ("whole-network", "10.244.0.0-16", value("192.0.2.3")),
    ("key-alias", "10.244.3.0-024", value("192.0.2.3")),
    ("public-ip-zero", "10.244.3.0-24", value("0.0.0.0")),
    ("public-ip-loopback", "10.244.3.0-24", value("127.0.0.1")),
    ("public-ip-broadcast", "10.244.3.0-24", value("255.255.255.255")),
    ("public-ip-multicast", "10.244.3.0-24", value("224.0.0.251")),
    ("public-ip-class-e", "10.244.3.0-24", value("240.0.0.1")),
    ("public-ip-ours", "10.244.3.0-24", value(str(OWN_IP))),
    ("public-ip-huge", "10.244.3.0-24", value(HUGE)),
    ("not-json", "10.244.3.0-24", b"\xff\xfe" + HUGE.encode()),
    ("not-a-key", "x" * 5000, value("192.0.2.3")),
]


@pytest.mark.parametrize(("name", "raw"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_each_invalid_record_is_rejected_once_with_its_key(name: str, raw: bytes) -> None:
    book = LeaseBook(CONFIG, own_key=f"{SUBNETS}10.244.1.0-24", own_ip=OWN_IP)
    rec = Record(f"{SUBNETS}{name}", raw, True, 7)
    assert book.reset([rec]) == ([], [])
    assert book.valid() == []
    (rejection,) = book.take_rejections()
    assert f"{SUBNETS}{name}"[:60] in rejection.key
    text = f"{rejection.key} {rejection.reason}"
    assert len(text) < 400, text  # bounded, whatever the record's size
    assert HUGE[:200] not in text
    # The same record again (a re-list, a repeated put): no second report.
    book.reset([rec])
    book.put(rec)
    assert book.take_rejections() == []


def test_before_our_key_is_known_our_own_leases_are_no_peer_and_no_warning() -> None:
    book = LeaseBook(CONFIG, own_ip=OWN_IP)
    assert book.reset([record("10.244.3.0-24", str(OWN_IP), 3)]) == ([], [])
    assert book.take_rejections() == []


def test_link_local_public_ip_and_a_reservation_are_accepted() -> None:
    book = LeaseBook(CONFIG, own_ip=OWN_IP)
    changed, removed = book.reset(
        [
            record("10.244.3.0-24", "169.254.10.3", 5),
            Record(f"{SUBNETS}10.244.4.0-24", value("192.0.2.4"), False, 6),
        ]
    )
    assert {lease.subnet for lease in changed} == {
        IPv4Network("10.244.3.0/24"),
        IPv4Network("10.244.4.0/24"),
    }
    assert removed == [] and book.take_rejections() == []


def test_lease_problem_without_a_config_still_checks_the_public_ip() -> None:
    lease = Lease(IPv4Network("10.0.0.0/8"), IPv4Address("127.0.0.1"))
    assert "loopback" in (lease_problem(lease, None) or "")
    assert lease_problem(Lease(IPv4Network("10.0.0.0/8"), IPv4Address("192.0.2.9")), None) is None


def test_older_of_two_overlapping_leases_wins_then_the_newer_takes_over() -> None:
    """Two keys for one /24 (the dual-stack form is a distinct key for the same IPv4
    subnet): the lower create revision wins whatever order they arrive in."""
    old = record("10.244.3.0-24&fc00::-64", "192.0.2.3", 10)
    new = record("10.244.3.0-24", "192.0.2.33", 20)
    for order in ([old, new], [new, old]):
        book = LeaseBook(CONFIG, own_ip=OWN_IP)
        for rec in order:
            book.put(rec)
        (lease,) = book.valid()
        assert lease.public_ip == IPv4Address("192.0.2.3")
        (rejection,) = book.take_rejections()
        assert "overlaps an older lease" in rejection.reason and "10.244.3.0-24" in rejection.key
    # The older goes: the newer becomes valid, reported as a change of the subnet's peer.
    changed, removed = book.delete(old.key)
    assert [lease.public_ip for lease in changed] == [IPv4Address("192.0.2.33")]
    assert removed == []
    assert [lease.public_ip for lease in book.valid()] == [IPv4Address("192.0.2.33")]


def test_ties_go_to_the_lower_key() -> None:
    """Keys created in one etcd transaction share a create revision."""
    a = record("10.244.3.0-24", "192.0.2.3", 10)
    b = record("10.244.3.0-24&fc00::-64", "192.0.2.4", 10)
    book = LeaseBook(CONFIG)
    book.reset([b, a])
    assert [lease.public_ip for lease in book.valid()] == [IPv4Address("192.0.2.3")]


def test_a_lease_overlapping_ours_is_rejected_even_when_older() -> None:
    own = record("10.244.3.0-24", str(OWN_IP), 50)
    other = record("10.244.3.0-24&fc00::-64", "192.0.2.7", 1)
    book = LeaseBook(CONFIG, own_key=own.key, own_ip=OWN_IP)
    book.reset([own, other])
    assert book.valid() == []
    (rejection,) = book.take_rejections()
    assert "overlaps this node's" in rejection.reason


def test_without_a_config_overlap_of_different_lengths_is_still_resolved() -> None:
    book = LeaseBook(None)
    book.reset(
        [
            record("10.244.0.0-16", "192.0.2.16", 30),
            record("10.244.3.0-24", "192.0.2.24", 10),
            record("10.245.0.0-24", "192.0.2.25", 40),
        ]
    )
    assert [str(lease.subnet) for lease in book.valid()] == ["10.244.3.0/24", "10.245.0.0/24"]


def test_by_public_ip_is_the_oldest_lease_whatever_the_learning_order() -> None:
    """A node holding two leases: its traffic is accepted for both (sources_of), and the
    peer it maps to is the oldest one, not the one learnt first."""
    young = Lease(IPv4Network("10.244.4.0/24"), IPv4Address("192.0.2.3"), create_revision=20)
    old = Lease(IPv4Network("10.244.9.0/24"), IPv4Address("192.0.2.3"), create_revision=5)
    for order in ([young, old], [old, young]):
        table = PeerTable(port=8285)
        for lease in order:
            table.upsert(lease)
        peer = table.by_public_ip("192.0.2.3")
        assert peer is not None and peer.lease.subnet == old.subnet
        assert set(table.sources_of("192.0.2.3")) == {
            (int(s.network_address) >> 8, 8) for s in (old.subnet, young.subnet)
        }
    # Recreated (a new create revision, same content): the table sees the change.
    renewed = Lease(old.subnet, old.public_ip, create_revision=30)
    assert table.upsert(renewed) is True
    peer = table.by_public_ip("192.0.2.3")
    assert peer is not None and peer.lease.subnet == young.subnet


# -- the subnet manager's watch over a real file registry ------------------------------------


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def test_watch_applies_the_rules_to_snapshots_and_events(tmp_path: Path) -> None:
    registry = FileRegistry(tmp_path / "registry.json", poll_interval=0.01)
    registry.put_sync("/coreos.com/network/config", config_json(NETWORK).encode(), None)
    notes: list[tuple[str, dict[str, Any]]] = []
    m = SubnetManager(
        registry, public_ip=OWN_IP, notify=lambda event, **f: notes.append((event, f))
    )
    own = await m.acquire(CONFIG)
    older = Lease(IPv4Network("10.244.200.0/24"), IPv4Address("192.0.2.2"))
    await registry.create(f"{SUBNETS}{older.key}", older.value_json().encode(), TTL)
    # Present at the first list: a lease of the wrong length and one with a bad PublicIP.
    await registry.put(f"{SUBNETS}10.244.201.0-25", value("192.0.2.5"), TTL)
    await registry.put(f"{SUBNETS}10.244.202.0-24", value("0.0.0.0", Pad=HUGE), TTL)
    recorder = Recorder()
    task = asyncio.create_task(
        m.watch(own, recorder.on_snapshot, recorder.on_events, config=CONFIG)
    )
    try:
        await wait_until(lambda: len(recorder.snapshots) == 1)
        assert [lease.subnet for lease in recorder.snapshots[0]] == [older.subnet]
        # A newer lease for the same /24 (dual-stack key) appears: rejected, one warning.
        newer = f"{SUBNETS}10.244.200.0-24&fc00::-64"
        await registry.create(newer, value("192.0.2.99"), TTL)
        await wait_until(lambda: sum(e == "lease_record_invalid" for e, _ in notes) == 3)
        await asyncio.sleep(0.2)
        assert recorder.events == []
        # The older goes: the newer becomes the subnet's peer.
        await registry.delete(f"{SUBNETS}{older.key}")
        await wait_until(lambda: len(recorder.events) == 1)
        (event,) = recorder.events
        assert event.kind == "added" and event.lease is not None
        assert event.lease.public_ip == IPv4Address("192.0.2.99")
        # The same bad records again on a re-list are not reported again.
        await m.list_leases(CONFIG)
        invalid = [f for e, f in notes if e == "lease_record_invalid"]
        assert len(invalid) == 3, invalid
        assert {f["key"].strip("'")[len(SUBNETS) :] for f in invalid} == {
            "10.244.201.0-25",
            "10.244.202.0-24",
            "10.244.200.0-24&fc00::-64",
        }
        assert all(len(str(f)) < 400 for f in invalid)
        assert not task.done()
    finally:
        await stop(task)
