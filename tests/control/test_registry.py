"""The embedded file registry and the subnet manager on top of it (etcd v3 semantics)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from control.config import NetworkConfig, config_json, parse_config
from control.file_registry import FileRegistry
from control.kv import Entry, Event, RegistryError, RevisionCompacted
from control.lease import Lease, parse_lease
from control.subnet_manager import LeaseEvent, LeaseLost, NetworkFull, SubnetManager
from tests.helpers.paths import ROOT
from tests.helpers.watching import CountingStore, Recorder, start_watch, wait_until

PREFIX = "/coreos.com/network"
CONFIG_KEY = f"{PREFIX}/config"
SUBNETS = f"{PREFIX}/subnets/"
TTL = 24 * 3600


class Clock:
    """An injected wall clock for TTLs."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class AlwaysCompacted(CountingStore):
    """A store whose watch always fails with a compacted revision."""

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        raise RevisionCompacted(start_revision + 5)
        yield []  # pragma: no cover - makes this an async generator


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "registry.json"


@pytest.fixture
def registry(path: Path, clock: Clock) -> FileRegistry:
    return FileRegistry(path, poll_interval=0.01, clock=clock)


def seed_config(registry: FileRegistry, config: dict[str, Any] | None = None) -> NetworkConfig:
    text = json.dumps(config) if config else config_json(IPv4Network("10.244.0.0/16"))
    registry.put_sync(CONFIG_KEY, text.encode(), None)
    return parse_config(text)


def manager(registry: Any, ip: str, **kwargs: Any) -> SubnetManager:
    return SubnetManager(registry, public_ip=IPv4Address(ip), **kwargs)


async def collect(
    registry: FileRegistry, prefix: str, start: int, count: int, timeout: float = 3.0
) -> list[Event]:
    events: list[Event] = []

    async def run() -> None:
        async for batch in registry.watch(prefix, start):
            events.extend(batch)
            if len(events) >= count:
                return

    await asyncio.wait_for(run(), timeout)
    return events


# -- FileRegistry: basic operations ---------------------------------------------------------


async def test_get_on_a_missing_file_is_empty(registry: FileRegistry, path: Path) -> None:
    assert await registry.get("/x") is None
    assert await registry.list_prefix("/") == ([], 0)
    assert not path.exists()  # reads do not create the file


async def test_create_if_absent(registry: FileRegistry) -> None:
    key = f"{SUBNETS}10.244.3.0-24"
    assert await registry.create(key, b"first", TTL) is True
    assert await registry.create(key, b"second", TTL) is False
    entry = await registry.get(key)
    assert entry is not None and entry.value == b"first"
    await registry.delete(key)
    assert await registry.create(key, b"third", None) is True
    entry = await registry.get(key)
    assert entry is not None and entry.value == b"third" and entry.has_ttl is False


async def test_put_get_delete(registry: FileRegistry, path: Path) -> None:
    await registry.put("/a", b"1", TTL)
    entry = await registry.get("/a")
    assert entry == Entry("/a", b"1", 1, True, create_revision=1)
    await registry.put("/a", b"2", None)  # an update keeps the create revision, like etcd's
    assert await registry.get("/a") == Entry("/a", b"2", 2, False, create_revision=1)
    assert await registry.delete("/a") is True
    assert await registry.delete("/a") is False
    assert await registry.get("/a") is None
    assert (await registry.list_prefix("/"))[1] == 3
    # Arbitrary bytes survive the JSON file.
    await registry.put("/bin", b"\xff\x00\xfe", None)
    entry = await registry.get("/bin")
    assert entry is not None and entry.value == b"\xff\x00\xfe"
    # The file is plain JSON, the file and its lock 0600, and no temp files remain.
    assert isinstance(json.loads(path.read_text()), dict)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.with_name("registry.json.lock").stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".registry")] == []


async def test_list_prefix_and_revision(registry: FileRegistry) -> None:
    await registry.put(CONFIG_KEY, b"{}", None)
    await registry.put(f"{SUBNETS}10.244.2.0-24", b"b", TTL)
    await registry.put(f"{SUBNETS}10.244.1.0-24", b"a", TTL)
    await registry.put("/other/subnets/10.0.0.0-24", b"x", TTL)
    entries, revision = await registry.list_prefix(SUBNETS)
    assert revision == 4
    assert [e.key for e in entries] == [f"{SUBNETS}10.244.1.0-24", f"{SUBNETS}10.244.2.0-24"]
    assert [e.mod_revision for e in entries] == [3, 2]
    all_entries, _ = await registry.list_prefix("")
    assert len(all_entries) == 4


def test_data_is_shared_between_instances(path: Path, clock: Clock) -> None:
    one = FileRegistry(path, clock=clock)
    two = FileRegistry(path, clock=clock)
    one.put_sync("/k", b"v", TTL)
    assert two.get_sync("/k") == Entry("/k", b"v", 1, True, create_revision=1)
    assert two.create_sync("/k", b"w", TTL) is False


def test_parent_directory_is_created(tmp_path: Path) -> None:
    registry = FileRegistry(tmp_path / "a" / "b" / "registry.json")
    registry.put_sync("/k", b"v", None)
    assert registry.get_sync("/k") is not None


# -- TTLs -----------------------------------------------------------------------------------


def test_ttl_expiry_with_injected_clock(registry: FileRegistry, clock: Clock) -> None:
    registry.put_sync("/lease", b"v", 100)
    clock.now += 99.5
    assert registry.get_sync("/lease") is not None
    clock.now += 0.5
    assert registry.get_sync("/lease") is None
    entries, revision = registry.list_sync("/")
    assert entries == []
    assert revision == 2  # the expiry is a delete, with its own revision


def test_put_refreshes_the_ttl(registry: FileRegistry, clock: Clock) -> None:
    registry.put_sync("/lease", b"v", 100)
    clock.now += 80
    registry.put_sync("/lease", b"v", 100)
    clock.now += 80
    assert registry.get_sync("/lease") is not None
    clock.now += 21
    assert registry.get_sync("/lease") is None


def test_reservations_never_expire(registry: FileRegistry, clock: Clock) -> None:
    registry.put_sync("/reserved", b"r", None)
    registry.put_sync("/leased", b"l", 10)
    clock.now += 10 * 365 * 24 * 3600
    entry = registry.get_sync("/reserved")
    assert entry is not None and entry.has_ttl is False
    assert registry.get_sync("/leased") is None


async def test_expiry_is_seen_by_a_watcher(registry: FileRegistry, clock: Clock) -> None:
    registry.put_sync("/p/lease", b"v", 10)
    clock.now += 11
    events = await collect(registry, "/p/", 2, 1)
    assert [(e.kind, e.key, e.revision) for e in events] == [("delete", "/p/lease", 2)]


# -- watch ----------------------------------------------------------------------------------


async def test_watch_delivers_puts_and_deletes_in_order(registry: FileRegistry) -> None:
    registry.put_sync("/p/old", b"0", None)
    _, revision = await registry.list_prefix("/p/")
    task = asyncio.create_task(collect(registry, "/p/", revision + 1, 4))
    await asyncio.sleep(0.05)
    await registry.put("/p/a", b"1", TTL)
    await registry.put("/other", b"x", TTL)  # outside the prefix
    await registry.put("/p/b", b"2", None)
    await registry.delete("/p/a")
    await registry.put("/p/b", b"3", None)
    events = await task
    assert [(e.kind, e.key, e.value, e.has_ttl) for e in events] == [
        ("put", "/p/a", b"1", True),
        ("put", "/p/b", b"2", False),
        ("delete", "/p/a", b"", True),
        ("put", "/p/b", b"3", False),
    ]
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and len(set(revisions)) == 4
    assert revisions[0] == revision + 1


async def test_watch_replays_history_from_a_past_revision(registry: FileRegistry) -> None:
    for i in range(5):
        registry.put_sync(f"/p/{i}", str(i).encode(), TTL)
    events = await collect(registry, "/p/", 3, 3)
    assert [(e.key, e.revision) for e in events] == [("/p/2", 3), ("/p/3", 4), ("/p/4", 5)]


async def test_watch_from_a_trimmed_revision_raises_compacted(path: Path, clock: Clock) -> None:
    registry = FileRegistry(path, poll_interval=0.01, history=3, clock=clock)
    for i in range(10):
        registry.put_sync(f"/p/{i}", b"v", TTL)
    with pytest.raises(RevisionCompacted) as info:
        await collect(registry, "/p/", 1, 1)
    assert info.value.compact_revision == 7
    assert "compacted" in str(info.value)
    assert isinstance(info.value, RegistryError)
    # Within the kept history the watch works.
    events = await collect(registry, "/p/", 8, 3)
    assert [e.revision for e in events] == [8, 9, 10]


async def test_compact_sync_then_watch(registry: FileRegistry) -> None:
    for i in range(6):
        registry.put_sync(f"/p/{i}", b"v", TTL)
    registry.compact_sync(4)
    with pytest.raises(RevisionCompacted):
        await collect(registry, "/p/", 3, 1)
    events = await collect(registry, "/p/", 5, 2)
    assert [e.revision for e in events] == [5, 6]
    # Compaction forgets history, not data.
    entries, revision = registry.list_sync("/p/")
    assert len(entries) == 6 and revision == 6


async def test_running_watch_is_compacted_when_it_falls_behind(registry: FileRegistry) -> None:
    registry.put_sync("/p/a", b"v", TTL)
    seen: list[Event] = []

    async def run() -> None:
        async for batch in registry.watch("/p/", 2):
            seen.extend(batch)

    task = asyncio.create_task(run())
    await asyncio.sleep(0.05)
    # Without yielding to the watcher: changes, then a compaction past them.
    registry.put_sync("/p/b", b"v", TTL)
    registry.put_sync("/p/c", b"v", TTL)
    registry.compact_sync(3)
    with pytest.raises(RevisionCompacted):
        await asyncio.wait_for(task, 3)
    assert seen == []


# -- corrupt files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        "garbage",
        "[]",
        "{}",
        '{"keys": []}',
        '{"revision": 1, "keys": {}, "events": [',
    ],
)
def test_corrupt_file_gives_registry_error(path: Path, content: str) -> None:
    path.write_text(content)
    registry = FileRegistry(path)
    for operation in _operations(registry):
        with pytest.raises(RegistryError) as info:
            operation()
        message = str(info.value)
        assert str(path) in message
        assert "corrupt" in message
    assert path.read_text() == content  # never overwritten


def _operations(registry: FileRegistry) -> list[Callable[[], object]]:
    return [
        lambda: registry.get_sync("/a"),
        lambda: registry.list_sync("/"),
        lambda: registry.put_sync("/b", b"v", None),
        lambda: registry.create_sync("/c", b"v", None),
        lambda: registry.delete_sync("/a"),
    ]


@pytest.mark.parametrize(
    "content",
    [
        '{"keys": {}}',
        '{"revision": 0, "compact_revision": 0, "keys": {}}',
        '{"revision": 0, "compact_revision": 0, "keys": {"/a": 1}, "events": []}',
        '{"revision": "x", "compact_revision": 0, "keys": {}, "events": []}',
    ],
    ids=["only-keys", "no-events", "bad-item", "bad-revision"],
)
def test_registry_json_of_the_wrong_shape_gives_registry_error(path: Path, content: str) -> None:
    """A JSON object that is not a whole registry: each operation works or says 'corrupt'."""
    path.write_text(content)
    registry = FileRegistry(path)
    for operation in _operations(registry):
        try:
            operation()
        except RegistryError as e:
            assert "corrupt" in str(e)


async def test_corrupt_file_fails_the_watch_too(path: Path) -> None:
    registry = FileRegistry(path, poll_interval=0.01)
    path.write_text("garbage")
    with pytest.raises(RegistryError, match="corrupt"):
        await collect(registry, "/", 1, 1)


def test_unreadable_path_gives_registry_error(tmp_path: Path) -> None:
    (tmp_path / "dir.json").mkdir()
    registry = FileRegistry(tmp_path / "dir.json")
    with pytest.raises(RegistryError, match="dir.json"):
        registry.get_sync("/a")


# -- many processes sharing one file ---------------------------------------------------------

ACQUIRE_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from ipaddress import IPv4Address
    from control.file_registry import FileRegistry
    from control.subnet_manager import SubnetManager

    path, ip, go = sys.argv[1:4]
    while not os.path.exists(go):
        time.sleep(0.002)

    async def main():
        manager = SubnetManager(FileRegistry(path), public_ip=IPv4Address(ip))
        config = await manager.read_config()
        lease = await manager.acquire(config)
        print(lease.subnet, flush=True)

    asyncio.run(main())
    """
)


def test_twenty_processes_acquire_distinct_subnets(path: Path, tmp_path: Path) -> None:
    registry = FileRegistry(path)
    # 31 subnets for 20 nodes: candidates collide often, so create-if-absent races happen.
    config = seed_config(registry, {"Network": "10.244.0.0/19", "Backend": {"Type": "udp"}})
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ACQUIRE_SCRIPT, str(path), f"192.0.2.{i + 1}", str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(20)
    ]
    time.sleep(0.3)  # let them start and wait at the gate
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        results.append(IPv4Network(out.strip()))
    assert len(set(results)) == 20
    assert all(config.subnet_min <= s <= config.subnet_max for s in results)
    entries, _ = registry.list_sync(SUBNETS)
    leases = {parse_lease(e.key, e.value).subnet: parse_lease(e.key, e.value) for e in entries}
    assert set(leases) == set(results)
    assert sorted(str(lease.public_ip) for lease in leases.values()) == sorted(
        f"192.0.2.{i + 1}" for i in range(20)
    )
    assert all(e.has_ttl for e in entries)


# -- SubnetManager: config ------------------------------------------------------------------


async def test_read_config(registry: FileRegistry) -> None:
    m = manager(registry, "192.0.2.1")
    assert await m.read_config() is None
    seed_config(registry)
    config = await m.read_config()
    assert config is not None and config.network == IPv4Network("10.244.0.0/16")


async def test_wait_for_config_polls_until_it_appears(registry: FileRegistry) -> None:
    notes: list[str] = []
    m = manager(registry, "192.0.2.1", notify=lambda event, **_: notes.append(event))
    task = asyncio.create_task(m.wait_for_config(retry=0.01))
    await asyncio.sleep(0.1)
    assert not task.done()
    seed_config(registry)
    config = await asyncio.wait_for(task, 2)
    assert config.subnet_len == 24
    assert notes.count("config_missing") == 1


async def test_custom_prefix(registry: FileRegistry) -> None:
    registry.put_sync("/my/net/config", config_json(IPv4Network("198.18.0.0/16")).encode(), None)
    m = manager(registry, "192.0.2.1", prefix="/my/net/")
    config = await m.read_config()
    assert config is not None
    lease = await m.acquire(config)
    assert registry.get_sync(f"/my/net/subnets/{lease.key}") is not None


# -- SubnetManager: acquire ------------------------------------------------------------------


async def test_two_then_three_managers_get_distinct_subnets(path: Path, clock: Clock) -> None:
    registry = FileRegistry(path, clock=clock)
    config = seed_config(registry)
    a = await manager(FileRegistry(path, clock=clock), "192.0.2.1").acquire(config)
    b = await manager(FileRegistry(path, clock=clock), "192.0.2.2").acquire(config)
    assert a.subnet != b.subnet
    c = await manager(FileRegistry(path, clock=clock), "192.0.2.3").acquire(config)
    assert len({a.subnet, b.subnet, c.subnet}) == 3
    for lease in (a, b, c):
        assert lease.subnet.prefixlen == 24 and lease.subnet.subnet_of(config.network)
        assert lease.subnet != IPv4Network("10.244.0.0/24")  # below SubnetMin
        entry = registry.get_sync(f"{SUBNETS}{lease.key}")
        assert entry is not None and entry.has_ttl
        assert entry.value.decode() == lease.value_json()
    assert registry.get_sync(f"{SUBNETS}{a.key}").value == (  # type: ignore[union-attr]
        b'{"PublicIP":"192.0.2.1","PublicIPv6":null}'
    )
    # Leases expire after the 24 h TTL.
    clock.now += TTL
    assert registry.list_sync(SUBNETS)[0] == []


async def test_vxlan_lease_value(registry: FileRegistry) -> None:
    config = seed_config(registry, {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
    data = {"VNI": 1, "VtepMAC": "02:00:00:00:00:01"}
    lease = await manager(registry, "192.0.2.1", backend_type="vxlan", backend_data=data).acquire(
        config
    )
    entry = registry.get_sync(f"{SUBNETS}{lease.key}")
    assert entry is not None
    assert entry.value == (
        b'{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}'
    )


async def test_restarted_node_gets_the_same_subnet_back(path: Path, clock: Clock) -> None:
    registry = FileRegistry(path, clock=clock)
    config = seed_config(registry)
    first = await manager(FileRegistry(path, clock=clock), "192.0.2.1").acquire(config)
    await manager(FileRegistry(path, clock=clock), "192.0.2.2").acquire(config)
    before = registry.get_sync(f"{SUBNETS}{first.key}")
    clock.now += TTL - 10
    notes: list[str] = []
    again = await manager(
        FileRegistry(path, clock=clock), "192.0.2.1", notify=lambda e, **_: notes.append(e)
    ).acquire(config, previous=IPv4Network("10.244.99.0/24"))
    assert again.subnet == first.subnet
    assert "lease_reused" in notes
    after = registry.get_sync(f"{SUBNETS}{first.key}")
    assert before is not None and after is not None
    assert after.mod_revision > before.mod_revision  # the TTL was refreshed
    clock.now += 20
    assert registry.get_sync(f"{SUBNETS}{first.key}") is not None
    assert len(registry.list_sync(SUBNETS)[0]) == 1  # the other node's lease expired


async def test_previous_subnet_is_reused_when_free(registry: FileRegistry) -> None:
    config = seed_config(registry)
    previous = IPv4Network("10.244.77.0/24")
    lease = await manager(registry, "192.0.2.1").acquire(config, previous=previous)
    assert lease.subnet == previous
    # Held by someone else: not taken, another subnet is chosen.
    other = await manager(registry, "192.0.2.2").acquire(config, previous=previous)
    assert other.subnet != previous


@pytest.mark.parametrize(
    "previous",
    ["10.244.0.0/24", "10.245.7.0/24", "10.244.7.0/25", "10.244.40.0/24"],
    ids=["below-min", "outside-network", "other-length", "above-max"],
)
async def test_previous_subnet_outside_the_config_is_ignored(
    registry: FileRegistry, previous: str
) -> None:
    config = seed_config(
        registry,
        {"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.30.0"},
    )
    lease = await manager(registry, "192.0.2.1").acquire(config, previous=IPv4Network(previous))
    assert lease.subnet != IPv4Network(previous)
    assert config.subnet_min <= lease.subnet <= config.subnet_max


async def test_reservations_are_honoured(registry: FileRegistry, clock: Clock) -> None:
    config = seed_config(
        registry, {"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.3.0"}
    )
    reserved_for_other = Lease(IPv4Network("10.244.1.0/24"), IPv4Address("192.0.2.200"))
    reserved_for_us = Lease(IPv4Network("10.244.3.0/24"), IPv4Address("192.0.2.1"))
    for lease in (reserved_for_other, reserved_for_us):
        registry.put_sync(f"{SUBNETS}{lease.key}", lease.value_json().encode(), None)
    clock.now += 10 * TTL
    ours = await manager(registry, "192.0.2.1").acquire(config)
    assert ours.subnet == IPv4Network("10.244.3.0/24")
    assert ours.has_ttl is False
    entry = registry.get_sync(f"{SUBNETS}{ours.key}")
    assert entry is not None and entry.has_ttl is False  # still a reservation
    # Others only ever get the one unreserved subnet.
    other = await manager(registry, "192.0.2.2").acquire(config)
    assert other.subnet == IPv4Network("10.244.2.0/24")
    with pytest.raises(NetworkFull):
        await manager(registry, "192.0.2.3").acquire(config)
    entry = registry.get_sync(f"{SUBNETS}{reserved_for_other.key}")
    assert entry is not None and entry.value == reserved_for_other.value_json().encode()


async def test_reserved_previous_subnet_is_not_taken(registry: FileRegistry) -> None:
    config = seed_config(registry)
    reserved = Lease(IPv4Network("10.244.5.0/24"), IPv4Address("192.0.2.200"))
    registry.put_sync(f"{SUBNETS}{reserved.key}", reserved.value_json().encode(), None)
    lease = await manager(registry, "192.0.2.1").acquire(config, previous=reserved.subnet)
    assert lease.subnet != reserved.subnet


async def test_broken_records_are_skipped_and_reported_once(registry: FileRegistry) -> None:
    config = seed_config(registry)
    registry.put_sync(f"{SUBNETS}10.244.1.0-24", b"not json", TTL)
    registry.put_sync(f"{SUBNETS}garbage", b"{}", TTL)
    notes: list[str] = []
    m = manager(registry, "192.0.2.1", notify=lambda e, **_: notes.append(e))
    leases, _ = await m.list_leases()
    assert leases == []
    await m.list_leases()
    assert notes.count("lease_record_invalid") == 2
    lease = await m.acquire(config)
    assert lease.subnet != IPv4Network("10.244.1.0/24")  # the key exists, even if broken


async def test_previous_subnet_held_by_a_broken_record_is_not_retried(
    registry: FileRegistry,
) -> None:
    # subnet.env names 10.244.1.0/24, but its key holds a record we cannot parse.
    config = seed_config(registry)
    registry.put_sync(f"{SUBNETS}10.244.1.0-24", b"not json", TTL)
    m = manager(registry, "192.0.2.1")
    lease = await m.acquire(config, previous=IPv4Network("10.244.1.0/24"))
    assert lease.subnet != IPv4Network("10.244.1.0/24")
    assert lease.public_ip == IPv4Address("192.0.2.1")


async def test_deeply_nested_record_does_not_break_acquire(registry: FileRegistry) -> None:
    config = seed_config(registry)
    registry.put_sync(f"{SUBNETS}10.244.1.0-24", b"[" * 100_000, TTL)
    m = manager(registry, "192.0.2.1")
    lease = await m.acquire(config)
    assert lease.public_ip == IPv4Address("192.0.2.1")


async def test_renew_refreshes_the_ttl(registry: FileRegistry, clock: Clock) -> None:
    config = seed_config(registry)
    m = manager(registry, "192.0.2.1", ttl=100)
    lease = await m.acquire(config)
    clock.now += 90
    await m.renew(lease)
    clock.now += 90
    assert registry.get_sync(f"{SUBNETS}{lease.key}") is not None
    clock.now += 11
    assert registry.get_sync(f"{SUBNETS}{lease.key}") is None


# -- SubnetManager: watch -------------------------------------------------------------------


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def test_watch_snapshot_then_added_and_removed(path: Path) -> None:
    registry = FileRegistry(path, poll_interval=0.01)
    config = seed_config(registry)
    a = manager(FileRegistry(path, poll_interval=0.01), "192.0.2.1")
    own = await a.acquire(config)
    existing = await manager(registry, "192.0.2.2").acquire(config)
    recorder = Recorder()
    task = start_watch(a, own, recorder)
    try:
        await wait_until(lambda: len(recorder.snapshots) == 1)
        assert [lease.subnet for lease in recorder.snapshots[0]] == [existing.subnet]
        newcomer = await manager(registry, "192.0.2.3").acquire(config)
        await wait_until(lambda: len(recorder.events) == 1)
        added = recorder.events[0]
        assert added.kind == "added" and added.lease is not None
        assert replace(added.lease, create_revision=0) == newcomer
        assert added.lease.create_revision > 0  # its age, as the registry recorded it
        await registry.delete(f"{SUBNETS}{newcomer.key}")
        await wait_until(lambda: len(recorder.events) == 2)
        assert recorder.events[1] == LeaseEvent("removed", newcomer.subnet, None)
        # Renewing our own lease is not an event for the dataplane.
        await a.renew(own)
        await asyncio.sleep(0.1)
        assert len(recorder.events) == 2
        assert not task.done()
    finally:
        await stop(task)


async def test_deleting_our_own_key_raises_lease_lost(registry: FileRegistry) -> None:
    config = seed_config(registry)
    m = manager(registry, "192.0.2.1")
    own = await m.acquire(config)
    recorder = Recorder()
    task = start_watch(m, own, recorder)
    await wait_until(lambda: len(recorder.snapshots) == 1)
    await registry.delete(f"{SUBNETS}{own.key}")
    with pytest.raises(LeaseLost, match="revoked"):
        await asyncio.wait_for(task, 3)


async def test_own_key_taken_over_raises_lease_lost(registry: FileRegistry) -> None:
    config = seed_config(registry)
    m = manager(registry, "192.0.2.1")
    own = await m.acquire(config)
    recorder = Recorder()
    task = start_watch(m, own, recorder)
    await wait_until(lambda: len(recorder.snapshots) == 1)
    thief = Lease(own.subnet, IPv4Address("192.0.2.66"))
    await registry.put(f"{SUBNETS}{own.key}", thief.value_json().encode(), TTL)
    with pytest.raises(LeaseLost, match="192.0.2.66"):
        await asyncio.wait_for(task, 3)


async def test_own_lease_expiring_raises_lease_lost(registry: FileRegistry, clock: Clock) -> None:
    config = seed_config(registry)
    m = manager(registry, "192.0.2.1")
    own = await m.acquire(config)
    recorder = Recorder()
    task = start_watch(m, own, recorder)
    await wait_until(lambda: len(recorder.snapshots) == 1)
    clock.now += TTL + 1
    registry.sweep_sync()
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(task, 3)


async def test_watch_without_our_lease_raises_lease_lost(registry: FileRegistry) -> None:
    seed_config(registry)
    m = manager(registry, "192.0.2.1")
    ghost = Lease(IPv4Network("10.244.9.0/24"), IPv4Address("192.0.2.1"))
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(m.watch(ghost, lambda _: None, lambda _: None), 3)


async def test_watch_relists_after_compaction_without_hot_looping(path: Path) -> None:
    registry = FileRegistry(path, poll_interval=0.01)
    config = seed_config(registry)
    store = CountingStore(FileRegistry(path, poll_interval=0.01))
    notes: list[str] = []
    m = SubnetManager(
        store, public_ip=IPv4Address("192.0.2.1"), notify=lambda e, **_: notes.append(e)
    )
    own = await m.acquire(config)
    recorder = Recorder()
    task = start_watch(m, own, recorder)
    try:
        await wait_until(lambda: len(recorder.snapshots) == 1)
        assert recorder.snapshots[0] == []
        # Two nodes join and the history is compacted before the watcher polls again.
        b = Lease(IPv4Network("10.244.200.0/24"), IPv4Address("192.0.2.2"))
        c = Lease(IPv4Network("10.244.201.0/24"), IPv4Address("192.0.2.3"))
        registry.put_sync(f"{SUBNETS}{b.key}", b.value_json().encode(), TTL)
        registry.put_sync(f"{SUBNETS}{c.key}", c.value_json().encode(), TTL)
        registry.compact_sync(registry.list_sync("")[1])
        await wait_until(lambda: len(recorder.snapshots) == 2)
        assert "watch_compacted" in notes
        assert {lease.subnet for lease in recorder.snapshots[1]} == {b.subnet, c.subnet}
        # Later changes arrive as events again.
        d = await manager(registry, "192.0.2.4").acquire(config)
        await wait_until(lambda: any(e.subnet == d.subnet for e in recorder.events))
        calls = store.list_calls
        await asyncio.sleep(1.0)
        assert store.list_calls == calls  # no re-listing while nothing goes wrong
        assert store.list_calls <= 4  # acquire + initial list + one re-list (+1 slack)
        assert not task.done()
    finally:
        await stop(task)


async def test_watch_backs_off_when_always_compacted(registry: FileRegistry) -> None:
    config = seed_config(registry)
    store = AlwaysCompacted(registry)
    m = SubnetManager(store, public_ip=IPv4Address("192.0.2.1"))
    own = await m.acquire(config)
    store.list_calls = 0
    recorder = Recorder()
    task = start_watch(m, own, recorder)
    await asyncio.sleep(1.0)
    await stop(task)
    # Backoff 0.1, 0.2, 0.4, ... s: a handful of re-lists per second, not thousands.
    assert 2 <= store.list_calls <= 6
    assert store.list_calls - 1 <= len(recorder.snapshots) <= store.list_calls


async def test_reservation_for_our_ip_publishes_our_backend_attrs(registry: FileRegistry) -> None:
    # flanneld (tryAcquireLease) rewrites a reservation with its own LeaseAttrs, TTL 0: the
    # key stays a reservation but peers learn our BackendType/VtepMAC from it.
    config = seed_config(registry, {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
    reserved = Lease(IPv4Network("10.244.3.0/24"), IPv4Address("192.0.2.1"))
    key = f"{SUBNETS}{reserved.key}"
    registry.put_sync(key, reserved.value_json().encode(), None)
    data = {"VNI": 1, "VtepMAC": "02:00:00:00:00:01"}
    m = manager(registry, "192.0.2.1", backend_type="vxlan", backend_data=data)
    lease = await m.acquire(config)
    assert lease.subnet == reserved.subnet
    assert lease.has_ttl is False
    entry = registry.get_sync(key)
    assert entry is not None and entry.has_ttl is False
    assert entry.value == (
        b'{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}'
    )
    assert lease.backend_data == data


class FlakyPuts(CountingStore):
    """put fails the first ``failures`` times, then goes through."""

    def __init__(self, inner: Any, failures: int) -> None:
        super().__init__(inner)
        self.failures = failures
        self.puts = 0

    async def put(self, key: str, value: bytes, ttl: int | None) -> None:
        self.puts += 1
        if self.puts <= self.failures:
            raise RegistryError("registry unavailable")
        await self.inner.put(key, value, ttl)


async def test_keep_renewed_retries_after_a_failure(
    registry: FileRegistry, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import control.subnet_manager as subnet_manager

    monkeypatch.setattr(subnet_manager, "RENEW_RETRY", 0.05)
    config = seed_config(registry)
    lease = await manager(registry, "192.0.2.1").acquire(config)
    store = FlakyPuts(registry, failures=1)
    notes: list[str] = []
    # TTL 1 s, no margin: the first renewal is due after 1 s (the minimum interval).
    m = SubnetManager(
        store,
        public_ip=IPv4Address("192.0.2.1"),
        ttl=1,
        renew_margin=0,
        notify=lambda e, **_: notes.append(e),
    )
    before = registry.get_sync(f"{SUBNETS}{lease.key}")
    task = asyncio.create_task(m.keep_renewed(lease))
    try:
        await wait_until(lambda: "lease_renewed" in notes, timeout=3)
        assert notes[:2] == ["lease_renew_failed", "lease_renewed"]
        after = registry.get_sync(f"{SUBNETS}{lease.key}")
        assert before is not None and after is not None
        assert after.mod_revision > before.mod_revision
    finally:
        await stop(task)


async def test_keep_renewed_leaves_a_reservation_alone(registry: FileRegistry) -> None:
    reserved = Lease(IPv4Network("10.244.3.0/24"), IPv4Address("192.0.2.1"), has_ttl=False)
    store = FlakyPuts(registry, failures=0)
    m = SubnetManager(store, public_ip=IPv4Address("192.0.2.1"), ttl=1, renew_margin=0)
    task = asyncio.create_task(m.keep_renewed(reserved))
    await asyncio.sleep(0.1)
    assert not task.done()
    await stop(task)
    assert store.puts == 0


@pytest.mark.parametrize(
    "old",
    ["10.244.0.0/24", "10.244.7.0/25"],
    ids=["below-subnet-min", "other-subnet-len"],
)
async def test_our_lease_that_no_longer_fits_is_replaced(registry: FileRegistry, old: str) -> None:
    # flanneld (tryAcquireLease/isSubnetConfigCompat): a lease with our IP outside
    # [SubnetMin, SubnetMax] or of another length is deleted and a new one allocated.
    config = seed_config(registry)
    stale = Lease(IPv4Network(old), IPv4Address("192.0.2.1"))
    registry.put_sync(f"{SUBNETS}{stale.key}", stale.value_json().encode(), TTL)
    lease = await manager(registry, "192.0.2.1").acquire(config)
    assert lease.subnet != stale.subnet
    assert config.subnet_min <= lease.subnet <= config.subnet_max
    assert registry.get_sync(f"{SUBNETS}{stale.key}") is None


class CountingSweeps(FileRegistry):
    """A real FileRegistry that counts its sweeps (each takes the lock and parses the file)."""

    sweeps = 0

    def sweep_sync(self) -> None:
        self.sweeps += 1
        super().sweep_sync()


async def watch_for(registry: FileRegistry, seconds: float) -> list[Event]:
    """What a watch from revision 1 delivers in ``seconds``."""
    events: list[Event] = []

    async def run() -> None:
        async for batch in registry.watch("/p/", 1):
            events.extend(batch)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run(), seconds)
    return events


async def test_a_watcher_sweeps_only_when_an_expiry_is_due(path: Path, clock: Clock) -> None:
    """Nothing expires for a day: the watcher sweeps once as it starts, not every second."""
    registry = CountingSweeps(path, poll_interval=0.01, clock=clock)
    registry.put_sync("/p/lease", b"v", TTL)
    events = await watch_for(registry, 2.5)
    assert [(e.kind, e.key) for e in events] == [("put", "/p/lease")]
    assert registry.sweeps == 1


async def test_a_running_watcher_sweeps_when_an_expiry_falls_due(path: Path, clock: Clock) -> None:
    """A lease that expires while the watch runs, with no other write, is deleted and its
    delete delivered: the sweep happens when the earliest expiry is due."""
    registry = CountingSweeps(path, poll_interval=0.01, clock=clock)
    registry.put_sync("/p/lease", b"v", 10)
    registry.put_sync("/p/later", b"v", 100)

    async def expire_later() -> None:
        await asyncio.sleep(0.3)
        clock.now += 11

    timer = asyncio.create_task(expire_later())
    events = await watch_for(registry, 1.5)
    await timer
    assert [(e.kind, e.key) for e in events] == [
        ("put", "/p/lease"),
        ("put", "/p/later"),
        ("delete", "/p/lease"),
    ]
    assert registry.get_sync("/p/later") is not None
