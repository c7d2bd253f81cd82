"""``overlay bench``'s IPv6 rows (issue 20): selectable, compared with their IPv4 rows in
the report, and a real quick run of one on the dual-stack bed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import report


def _row(key: str, tcp1: float, p50: float, machine_per_gb: float) -> dict[str, Any]:
    result = report.PathResult(report.BY_KEY[key])
    result.tcp1, result.tcp4 = [tcp1], [tcp1]
    result.rtts_us, result.pings_sent = [p50], 1
    result.machine_s_per_gb = {"tcp1": [machine_per_gb], "tcp4": [machine_per_gb]}
    return result.as_dict()


def _report(paths: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "t",
        "command": "overlay bench",
        "started": "2026-12-07T00:00:00",
        "duration_s": 60.0,
        "host": {
            "cpus": 2,
            "kernel": "k",
            "python": "3",
            "loadavg_before": "0",
            "loadavg_after": "0",
        },  # fmt: skip
        "settings": {
            "runs": 1,
            "seconds": 5.0,
            "udp_seconds": 2.0,
            "udp_steps": 5,
            "pings": 200,
            "ping_interval": 0.01,
        },  # fmt: skip
        "paths": paths,
        "micro": {},
    }


def test_only_selects_the_ipv6_rows_in_matrix_order() -> None:
    assert report._only("kernel-vxlan6,vxlan6") == ["kernel-vxlan6", "vxlan6"]
    assert {report.BY_KEY[k].family for k in ("vxlan6", "kernel-vxlan6")} == {6}
    assert report.BY_KEY["vxlan6"].ipv4_key == "vxlan"


def test_report_sets_each_ipv6_row_against_its_ipv4_row_and_checks_the_20pct_target() -> None:
    paths = [
        _row("kernel-vxlan", 8.0, 130, 1.4),
        _row("vxlan", 4.0, 300, 2.0),
        _row("vxlan6", 3.0, 500, 6.0),
        _row("kernel-vxlan6", 10.0, 150, 1.1),
    ]
    data = _report(paths)
    data["targets"] = report.check_targets(paths)
    text = report.format_markdown(data)
    assert "| our userspace vxlan, IPv6 | our userspace vxlan | 3.00 / 4.00 | 0.750 " in text
    assert "| 500 / 300 | 6.00 / 2.00 |" in text
    assert "| kernel vxlan, IPv6 | kernel vxlan | 10.00 / 8.00 | 1.250 |" in text
    (target,) = [t for t in data["targets"] if "IPv6" in t["text"]]
    assert target["measured"] == "75.0% of IPv4" and target["verdict"] == "missed"
    paths[2] = _row("vxlan6", 3.3, 500, 6.0)
    (target,) = [t for t in report.check_targets(paths) if "IPv6" in t["text"]]
    assert target["verdict"] == "met"


def test_report_says_when_the_ipv4_row_is_missing() -> None:
    text = report.format_markdown(_report([_row("vxlan6", 3.0, 500, 6.0)]))
    assert "(IPv4 row vxlan not in this run)" in text


@pytest.mark.netns
def test_quick_bench_of_the_userspace_ipv6_row_measures_over_ipv6(tmp_path: Path) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    before = set(listed.split())
    argv = ["--quick", "--no-micro", "--only", "vxlan6", "--out", "v6", "--results-dir"]
    assert report.main([*argv, str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "v6.json").read_text())["paths"]
    assert row["error"] is None and row["family"] == 6
    assert row["tcp1_gbits"]["median"] > 0 and row["tcp4_gbits"]["median"] > 0
    assert row["ping_us"]["received"] > 0 and row["ping_us"]["p50"] > 0
    assert row["machine_cpu_s_per_gb"]["tcp1"]["median"] > 0
    assert row["daemon_cpu_s_per_gb_tcp1"]["n2"]["median"] > 0  # the receiving daemon worked
    assert "| our userspace vxlan, IPv6 |" in (tmp_path / "v6.md").read_text()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in listed.split() if ns.endswith("-n1-p1") and ns not in before]
