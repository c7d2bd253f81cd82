"""`overlay testbed scale` at a small scale (200 leases, 50 changes): the scale probe as a
command, run as a user would, prints every figure, writes the same ones as JSON, and
leaves no namespace behind."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from overlay.lab.netns import list_netns
from tests.helpers.testbed import testbed_cli as run_testbed_cli

LINES = (
    "all peers known",
    "status socket answer",
    "`overlay status` command",
    "/metrics scrape",
    "ping p50/p99 idle",
    "ping p50/p99 scraped",
    "churn applied",
    "live peers during churn",
    "RSS at the end",
)


@pytest.mark.netns
def test_the_probe_runs_as_a_testbed_command(tmp_path: Path) -> None:
    prefix = "tts" + uuid.uuid4().hex[:5]
    out = tmp_path / "figures.json"
    argv = ["--leases", "200", "--churn", "50", "--live", "2", "--pings", "50"]
    proc = run_testbed_cli("scale", *argv, "--prefix", prefix, "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    for line in LINES:
        assert line in proc.stdout, f"{line!r} missing from:\n{proc.stdout}"
    figures = json.loads(out.read_text())
    assert figures["command"].startswith("overlay testbed scale --leases 200")
    assert figures["leases"] == 200 and figures["churn"] == 50
    assert figures["known_s"] > 0 and figures["rss_end_mb"] > 0
    assert figures["scrapes_during_ping"] > 0 and figures["metrics_bytes"] > 0
    sent, answered = figures["churn_pings"]
    assert answered > 0 and figures["churn_no_route"] == 0
    # Measured from the last write on: a change applied before it was written is a probe
    # that read a summarised log (below -v 2 a burst's later changes have no line).
    assert figures["churn_applied_s"] >= 0
    assert f"{figures['known_s']} s" in proc.stdout  # the printed figures are these
    assert [ns for ns in list_netns() if ns.startswith(prefix)] == []
