"""dist/overlay.service, the systemd unit for a node: systemd's own checker accepts it
(with ExecStart pointed at this checkout's `overlay`), and it says what the daemon needs:
Type=notify (READY=1 once forwarding), restart always, /run/flannel kept across restarts.
No systemd runs in this sandbox (PID 1 is not systemd), so the unit is not started here;
READY=1/STOPPING=1 are tested against a fake notify socket
(tests/overlay/node/test_lifecycle.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import ROOT

UNIT = ROOT / "dist" / "overlay.service"


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_says_what_the_daemon_needs() -> None:
    unit = directives()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["always"]  # a revoked lease exits 1, a signal 0: both restart
    assert unit["RuntimeDirectory"] == ["flannel"] and unit["RuntimeDirectoryPreserve"] == ["yes"]
    assert "-/etc/default/flanneld" in unit["EnvironmentFile"]
    assert unit["ExecStart"][0].endswith("overlay run $FLANNELD_OPTIONS")
    assert "flanneld.service" in unit["Conflicts"]


def test_systemd_analyze_verify_accepts_it(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze missing: `make setup` installs systemd"
    overlay = Path(sys.executable).with_name("overlay")
    assert overlay.exists(), overlay
    unit = tmp_path / "overlay.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/overlay", str(overlay)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "overlay.service" in line  # units it pulls in (network-online...) are not ours
    ]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
