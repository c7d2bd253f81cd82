"""The bed's event log: one JSON line per thing done to the bed (up, each fault and its
undoing), with the time it was done, so a script or a test can line up what it did with
what the daemons counted and logged.

Each line: ``{"time": "2026-12-07T07:12:03.123456Z", "unix": 1796627523.123456,
"event": "link_down", "node": "n2", ...}``. Lines are appended with one ``write`` on a
file opened O_APPEND, so two commands recording at once never interleave within a line.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event, stamped now; returns what was written."""
        now = time.time()
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        entry = {"time": stamp, "unix": round(now, 6), "event": event, **fields}
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return entry

    def read(self) -> list[dict[str, Any]]:
        """Every event so far, oldest first (none when the bed has no log yet); a line
        cut short by a crash is skipped."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        events = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                events.append(entry)
        return events
