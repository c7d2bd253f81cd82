"""``python -m bench.scale`` at a small scale: it runs (main's failed at its imports:
``from pyroute2 import IPRoute`` after tun.rtnl had entered pyroute2 without its
``__init__``), measures every phase with the scrape loop in a process of its own, and
leaves no namespace behind."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from overlay.lab.netns import list_netns


@pytest.mark.netns
def test_a_small_scale_run_measures_every_phase(tmp_path: Path) -> None:
    from bench import scale  # here: an import error fails this test, not the collection

    prefix = "tsc" + uuid.uuid4().hex[:5]
    argv = ["--leases", "30", "--churn", "30", "--live", "2", "--prefix", prefix]
    assert scale.main([*argv, "--json", str(tmp_path / "f.json")]) == 0
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["known_s"] > 0 and figures["rss_end_mb"] > 0
    assert len(figures["status_socket_ms"]) == 3 and figures["metrics_bytes"] > 0
    assert figures["ping_idle_us"][1] > 0 and figures["ping_scraped_us"][1] > 0
    assert figures["scrapes_during_ping"] > 0  # the loop in its own process ran
    sent, answered = figures["churn_pings"]
    assert answered > 0 and figures["churn_no_route"] == 0
    assert [ns for ns in list_netns() if ns.startswith(prefix)] == []
