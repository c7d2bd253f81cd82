"""What the observation tests share: /metrics read back as samples, an `overlay trace`
started and attached, and a tap that records what a dataplane shows it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from overlay.observe import metrics
from tests.helpers.commands import overlay_cmd

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metric_samples(snapshot: dict[str, Any]) -> Samples:
    """/metrics as the daemon renders it from a status snapshot, parsed back by
    prometheus-client's own parser: (name, sorted labels) -> value."""
    text = metrics.render(snapshot).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def start_trace(status_socket: str | Path, *args: str) -> subprocess.Popen[bytes]:
    """`overlay trace` on a daemon's status socket, returned once it is attached (its
    "capturing on" line read: nothing is missed from then on)."""
    proc = subprocess.Popen(
        overlay_cmd("trace", "--status-socket", str(status_socket), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    assert "capturing on" in line, line
    return proc


class TapRecorder:
    """A Tap (overlay.observe.tap) that keeps what it is shown, copied (buffers are only
    valid in the call)."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def inner(self, direction: str, packet: Any) -> None:
        self.seen.append(("inner", direction, bytes(packet)))

    def outer(self, direction: str, datagram: Any, peer: tuple[str, int]) -> None:
        self.seen.append(("outer", direction, bytes(datagram), peer))

    def drop(self, reason: str, data: Any, peer: tuple[str, int] | None) -> None:
        self.seen.append(("drop", reason, bytes(data), peer))
