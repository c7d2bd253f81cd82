"""The lab end to end: a bed from a topology file (two segments behind a router, userspace
and kernel vxlan, a 3-member etcd) where every pod reaches every other, and a fault script
run with `overlay testbed fault` against a bed under traffic, whose event log is checked
against what the daemons counted and logged."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from overlay.lab.testbed import Testbed
from overlay.lab.topology import load_topology
from tests.helpers.paths import ROOT
from tests.helpers.polling import poll
from tests.helpers.testbed import daemon_log, node_status, pinging
from tests.helpers.testbed import testbed_cli as run_testbed_cli

pytestmark = pytest.mark.netns


def must_run(*args: str) -> subprocess.CompletedProcess[str]:
    """`overlay testbed ...` as a user's script runs it, which must succeed."""
    proc = run_testbed_cli(*args)
    assert proc.returncode == 0, f"overlay testbed {' '.join(args)}: {proc.stderr}"
    return proc


def reaches(bed: Testbed, source: str, target: str) -> bool:
    proc = bed.exec(
        source,
        ["ping", "-c", "1", "-W", "1", bed.pod_ip(target)],
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def test_two_segment_file_every_pod_reaches_every_other() -> None:
    example = ROOT / "examples" / "two-segments.yaml"
    topology = load_topology(example.read_text(), example.name)
    with Testbed.from_topology(topology, "t" + uuid.uuid4().hex[:6]) as bed:
        bed.up()
        status = bed.status()
        assert [n["segment"] for n in status["nodes"]] == ["a", "a", "b", "b"]
        assert [n["backend"] for n in status["nodes"]] == [
            "vxlan-user",
            "vxlan-kernel",
            "vxlan-user",
            "vxlan-kernel",
        ]
        assert len(status["etcd_endpoints"]) == 3 and status["router"] == f"{bed.prefix}-rt"
        pods = [p["name"] for p in status["pods"]]
        pairs = list(itertools.permutations(pods, 2))
        unreached = [
            (a, b) for a, b in pairs if not poll(lambda a=a, b=b: reaches(bed, a, b), 10, 0.2)
        ]
        assert unreached == [], f"{len(unreached)} of {len(pairs)} pod pairs unreached"


# -- a fault script against a bed under traffic ---------------------------------------------


@pytest.fixture
def bed() -> Iterator[Testbed]:
    made = Testbed("t" + uuid.uuid4().hex[:6], nodes=3, pods_per_node=1, registry="etcd")
    with made:
        made.up()
        yield made


def peer_counters(bed: Testbed, i: int, j: int) -> dict[str, int]:
    """Node i's counters for node j (tx_packets, rx_packets), from its status socket."""
    subnet = bed.subnet_of(j)
    (row,) = [p for p in node_status(bed, i)["peers"] if p["subnet"] == subnet]
    return {"tx": int(row["tx_packets"]), "rx": int(row["rx_packets"])}


def unix(stamp: str) -> float:
    """A daemon log line's ISO 8601 timestamp as Unix time."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_fault_script_event_log_agrees_with_the_daemons(bed: Testbed) -> None:
    """link down 5 s, etcd frozen 10 s, a node killed (-9) and started, all while n1-p1
    pings n2-p1 every 0.2 s; then the event log beside the counters and the logs."""
    prefix = ("--prefix", bed.prefix)
    assert poll(lambda: reaches(bed, "n1-p1", "n2-p1"), 10, 0.2)
    before = (peer_counters(bed, 1, 2), peer_counters(bed, 2, 1))
    n3 = {"pid": bed.status()["nodes"][2]["pid"], "subnet": bed.subnet_of(3)}
    with pinging(bed, "n1-p1", "n2-p1") as pings:
        time.sleep(1.0)
        must_run("fault", "link", "down", "n2", "--for", "5", *prefix)
        time.sleep(2.0)
        must_run("fault", "etcd", "freeze", "--for", "10", *prefix)
        must_run("fault", "node", "kill", "n3", *prefix)
        must_run("fault", "node", "start", "n3", *prefix)
        time.sleep(2.0)
    time.sleep(0.5)
    after = (peer_counters(bed, 1, 2), peer_counters(bed, 2, 1))
    listed = must_run("events", "--json", *prefix).stdout
    events = [json.loads(line) for line in listed.splitlines()]
    names = [e["event"] for e in events]
    assert names == [
        "up",
        "link_down",
        "link_up",
        "etcd_freeze",
        "etcd_thaw",
        "node_kill",
        "node_start",
    ], names
    at = {e["event"]: e for e in events}

    # The link: down for 5 s; what n1 sent n2 and n2 never received is what ping lost.
    assert 5.0 <= at["link_up"]["unix"] - at["link_down"]["unix"] < 6.5
    sent_to_n2 = after[0]["tx"] - before[0]["tx"]
    received_by_n2 = after[1]["rx"] - before[1]["rx"]
    never_arrived = sent_to_n2 - received_by_n2
    assert 20 <= never_arrived <= 32, (sent_to_n2, received_by_n2)
    assert abs(len(pings.lost) - never_arrived) <= 1, (pings.lost, never_arrived)

    # etcd frozen 10 s: n1 noticed while it was frozen and recovered after. n2 may have
    # noticed already with its cable out (its keepalive ping unanswered for 3 s): its
    # watch failed between link_down and etcd_thaw, and is back after the thaw.
    assert 10.0 <= at["etcd_thaw"]["unix"] - at["etcd_freeze"]["unix"] < 11.5
    for i, since in ((1, "etcd_freeze"), (2, "link_down")):
        watch = [e for e in daemon_log(bed, i) if e.get("event", "").startswith("watch_")]
        assert watch and watch[0]["event"] == "watch_failed", watch
        failed, recovered = unix(watch[0]["timestamp"]), unix(watch[-1]["timestamp"])
        assert at[since]["unix"] < failed < at["etcd_thaw"]["unix"], (i, watch)
        assert watch[-1]["event"] == "watch_recovered" and recovered > at["etcd_thaw"]["unix"]

    # n3 killed and started: the event's pids are the daemons', the lease is kept, and
    # the new daemon started between the two events.
    assert at["node_kill"]["pid"] == n3["pid"] and at["node_start"]["pid"] != n3["pid"]
    assert at["node_start"]["subnet"] == n3["subnet"] == bed.subnet_of(3)
    started = node_status(bed, 3)["started_at"]
    assert at["node_kill"]["unix"] < started <= at["node_start"]["unix"]
    assert bed.status()["nodes"][2]["pid"] == at["node_start"]["pid"]
    assert poll(lambda: reaches(bed, "n1-p1", "n3-p1"), 10, 0.2)
    assert Path(bed.events.path).stat().st_mode & 0o777 == 0o600
