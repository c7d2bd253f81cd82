"""SubnetManager on a real etcd (EtcdRegistry over our gRPC client): flanneld's acquire order and
records, races, reservations, and a watch that survives compaction, a frozen etcd and an
etcd restart.

One etcd on a loopback port serves the tests that do not disturb it (each test under its
own key prefix); the tests that freeze or kill etcd start their own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from control.config import NetworkConfig
from control.etcd_endpoints import parse_endpoints
from control.etcd_registry import EtcdRegistry
from control.kv import Entry, RegistryError
from control.subnet_manager import LeaseEvent, LeaseLost, NetworkFull, SubnetManager
from tests.helpers.etcd_server import EtcdServer
from tests.helpers.watching import CountingStore, Recorder, start_watch, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="needs etcd and etcdctl (`make setup` installs them)"
)

DAY = 24 * 3600


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd for one test, which may freeze, kill and restart it."""
    server = EtcdServer(tmp_path / "etcd")
    try:
        server.start()
        yield server
    finally:
        server.resume()
        server.stop()


@pytest.fixture
def key_prefix() -> str:
    """A registry prefix of this test alone (in place of /coreos.com/network)."""
    return f"/t{uuid.uuid4().hex[:8]}/network"


Connect = Callable[[EtcdServer], EtcdRegistry]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Factory of EtcdRegistry clients (one gRPC channel each), all closed afterwards."""
    made: list[EtcdRegistry] = []

    def make(server: EtcdServer) -> EtcdRegistry:
        registry = EtcdRegistry(parse_endpoints(server.endpoint))
        made.append(registry)
        return registry

    yield make
    for registry in made:
        await registry.close()


class Notes:
    """Collects a manager's notify() calls with their time."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.seen.append((time.monotonic(), event, fields))

    def count(self, event: str) -> int:
        return sum(1 for _, name, _ in self.seen if name == event)

    def first(self, event: str) -> float | None:
        return next((t for t, name, _ in self.seen if name == event), None)


def manager(kv: Any, ip: str, prefix: str, **kwargs: Any) -> SubnetManager:
    return SubnetManager(kv, public_ip=IPv4Address(ip), prefix=prefix, **kwargs)


async def put_config(server: EtcdServer, prefix: str, config: dict[str, Any]) -> None:
    await asyncio.to_thread(server.put, f"{prefix}/config", json.dumps(config))


async def config_of(server: EtcdServer, prefix: str, config: dict[str, Any]) -> NetworkConfig:
    await put_config(server, prefix, config)
    registry = EtcdRegistry(parse_endpoints(server.endpoint))
    try:
        read = await manager(registry, "192.0.2.254", prefix).read_config()
    finally:
        await registry.close()
    assert read is not None
    return read


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel a watch; what it raised (if it already ended) the test has checked."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class StartingGate(CountingStore):
    """Holds every manager after its first snapshot until all have taken theirs, so all
    of them choose a subnet before anyone creates one: the worst case for races."""

    def __init__(self, inner: Any, barrier: asyncio.Barrier) -> None:
        super().__init__(inner)
        self.barrier = barrier

    async def list_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        result = await super().list_prefix(prefix)
        if self.list_calls == 1:
            await self.barrier.wait()
        return result


NET16 = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
# 10.6.0.0/22 in /24s leaves exactly three subnets to lease: .1, .2, .3 (the first is skipped).
NET22 = {"Network": "10.6.0.0/22"}


# -- acquire ----------------------------------------------------------------------------------


async def test_two_then_three_managers_get_distinct_subnets(
    shared_etcd: EtcdServer, key_prefix: str, connect: Connect
) -> None:
    config = await config_of(shared_etcd, key_prefix, NET16)
    a = await manager(connect(shared_etcd), "192.0.2.1", key_prefix).acquire(config)
    b = await manager(connect(shared_etcd), "192.0.2.2", key_prefix).acquire(config)
    assert a.subnet != b.subnet
    c = await manager(connect(shared_etcd), "192.0.2.3", key_prefix).acquire(config)
    assert len({a.subnet, b.subnet, c.subnet}) == 3
    for lease in (a, b, c):
        assert lease.subnet.subnet_of(IPv4Network("10.5.0.0/16")) and lease.subnet.prefixlen == 24
        assert lease.subnet != IPv4Network("10.5.0.0/24")  # SubnetMin skips the first
    keys = await asyncio.to_thread(shared_etcd.keys, f"{key_prefix}/subnets/")
    assert sorted(keys) == sorted(f"{key_prefix}/subnets/{x.key}" for x in (a, b, c))


async def test_restarted_manager_gets_its_old_subnet_back(
    shared_etcd: EtcdServer, key_prefix: str, connect: Connect
) -> None:
    config = await config_of(shared_etcd, key_prefix, NET16)
    first = connect(shared_etcd)
    old = await manager(first, "192.0.2.1", key_prefix).acquire(config)
    other = await manager(connect(shared_etcd), "192.0.2.2", key_prefix).acquire(config)
    await first.close()  # the node goes away; its lease stays (24 h TTL), as with flanneld

    notes = Notes()
    # No previous subnet.env either: the lease carrying our public IP is what we get back.
    again = await manager(connect(shared_etcd), "192.0.2.1", key_prefix, notify=notes).acquire(
        config
    )
    assert again.subnet == old.subnet and again.subnet != other.subnet
    assert notes.count("lease_reused") == 1 and notes.count("lease_acquired") == 0
    key = f"{key_prefix}/subnets/{old.key}"
    assert await asyncio.to_thread(shared_etcd.lease_of, key) != 0  # still on a TTL lease
    assert len(await asyncio.to_thread(shared_etcd.keys, f"{key_prefix}/subnets/")) == 2


async def test_twenty_concurrent_acquisitions_get_twenty_distinct_leases(
    shared_etcd: EtcdServer, key_prefix: str, connect: Connect
) -> None:
    config = await config_of(shared_etcd, key_prefix, NET16)
    gate = asyncio.Barrier(20)
    notes = Notes()
    managers = [
        manager(StartingGate(connect(shared_etcd), gate), f"192.0.2.{i}", key_prefix, notify=notes)
        for i in range(1, 21)
    ]
    leases = await asyncio.wait_for(
        asyncio.gather(*(m.acquire(config) for m in managers)), timeout=60
    )
    assert len({lease.subnet for lease in leases}) == 20
    stored = json.loads(
        (
            await asyncio.to_thread(
                shared_etcd.ctl, "get", f"{key_prefix}/subnets/", "--prefix", "-w", "json"
            )
        ).stdout
    )["kvs"]
    assert len(stored) == 20
    owners = {json.loads(base64.b64decode(kv["value"]))["PublicIP"] for kv in stored}
    assert owners == {f"192.0.2.{i}" for i in range(1, 21)}
    assert all(kv.get("lease") for kv in stored)
    # Every lost race was retried (20 snapshots of an empty registry, ~100 candidates).
    assert notes.count("lease_acquired") == 20


async def test_a_lost_race_is_retried(
    shared_etcd: EtcdServer, key_prefix: str, connect: Connect
) -> None:
    """Same random choice, same empty snapshot: the create-if-absent transaction lets
    exactly one win; the loser takes a fresh snapshot and another subnet."""
    config = await config_of(shared_etcd, key_prefix, NET16)
    gate = asyncio.Barrier(2)
    notes = Notes()
    managers = [
        manager(
            StartingGate(connect(shared_etcd), gate),
            ip,
            key_prefix,
            notify=notes,
            rng=random.Random(7),
        )
        for ip in ("192.0.2.1", "192.0.2.2")
    ]
    a, b = await asyncio.gather(*(m.acquire(config) for m in managers))
    assert a.subnet != b.subnet
    assert notes.count("lease_race_lost") == 1 and notes.count("lease_acquired") == 2


# -- records, byte for byte -------------------------------------------------------------------


VXLAN_DATA = {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}


@pytest.mark.parametrize(
    ("backend_type", "backend_data", "expected"),
    [
        ("", None, '{"PublicIP":"192.0.2.7","PublicIPv6":null}'),
        (
            "vxlan",
            VXLAN_DATA,
            '{"PublicIP":"192.0.2.7","PublicIPv6":null,"BackendType":"vxlan",'
            '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}',
        ),
    ],
    ids=["udp", "vxlan"],
)
async def test_records_are_flanneld_s_byte_for_byte_on_a_24h_lease(
    shared_etcd: EtcdServer,
    key_prefix: str,
    connect: Connect,
    backend_type: str,
    backend_data: dict[str, Any] | None,
    expected: str,
) -> None:
    config = await config_of(shared_etcd, key_prefix, NET16)
    m = manager(
        connect(shared_etcd),
        "192.0.2.7",
        key_prefix,
        backend_type=backend_type,
        backend_data=backend_data,
    )
    lease = await m.acquire(config)
    net = lease.subnet
    key = f"{key_prefix}/subnets/{net.network_address}-{net.prefixlen}"
    assert await asyncio.to_thread(shared_etcd.get, key) == expected

    lease_id = await asyncio.to_thread(shared_etcd.lease_of, key)
    assert lease_id != 0, "the key must be attached to an etcd lease"
    ttl = (await asyncio.to_thread(shared_etcd.ctl, "lease", "timetolive", f"{lease_id:x}")).stdout
    # "lease 694d7c0e2b8f5a0a granted with TTL(86400s), remaining(86399s)"
    granted = int(ttl.split("TTL(")[1].split("s)")[0])
    remaining = int(ttl.split("remaining(")[1].split("s)")[0])
    assert granted == DAY and DAY - 60 <= remaining <= DAY, ttl


# -- records written by flanneld ----------------------------------------------------------------


async def test_config_in_any_case_with_lowercase_vxlan_options(
    shared_etcd: EtcdServer, key_prefix: str, connect: Connect
) -> None:
    raw = {
        "network": "10.9.0.0/16",
        "SUBNETLEN": 26,
        "subnetMin": "10.9.1.0",
        "SubnetMax": "10.9.1.192",
        "backend": {"type": "vxlan", "vni": 4096, "port": 4789, "directRouting": True},
    }
    await put_config(shared_etcd, key_prefix, raw)
    m = manager(connect(shared_etcd), "192.0.2.1", key_prefix)
    config = await m.read_config()
    assert config is not None
    assert config.network == IPv4Network("10.9.0.0/16") and config.subnet_len == 26
    assert config.subnet_min == IPv4Network("10.9.1.0/26")
    assert config.subnet_max == IPv4Network("10.9.1.192/26")
    assert (config.backend.type, config.backend.vni, config.backend.port) == ("vxlan", 4096, 4789)
    assert config.backend.direct_routing is True
    lease = await m.acquire(config)
    assert lease.subnet in config.subnets() and lease.subnet.prefixlen == 26


async def test_dual_stack_key_is_parsed_and_its_subnet_is_not_taken(
    shared_etcd: EtcdServer, key_prefix: str, connect: Connect
) -> None:
    config = await config_of(shared_etcd, key_prefix, NET22)
    value = (
        '{"PublicIP":"192.0.2.9","PublicIPv6":"fc00::9","BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    )
    lease_id = await asyncio.to_thread(shared_etcd.grant, 600)
    key = f"{key_prefix}/subnets/10.6.1.0-24&fc00::-64"
    await asyncio.to_thread(shared_etcd.put, key, value, lease=lease_id)

    observer = manager(connect(shared_etcd), "192.0.2.1", key_prefix)
    (flannel,), _ = await observer.list_leases()
    assert flannel.subnet == IPv4Network("10.6.1.0/24")
    assert flannel.ipv6_subnet == IPv6Network("fc00::/64")
    assert flannel.public_ip == IPv4Address("192.0.2.9")
    assert flannel.public_ipv6 == IPv6Address("fc00::9")
    assert flannel.backend_type == "vxlan" and flannel.backend_data == VXLAN_DATA
    assert flannel.has_ttl

    ours = [
        await manager(connect(shared_etcd), ip, key_prefix).acquire(config)
        for ip in ("192.0.2.1", "192.0.2.2")
    ]
    assert {x.subnet for x in ours} == {IPv4Network("10.6.2.0/24"), IPv4Network("10.6.3.0/24")}
    with pytest.raises(NetworkFull):
        await manager(connect(shared_etcd), "192.0.2.3", key_prefix).acquire(config)


async def test_reservation_is_never_taken_and_is_ours_with_our_ip(
    shared_etcd: EtcdServer, key_prefix: str, connect: Connect
) -> None:
    config = await config_of(shared_etcd, key_prefix, NET22)
    key = f"{key_prefix}/subnets/10.6.1.0-24"
    # An operator's reservation: written without a lease, so it never expires.
    await asyncio.to_thread(shared_etcd.put, key, '{"PublicIP":"192.0.2.50"}')

    others = [
        await manager(connect(shared_etcd), ip, key_prefix).acquire(config)
        for ip in ("192.0.2.1", "192.0.2.2")
    ]
    assert IPv4Network("10.6.1.0/24") not in {x.subnet for x in others}
    with pytest.raises(NetworkFull):  # the reserved subnet is the only one left
        await manager(connect(shared_etcd), "192.0.2.3", key_prefix).acquire(config)

    notes = Notes()
    mine = await manager(
        connect(shared_etcd),
        "192.0.2.50",
        key_prefix,
        backend_type="vxlan",
        backend_data=VXLAN_DATA,
        notify=notes,
    ).acquire(config)
    assert mine.subnet == IPv4Network("10.6.1.0/24") and not mine.has_ttl
    assert notes.count("lease_reserved") == 1
    # Rewritten with our attributes, still without a lease (still a reservation).
    assert await asyncio.to_thread(shared_etcd.get, key) == (
        '{"PublicIP":"192.0.2.50","PublicIPv6":null,"BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    )
    assert await asyncio.to_thread(shared_etcd.lease_of, key) == 0


# -- watch ----------------------------------------------------------------------------------------


async def test_watch_reports_joins_leaves_and_our_own_deletion(
    shared_etcd: EtcdServer, key_prefix: str, connect: Connect
) -> None:
    config = await config_of(shared_etcd, key_prefix, NET16)
    m = manager(connect(shared_etcd), "192.0.2.1", key_prefix)
    own = await m.acquire(config)
    recorder = Recorder()
    task = start_watch(m, own, recorder)
    try:
        await wait_until(lambda: len(recorder.snapshots) == 1, 5, "first snapshot")
        b = await manager(connect(shared_etcd), "192.0.2.2", key_prefix).acquire(config)
        await wait_until(lambda: recorder.added(b.subnet), 5, "join event")
        assert recorder.events[-1].lease == b
        await asyncio.to_thread(shared_etcd.ctl, "del", f"{key_prefix}/subnets/{b.key}")
        await wait_until(
            lambda: recorder.events[-1] == LeaseEvent("removed", b.subnet, None), 5, "leave"
        )
        await asyncio.to_thread(shared_etcd.ctl, "del", f"{key_prefix}/subnets/{own.key}")
        with pytest.raises(LeaseLost, match="revoked"):
            await asyncio.wait_for(task, 5)
    finally:
        await stop(task)


async def test_watch_recovers_from_compaction_without_a_hot_loop(
    shared_etcd: EtcdServer, key_prefix: str, connect: Connect
) -> None:
    config = await config_of(shared_etcd, key_prefix, NET16)
    store = CountingStore(connect(shared_etcd))
    notes = Notes()
    m = manager(store, "192.0.2.1", key_prefix, notify=notes)
    own = await m.acquire(config)
    old = await asyncio.to_thread(shared_etcd.revision)
    # Two nodes join, then the history is compacted past the revision the watcher holds.
    joined = [
        await manager(connect(shared_etcd), ip, key_prefix).acquire(config)
        for ip in ("192.0.2.2", "192.0.2.3")
    ]
    now = await asyncio.to_thread(shared_etcd.revision)
    await asyncio.to_thread(shared_etcd.ctl, "compact", str(now))

    store.list_calls = 0
    recorder = Recorder()
    task = start_watch(m, own, recorder, revision=old)
    try:
        await wait_until(lambda: len(recorder.snapshots) == 1, 5, "re-list after compaction")
        assert notes.count("watch_compacted") == 1
        assert {x.subnet for x in recorder.snapshots[0]} == {x.subnet for x in joined}
        late = await manager(connect(shared_etcd), "192.0.2.4", key_prefix).acquire(config)
        await wait_until(lambda: recorder.added(late.subnet), 5, "change after the re-list")
        calls = store.list_calls
        await asyncio.sleep(2.0)
        assert store.list_calls == calls == 1, "re-listed more than once: a hot loop"
        assert notes.count("watch_compacted") == 1 and notes.count("watch_failed") == 0
        assert not task.done()
    finally:
        await stop(task)


async def test_frozen_etcd_is_noticed_within_seconds(
    own_etcd: EtcdServer, connect: Connect
) -> None:
    prefix = "/coreos.com/network"
    config = await config_of(own_etcd, prefix, NET16)
    notes = Notes()
    m = manager(connect(own_etcd), "192.0.2.1", prefix, notify=notes)
    own = await m.acquire(config)
    recorder = Recorder()
    task = start_watch(m, own, recorder)
    try:
        await wait_until(lambda: len(recorder.snapshots) == 1, 5, "first snapshot")
        own_etcd.pause()  # SIGSTOP: connections stay open, nothing answers
        frozen = time.monotonic()
        try:
            await wait_until(lambda: notes.count("watch_failed") > 0, 15, "frozen etcd noticed")
        finally:
            own_etcd.resume()
        took = (notes.first("watch_failed") or 0) - frozen
        error = next(f["error"] for _, e, f in notes.seen if e == "watch_failed")
        print(f"frozen etcd noticed by the watch after {took:.1f} s: {error}")
        assert took < 15
        # Thawed, the watch comes back and delivers what happens next.
        b = await manager(connect(own_etcd), "192.0.2.2", prefix).acquire(config)
        await wait_until(lambda: recorder.added(b.subnet), 15, "change after the thaw")
        assert not task.done()
    finally:
        await stop(task)


async def test_a_connection_whose_handshake_is_slow_is_waited_for(own_etcd: EtcdServer) -> None:
    """A new connection to an etcd that takes half a second to answer it (paused for that
    long: a loaded member, a GC pause; over TLS to a remote member the handshake alone
    takes a few round trips) must be waited for, up to the call's deadline, not cut off
    by a shorter connection-attempt limit (grpcio, which the client used before, took
    its 100 ms minimum reconnect backoff as one and never connected)."""
    registry = EtcdRegistry(parse_endpoints(own_etcd.endpoint))
    try:
        await asyncio.to_thread(own_etcd.put, "/slow-handshake/k", "v")
        own_etcd.pause()
        asyncio.get_running_loop().call_later(0.5, own_etcd.resume)
        started = time.monotonic()
        entry = await registry.get("/slow-handshake/k")
        took = time.monotonic() - started
        print(f"a connection answered after 0.5 s: the call took {took:.2f} s")
        assert entry is not None and entry.value == b"v"
    finally:
        own_etcd.resume()
        await registry.close()


async def test_a_failed_call_does_not_cut_off_the_calls_beside_it(own_etcd: EtcdServer) -> None:
    """The daemon's tasks (watch, renewals, registry probe) share one registry. When etcd
    stops answering, the first call to time out moves the registry to a new connection;
    the calls still waiting on the old one must fail as RegistryError each, by their own
    deadline. Closing the old connection under them cancelled them instead, and the
    CancelledError ended the daemon task that made the call (the daemon stopped in the
    middle of an etcd outage)."""
    registry = EtcdRegistry(parse_endpoints(own_etcd.endpoint), timeout=1.0)
    try:
        await registry.put("/cut/k", b"v", None)
        own_etcd.pause()
        first = asyncio.create_task(registry.get("/cut/k"))
        await asyncio.sleep(0.4)
        second = asyncio.create_task(registry.get("/cut/k"))
        await asyncio.wait([first, second], timeout=5)
        for name, task in (("first", first), ("second", second)):
            assert task.done(), f"the {name} call did not end by its deadline"
            assert not task.cancelled(), f"the {name} call was cancelled, not failed"
            assert isinstance(task.exception(), RegistryError), (name, task.exception())
        own_etcd.resume()
        assert (await registry.get("/cut/k")).value == b"v"  # type: ignore[union-attr]
    finally:
        own_etcd.resume()
        await registry.close()


async def test_concurrent_callers_on_a_dead_etcd_each_get_registry_error(
    own_etcd: EtcdServer,
) -> None:
    """The same with etcd killed, as in an outage (calls fail fast, so two overlap less
    often): three tasks calling for 3 s, every call must end as RegistryError. Before,
    202 of 771 calls ended cancelled, each of which would have ended a daemon task."""
    registry = EtcdRegistry(parse_endpoints(own_etcd.endpoint))
    outcomes: dict[str, int] = {}

    async def caller(until: float) -> None:
        while time.monotonic() < until:
            call = asyncio.create_task(registry.get("/dead/k"))
            await asyncio.wait([call])
            error = None if call.cancelled() else call.exception()
            kind = "cancelled" if call.cancelled() else type(error).__name__
            outcomes[kind] = outcomes.get(kind, 0) + 1
            await asyncio.sleep(0.01)

    try:
        await registry.get("/dead/k")  # connected
        await asyncio.to_thread(own_etcd.stop)  # SIGKILL
        until = time.monotonic() + 3.0
        await asyncio.gather(*(caller(until) for _ in range(3)))
    finally:
        await registry.close()
    print(f"3 callers for 3 s against a killed etcd: {outcomes}")
    assert set(outcomes) == {"RegistryError"} and outcomes["RegistryError"] > 30, outcomes


async def test_a_watch_outlives_a_call_that_timed_out_beside_it(own_etcd: EtcdServer) -> None:
    """A call that times out (etcd slow for a second: a long fsync, a loaded node) moves
    the registry's calls to a new connection, but the watch stream is fine and must go
    on: it has a connection of its own. Before, the timed-out call closed the shared
    connection and with it the stream, and every node logged watch_failed and re-listed
    for one slow call."""
    registry = EtcdRegistry(parse_endpoints(own_etcd.endpoint), timeout=1.0)
    delivered: asyncio.Queue[Any] = asyncio.Queue()
    revision = await asyncio.to_thread(own_etcd.revision)

    async def consume() -> None:
        try:
            async for events in registry.watch("/slow/", revision + 1):
                for event in events:
                    await delivered.put(event.key)
            await delivered.put("the stream ended")
        except Exception as e:  # noqa: BLE001 - reported through the queue
            await delivered.put(e)

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.sleep(0.5)  # the watch is created
        await asyncio.to_thread(own_etcd.put, "/slow/a", "1")
        assert await asyncio.wait_for(delivered.get(), 5) == "/slow/a"
        own_etcd.pause()
        try:
            with pytest.raises(RegistryError):
                await registry.get("/slow/a")
        finally:
            own_etcd.resume()
        await asyncio.to_thread(own_etcd.put, "/slow/b", "2")
        assert await asyncio.wait_for(delivered.get(), 5) == "/slow/b"
        assert delivered.empty() and not consumer.done()
        await registry.close()  # ends the stream too: a watch is not left running
        assert await asyncio.wait_for(delivered.get(), 5) == "the stream ended"
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await registry.close()


async def test_watch_resumes_after_etcd_is_killed_and_restarted(
    own_etcd: EtcdServer, connect: Connect
) -> None:
    prefix = "/coreos.com/network"
    config = await config_of(own_etcd, prefix, NET16)
    notes = Notes()
    m = manager(connect(own_etcd), "192.0.2.1", prefix, notify=notes)
    own = await m.acquire(config)
    recorder = Recorder()
    task = start_watch(m, own, recorder)
    try:
        await wait_until(lambda: len(recorder.snapshots) == 1, 5, "first snapshot")
        await asyncio.to_thread(own_etcd.stop)  # SIGKILL
        await wait_until(lambda: notes.count("watch_failed") > 0, 5, "broken stream noticed")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_etcd.start)  # same port, same data dir
        b = await manager(connect(own_etcd), "192.0.2.2", prefix).acquire(config)
        took = await wait_until(lambda: recorder.added(b.subnet), 15, "change after restart")
        print(f"change after the etcd restart delivered in {took:.1f} s")
        assert not task.done()
        assert len(recorder.snapshots) == 1  # resumed from its revision, no re-list needed
    finally:
        await stop(task)
