"""``python -m bench.bed_scale`` at a small scale: it builds, measures, tears down and
writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bed_scale
from overlay.lab.netns import list_netns


@pytest.mark.netns
def test_a_small_bed_is_measured_and_removed(tmp_path: Path) -> None:
    argv = ["--nodes", "3", "--registry", "file", "--settle", "0.5"]
    assert bed_scale.main([*argv, "--out", "small", "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "small.json").read_text())
    assert result["daemons"] == 3 and result["up_s"] > 0 and result["down_s"] > 0
    rss = result["daemon_rss_mib"]
    assert 5 < rss["min"] <= rss["median"] <= rss["max"] < 200
    pss = result["daemon_pss_mib"]  # forked daemons share the start server's pages
    assert result["daemon_start"] == "fork" and 1 < pss["max"] < rss["min"]
    assert result["start_server_pss_mib"] > 1
    assert list(result["imports_mib"]) == list(bed_scale.IMPORT_STEPS)
    assert "| up | down |" in (tmp_path / "small.md").read_text()
    assert [ns for ns in list_netns() if ns.startswith(f"{result['prefix']}-")] == []
