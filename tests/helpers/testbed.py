"""A namespace testbed (overlay.lab.testbed) for a test module, and asking it: what a node
says on its status socket and its health server, a ping between two pods for as long as a
block runs, and a burst of pings with every round trip time."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from overlay.lab.testbed import Testbed
from tests.helpers.commands import PYTHON
from tests.helpers.paths import ROOT

HEALTH_PORT = 9100  # --healthz-port of the testbeds that serve /metrics
HTTP_GET = (  # a GET from inside a node: the status code on the first line, then the body
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    r = urllib.request.urlopen(sys.argv[1], timeout=5); code, body = r.status, r.read()\n"
    "except urllib.error.HTTPError as e:\n"
    "    code, body = e.code, e.read()\n"
    "sys.stdout.write(f'{code}\\n' + body.decode())\n"
)


def two_nodes(name: str, **kwargs: Any) -> Iterator[Testbed]:
    """A 2-node testbed on the file registry, named ``name`` and a random suffix, for a
    module fixture to yield from: up until the generator is closed, then down (also
    after a failure)."""
    tb = Testbed(name + uuid.uuid4().hex[:6], nodes=2, registry="file", **kwargs)
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def node_status(bed: Any, node: str | int) -> dict[str, Any]:
    """What node ``node`` ("n1", or 1) of a testbed says on its status socket."""
    from overlay.observe import status_socket as status

    name = f"n{node}" if isinstance(node, int) else node
    result: dict[str, Any] = status.query(bed.state_dir / name / "status.sock")
    return result


def health_get(bed: Any, node: str, path: str) -> tuple[int, str]:
    """An HTTP GET of the node's health server, from inside the node."""
    url = f"http://127.0.0.1:{HEALTH_PORT}{path}"
    result = bed.exec(
        node, [PYTHON, "-c", HTTP_GET, url], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    code, _, body = result.stdout.partition("\n")
    return int(code), body


def scrape(bed: Any, node: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """/metrics parsed by prometheus-client's own parser: sample name -> labels -> value."""
    code, body = health_get(bed, node, "/metrics")
    assert code == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def ping_rtts(
    bed: Any, source: str, target_ip: str, count: int, interval: float = 0.01
) -> tuple[int, list[float]]:
    """(pings sent, the round trip time of every reply in ms) from node or pod ``source``."""
    result = bed.exec(
        source,
        ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", target_ip],
        capture_output=True,
        text=True,
        timeout=count * interval + 30,
    )
    sent = re.search(r"(\d+) packets transmitted", result.stdout)
    assert sent, f"ping {source} -> {target_ip}: {result.stdout[-300:]} {result.stderr[-300:]}"
    return int(sent[1]), [float(m) for m in re.findall(r"time=([\d.]+) ms", result.stdout)]


def pings_answered(
    bed: Any, source_pod: str, target_pod: str, count: int = 3, interval: float = 0.2
) -> None:
    """``count`` pings from one pod to another, every one answered."""
    result = bed.exec(
        source_pod,
        ["ping", "-c", str(count), "-i", str(interval), "-W", "2", bed.pod_ip(target_pod)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and " 0% packet loss" in result.stdout, result.stdout


@dataclass
class Pings:
    """What a background ping saw: filled in when its block ends."""

    sent: int = 0
    received: int = 0
    lost: list[int] = field(default_factory=list)  # the icmp_seq never answered
    output: str = ""


@contextmanager
def pinging(bed: Any, source_pod: str, target_pod: str) -> Iterator[Pings]:
    """ping -i 0.2 from one pod to another for as long as the block runs (stopped with
    SIGINT, so it prints its summary, also when the block fails)."""
    ping = bed.popen(
        source_pod,
        ["ping", "-i", "0.2", "-W", "1", bed.pod_ip(target_pod)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pings = Pings()
    try:
        yield pings
    finally:
        ping.send_signal(signal.SIGINT)
        pings.output, _ = ping.communicate(timeout=10)
        counts = re.search(r"(\d+) packets transmitted, (\d+) received", pings.output)
        if counts:  # else sent stays 0, which the caller's check reports
            pings.sent, pings.received = int(counts[1]), int(counts[2])
        answered = {int(n) for n in re.findall(r"icmp_seq=(\d+) ", pings.output)}
        pings.lost = sorted(set(range(1, pings.sent + 1)) - answered)


def testbed_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`overlay testbed ...` in its own process, as a user or a script runs it."""
    return subprocess.run(
        [sys.executable, "-m", "overlay", "testbed", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def daemon_log(bed: Any, i: int) -> list[dict[str, Any]]:
    """Node i's daemon log lines (run with --log-format json), decoded; others skipped."""
    events = []
    for line in bed.log_file(i).read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events
