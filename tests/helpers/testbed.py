"""Asking a running namespace testbed (overlay.lab.testbed): what a node says on its
status socket, and a ping between two pods for as long as a block runs."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def node_status(bed: Any, node: str | int) -> dict[str, Any]:
    """What node ``node`` ("n1", or 1) of a testbed says on its status socket."""
    from overlay.observe import status_socket as status

    name = f"n{node}" if isinstance(node, int) else node
    result: dict[str, Any] = status.query(bed.state_dir / name / "status.sock")
    return result


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
