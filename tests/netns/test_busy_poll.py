"""`overlay run --busy-poll-us N` on a real namespace testbed: pods ping and transfer
byte-identical through daemons that busy-poll after each wake-up (udp; userspace vxlan
with --workers 2, so the window reaches a worker process through its spec), the status
says so, and an idle daemon burns nothing (the poll runs only after a wake-up)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from bench.measure import cpu_seconds
from overlay.lab.testbed import Testbed
from overlay.lab.transfer import transfer
from tests.helpers.testbed import node_status, pings_answered

pytestmark = pytest.mark.netns

WINDOW_US = 200


@pytest.fixture(
    scope="module",
    params=[("udp", ()), ("vxlan", ("--workers", "2"))],
    ids=["udp", "vxlan-workers2"],
)
def bed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    backend, extra = request.param
    tb = Testbed(
        "bp" + uuid.uuid4().hex[:6],
        nodes=2,
        pods_per_node=1,
        backend=backend,
        registry="file",
        daemon_args=("--busy-poll-us", str(WINDOW_US), *extra),
    )
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def test_status_shows_the_window(bed: Testbed) -> None:
    for node in ("n1", "n2"):
        assert node_status(bed, node)["busy_poll_us"] == WINDOW_US


def test_pods_ping_and_transfer_byte_identical(bed: Testbed) -> None:
    pings_answered(bed, "n1-p1", "n2-p1", count=20, interval=0.01)
    pings_answered(bed, "n2-p1", "n1-p1", count=20, interval=0.01)
    transfer(bed, "n1-p1", "n2-p1", 30 * 1024 * 1024)
    transfer(bed, "n2-p1", "n1-p1", 30 * 1024 * 1024, port=5202)


def test_an_idle_daemon_does_not_poll(bed: Testbed) -> None:
    """No traffic, no wake-ups, no polling: each daemon (with its workers) uses under 5%
    of a core over 2 s (a window polled continuously would be ~100%)."""
    pids = {n["name"]: n["pid"] for n in bed.status()["nodes"]}
    time.sleep(0.5)  # whatever the previous test left in flight
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(2.0)
    used = {name: (cpu_seconds(pid) - before[name]) / 2.0 for name, pid in pids.items()}
    assert all(share < 0.05 for share in used.values()), used
