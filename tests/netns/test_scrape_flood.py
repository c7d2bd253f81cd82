"""The health port under hostile load (issue 18 item 2), on a real 2-node udp testbed
with iperf3 between pods: a flood of /metrics scrapes from an address on the underlay,
one new connection each, must leave the dataplane its throughput and the liveness probe
its answers; connections held open must not take the daemon's file descriptors."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from bench.scrape_flood import HEALTH_PORT, attacker, daemon_pid, flood_bed, measure
from bench.soak import proc_sample
from overlay.lab.http_flood import flooding
from overlay.lab.netns import log_tail, pid_alive, pid_cmdline
from overlay.lab.testbed import Testbed
from overlay.observe.health_server import Limits
from tests.helpers.testbed import node_status

pytestmark = pytest.mark.netns

RATE = 1000  # GET /metrics per second, as in the issue
PROBE_BOUND_MS = 100  # what a liveness probe may wait (the goal)
KEPT = 0.8  # of the quiet throughput, at least, under the flood
FD_LIMIT = 1024  # the soft RLIMIT_NOFILE systemd gives a service
HELD = 1500  # connections held open at once, more than FD_LIMIT


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    tb = flood_bed("sf" + uuid.uuid4().hex[:6])
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def test_a_scrape_flood_leaves_the_dataplane_and_the_liveness_probe_alone(bed: Testbed) -> None:
    # n1's daemon is the busier one (it segments the sender's super-packets): flood it.
    run = measure(bed, "n1", RATE, rounds=3, seconds=4)
    report = "\n".join(run.lines())
    print(report)
    probe, flood = run.probe, run.flood
    assert probe.started >= 90 and probe.answered == probe.started, report
    assert probe.percentile(99) < PROBE_BOUND_MS, report
    assert run.kept >= KEPT, report
    assert flood.answered >= 0.99 * flood.started, report  # the scrapes are served too
    # Nothing kept: the flood's 30,000 connections left no fd and little memory.
    assert run.after["fds"] <= run.before["fds"] + 1, report
    assert run.after["rss_kib"] - run.before["rss_kib"] < 8 * 1024, report


def test_held_connections_cannot_take_the_daemons_file_descriptors(bed: Testbed) -> None:
    """1500 requests that never end (slowloris), from the underlay, against a daemon
    with systemd's 1024 fds: at most Limits.max_connections of them are ours at a time,
    the probe and `overlay status` still answer, and the daemon lives on."""
    pid = daemon_pid(bed, "n2")
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={FD_LIMIT}:{FD_LIMIT}"], check=True)
    before = proc_sample(pid)
    url = f"http://{bed.node_ip(2)}:{HEALTH_PORT}/healthz"
    probe_url = f"http://127.0.0.1:{HEALTH_PORT}/healthz"
    fds = []
    with attacker(bed):
        with flooding(
            None, bed.underlay_ns, url, 1000, 6, in_flight=HELD, timeout=30, partial=True
        ) as held:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and _alive(pid):
                fds.append(proc_sample(pid)["fds"])
                time.sleep(0.1)
            assert _alive(pid), f"n2's daemon died: {log_tail(bed.log_file(2), 5)}"
            with flooding(bed, "n2", probe_url, 10, 1) as probe:
                time.sleep(1.3)
            assert _alive(pid), f"n2's daemon died: {log_tail(bed.log_file(2), 5)}"
            status = node_status(bed, "n2")
    time.sleep(1.5)  # the held ones are closed by now
    assert max(fds) <= before["fds"] + Limits().max_connections + 4, (before, max(fds))
    assert held and held[0].started >= HELD, held[0].summary() if held else held
    assert probe and probe[0].answered == probe[0].started >= 8, probe
    assert probe[0].percentile(100) < PROBE_BOUND_MS, probe[0].summary()
    assert status["state"] == "running"
    assert status["health_server"]["evicted"] >= HELD - Limits().max_connections  # counted
    assert proc_sample(pid)["fds"] <= before["fds"] + 1


def _alive(pid: int) -> bool:
    return pid_alive(pid) and "overlay" in " ".join(pid_cmdline(pid))
