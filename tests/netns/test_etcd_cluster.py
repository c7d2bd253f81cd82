"""A 3-member etcd cluster on the testbed's underlay (`overlay testbed up --etcd-members 3`),
every daemon given all three endpoints, as an operator runs flanneld against a real
cluster: one member killed under traffic (the one the daemons talk to first), then the
whole cluster stopped and started again. Forwarding goes on throughout, the registry
keeps working through the members left, and every lease is kept."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from overlay.lab.testbed import Testbed
from tests.helpers.paths import ROOT
from tests.helpers.polling import poll
from tests.helpers.testbed import node_status, pinging

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (`make setup`)"),
]

SUBNETS = "/coreos.com/network/subnets/"


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with Testbed(
        "c" + uuid.uuid4().hex[:7], nodes=3, pods_per_node=1, registry="etcd", etcd_members=3
    ) as tb:
        tb.up()
        yield tb


def leases(bed: Testbed, endpoint: str | None = None) -> dict[str, tuple[str, int]]:
    """Every lease key: (value, etcd lease ID), read from one member or any."""
    out = bed.etcd.etcdctl(
        "get", SUBNETS, "--prefix", "-w", "json", endpoints=[endpoint] if endpoint else None
    ).stdout
    found = {}
    for kv in json.loads(out).get("kvs", []):
        key = base64.b64decode(kv["key"]).decode()
        found[key] = (base64.b64decode(kv["value"]).decode(), int(kv.get("lease", 0)))
    return found


def events_since(bed: Testbed, i: int, skip: int) -> list[dict[str, Any]]:
    events = []
    for line in bed.log_file(i).read_text(errors="replace").splitlines()[skip:]:
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"event": line})
    return events


def peers(bed: Testbed, i: int) -> set[str]:
    try:
        return {p["subnet"] for p in node_status(bed, i)["peers"]}
    except OSError:
        return set()


def test_members_and_endpoints(bed: Testbed) -> None:
    members = bed.etcd.etcdctl("member", "list", "-w", "json").stdout
    assert len(json.loads(members)["members"]) == 3
    assert len(bed.etcd.endpoints) == 3
    argv = bed.daemon_argv(1)
    assert argv[argv.index("--etcd-endpoints") + 1] == ",".join(bed.etcd.endpoints)


def test_a_member_killed_then_the_whole_cluster_restarted_under_traffic(bed: Testbed) -> None:
    kept = leases(bed)
    assert len(kept) == 3
    logged = {i: len(bed.log_file(i).read_text().splitlines()) for i in (1, 2, 3)}
    with pinging(bed, "n1-p1", "n3-p1") as pings:
        time.sleep(1.0)
        # 1. The member every daemon talks to first dies: the others hold the quorum.
        bed.etcd.stop(1)
        k = bed.add_node()  # its lease is written through a member left
        joined = bed.status()["nodes"][k - 1]["subnet"]
        for i in (1, 2, 3):
            assert poll(lambda i=i: joined in peers(bed, i), 30), (
                f"n{i} did not see n{k}: {events_since(bed, i, logged[i])[-12:]}"
            )
        assert leases(bed, bed.etcd.endpoints[1]).keys() >= kept.keys()
        bed.etcd.start(1)
        # 2. The whole cluster down, then up again from its data dirs.
        bed.etcd.stop()
        time.sleep(6.0)
        bed.etcd.start()
        for i in (1, 2, 3):
            assert poll(
                lambda i=i: any(
                    e.get("event") == "watch_recovered"
                    for e in events_since(bed, i, logged[i])[-50:]
                ),
                20,
            ), f"n{i} did not reconnect: {events_since(bed, i, logged[i])[-5:]}"
        time.sleep(1.0)
    sent, received = pings.sent, pings.received
    print(f"through a member kill and a cluster restart: {sent} pings, {received} answered")
    tails = {i: events_since(bed, i, logged[i])[-4:] for i in (1, 3)}
    assert sent >= 40 and received >= sent * 0.95, f"lost icmp_seq {pings.lost}; n1, n3: {tails}"
    # Every lease kept: same keys, same values, same etcd leases (nothing re-created).
    after = leases(bed)
    for key, (value, lease_id) in kept.items():
        assert after[key] == (value, lease_id), key
    for i in (1, 2, 3, k):
        assert bed.status()["nodes"][i - 1]["running"]
        assert not [e for e in events_since(bed, i, logged.get(i, 0)) if e.get("level") == "fatal"]
    # And the registry works for changes again: a lease deleted is seen by every node.
    victim = f"{SUBNETS}{joined.replace('/', '-')}"
    bed.etcd.etcdctl("del", victim)
    for i in (1, 2, 3):
        assert poll(lambda i=i: joined not in peers(bed, i), 15), f"n{i} kept a deleted peer"


WATCHER = textwrap.dedent(
    """
    import asyncio, sys
    from control.etcd_endpoints import parse_endpoints
    from control.etcd_registry import EtcdRegistry
    from control.kv import RegistryError

    async def main(endpoint, prefix, patience):
        registry = EtcdRegistry(parse_endpoints(endpoint))
        try:
            _, revision = await registry.list_prefix(prefix)

            async def consume():
                async for _ in registry.watch(prefix, revision + 1):
                    pass

            stream = asyncio.create_task(consume())
            await asyncio.sleep(1.0)
            print("watching", flush=True)
            try:
                await asyncio.wait_for(stream, patience)
                print("the stream ended", flush=True)
            except RegistryError as e:
                print(f"failed: {e}", flush=True)
            except TimeoutError:
                print("still watching", flush=True)
        finally:
            await registry.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
    """
)


def test_a_watch_on_a_member_cut_off_from_the_quorum_fails(bed: Testbed) -> None:
    """The other two members frozen: the one left has no leader and sees no more writes,
    but still answers keepalive pings. A watch stream on it must fail ("no leader", as
    flanneld's WithRequireLeader watch does), so the watch moves to another member and
    the outage is reported, instead of staying open and silent for as long as it lasts."""
    watcher = subprocess.Popen(
        ["ip", "netns", "exec", bed.underlay_ns, sys.executable, "-c", WATCHER]
        + [bed.etcd.endpoints[0], SUBNETS, "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "watching"
        frozen = time.monotonic()
        bed.etcd.freeze(2)
        bed.etcd.freeze(3)
        try:
            outcome = watcher.stdout.readline().strip()
            took = time.monotonic() - frozen
        finally:
            bed.etcd.thaw(2)
            bed.etcd.thaw(3)
        print(f"a watch on a member without a quorum: {outcome!r} after {took:.1f} s")
        assert outcome.startswith("failed:") and "no leader" in outcome, outcome
    finally:
        watcher.kill()
        watcher.wait()
    assert poll(lambda: bed.etcd.etcdctl("endpoint", "health", check=False).returncode == 0, 20)
