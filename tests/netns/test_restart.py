"""A TCP stream through a node survives `overlay run` being stopped and started again
(udp and userspace vxlan): the daemon comes back with the same lease, a new TUN, its
routes; the stream stalls for the gap and then carries on, byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from overlay.lab.testbed import Testbed
from tests.helpers.paths import ROOT
from tests.helpers.polling import poll
from tests.helpers.testbed import node_status

pytestmark = pytest.mark.netns
STREAM = str(ROOT / "tests" / "helpers" / "stream.py")
SECONDS = 6.0  # the stream's length; the restart happens 2 s in
RATE = 4 * 1024 * 1024  # bytes/s: paced, so the stream is running when the daemon stops


@pytest.fixture(scope="module", params=["udp", "vxlan"])
def bed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    tb = Testbed(
        "s" + uuid.uuid4().hex[:7],
        nodes=2,
        pods_per_node=1,
        backend=request.param,
        registry="file",
    )
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def started_events(bed: Testbed, i: int) -> int:
    count = 0
    for line in bed.log_file(i).read_text(errors="replace").splitlines():
        try:
            count += json.loads(line).get("event") == "started"
        except ValueError:
            pass
    return count


@pytest.mark.parametrize("node", [1, 2], ids=["sender-node", "receiver-node"])
def test_tcp_stream_survives_a_daemon_restart(bed: Testbed, node: int) -> None:
    lease = node_status(bed, node)["lease"]
    address = bed.pod_ip("n2-p1")
    port = 7100 + node
    server = bed.popen(
        "n2-p1",
        [sys.executable, STREAM, "server", address, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = bed.popen(
            "n1-p1",
            [sys.executable, STREAM, "client", address, str(port), str(SECONDS), str(RATE)],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        assert client.poll() is None, "the stream ended before the restart"
        before = started_events(bed, node)
        proc = bed._procs[node]
        stopped_at = time.monotonic()
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        stop_took = time.monotonic() - stopped_at
        bed.start_daemon(node)
        assert poll(lambda: started_events(bed, node) > before, timeout=15, every=0.02)
        down = time.monotonic() - stopped_at
        out, _ = client.communicate(timeout=SECONDS + 60)
        assert client.returncode == 0, out
        sent = out.split()
        received = server.stdout.readline().split()
        assert received[:2] == sent, f"sent {sent}, received {received}"
        gap = float(received[2])
        print(
            f"{bed.backend} restart of n{node}: SIGTERM -> exit {stop_took * 1000:.0f} ms, "
            f"daemon down {down:.2f} s, longest pause in the stream {gap:.2f} s, "
            f"{int(sent[0]) / 1e6:.0f} MB intact"
        )
        assert gap < 15, "the stream stalled far longer than the daemon was down"
    finally:
        server.kill()
        server.wait()
    same = ("subnet", "public_ip", "key")  # the renewal time moves on; the lease is kept
    after = node_status(bed, node)["lease"]
    assert {k: after[k] for k in same} == {k: lease[k] for k in same}
