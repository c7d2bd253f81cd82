"""Shared fixtures: a unique name prefix per run, and network namespaces that always go away."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from overlay.lab.transfer import transfer, udp_transfer  # noqa: F401 - shared by the tests

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def _netns_capable() -> str | None:
    """Why netns tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, TUN)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs iproute2 (`make setup` installs it)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _netns_capable()
    if reason is None:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI must run the netns tests, but this machine {reason}")
    for item in items:
        if "netns" in item.keywords or "underlay" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def prefix() -> str:
    """A name prefix unique to this test (<= 8 chars, [a-z0-9]) so runs never collide."""
    return "t" + uuid.uuid4().hex[:7]


@pytest.fixture
def netns(prefix: str) -> Iterator[Callable[[str], str]]:
    """Factory: netns("a") creates namespace "<prefix>-a" (lo up); all deleted afterwards."""
    made: list[str] = []

    def make(suffix: str) -> str:
        name = f"{prefix}-{suffix}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    yield make
    for name in reversed(made):
        for pid in subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True
        ).stdout.split():
            subprocess.run(["kill", "-9", pid], check=False)
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def underlay() -> Iterator[Any]:
    """Our node's network namespace and the peers', joined by a veth pair (tests/wire.py);
    one per test module, removed afterwards."""
    from tests.wire import Underlay

    made = Underlay("t" + uuid.uuid4().hex[:7])
    yield made
    made.close()


@pytest.fixture
def wires(underlay: Any) -> Iterator[Callable[..., Any]]:
    """Factory: wires(port=8285) opens the dataplane's socket and the peers' on the
    underlay (tests/wire.py); all closed afterwards."""
    from tests.wire import Wire

    opened: list[Wire] = []

    def make(*args: Any, **kwargs: Any) -> Wire:
        opened.append(Wire(underlay, *args, **kwargs))
        return opened[-1]

    yield make
    for w in opened:
        w.close()


@pytest.fixture
def daemons() -> Iterator[Callable[..., Any]]:
    """Factory: daemons(ns, tmp_path, *flags) starts `overlay run` in ns
    (tests/single_daemon.py); every one is killed afterwards."""
    from tests.single_daemon import Daemon

    started: list[Daemon] = []

    def start(*args: Any, **kwargs: Any) -> Daemon:
        daemon = Daemon(*args, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


FATAL_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \[fatal    \] (?P<text>overlay run: error: .*?)"
    r"(?: node=(?P<node>\S+))?$"
)


def fatal_text(line: str) -> str:
    """The ``overlay run: error: ...`` of a console fatal line, which must carry the
    timestamp and the level like every other line (and the node, once it is known)."""
    match = FATAL_LINE.match(line)
    assert match, f"not a stamped fatal line: {line!r}"
    return match["text"]


def overlay_cmd(*args: str) -> list[str]:
    return [PYTHON, "-m", "overlay", *args]


def node_status(bed: Any, node: str | int) -> dict[str, Any]:
    """What node ``node`` ("n1", or 1) of a testbed says on its status socket."""
    from overlay.observe import status_socket as status

    name = f"n{node}" if isinstance(node, int) else node
    result: dict[str, Any] = status.query(bed.state_dir / name / "status.sock")
    return result


def poll(check: Callable[[], Any], timeout: float = 5.0, every: float = 0.05) -> Any:
    """check()'s first truthy result within timeout, else its last (falsy) one."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)


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
