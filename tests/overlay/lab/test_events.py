"""The bed's event log (overlay.lab.events): stamped JSON lines, 0600, a torn line skipped."""

from __future__ import annotations

import time
from pathlib import Path

from overlay.lab.events import EventLog


def test_events_are_stamped_appended_and_read_back(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    assert log.read() == []
    before = time.time()
    first = log.record("link_down", node="n2")
    log.record("link_up", node="n2")
    with open(log.path, "a") as torn:
        torn.write('{"event": "node_ki')  # a writer killed mid-line
    events = log.read()
    assert [e["event"] for e in events] == ["link_down", "link_up"]
    assert events[0] == first and before <= first["unix"] <= events[1]["unix"] <= time.time()
    assert first["time"].endswith("Z") and first["time"][:4] == time.strftime("%Y")
    assert log.path.stat().st_mode & 0o777 == 0o600
