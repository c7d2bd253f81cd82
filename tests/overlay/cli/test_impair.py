"""`overlay impair` as a user types it: what is wrong with the words or flags is one line
and exit 2 before anything is sent; no daemon is one line and exit 1; the rules print as
a table (the round trip through a daemon is in tests/netns/test_impair.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from overlay.cli.impair import format_rules
from tests.helpers.commands import overlay_cmd


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["delay", "20"], "'20' needs a unit"),
        (["--clear", "delay", "1ms"], "--clear takes no netem words"),
        (["--peer", "198.18.3.0/24"], "--peer and --direction need netem words or --clear"),
        (["--peer", "198.18.3.9", "loss", "1%"], "is not a subnet"),
        (["--direction", "up", "loss", "1%"], "invalid choice: 'up'"),
        (["reorder", "5%"], "reordering not possible without specifying some delay"),
    ],
)
def test_bad_words_and_flags_are_one_line_exit_2(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    socket = tmp_path / "none.sock"
    result = subprocess.run(
        overlay_cmd("impair", "--status-socket", str(socket), *argv),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_no_daemon_is_one_line_exit_1(tmp_path: Path) -> None:
    socket = tmp_path / "none.sock"
    result = subprocess.run(
        overlay_cmd("impair", "--status-socket", str(socket), "delay", "1ms"),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1
    missing = "[Errno 2] No such file or directory"
    assert result.stderr == f"overlay impair: error: no daemon answers on {socket} ({missing})\n"


def test_rules_print_as_a_table() -> None:
    assert format_rules([]) == "no impairment"
    table = format_rules(
        [
            {"peer": None, "direction": "out", "netem": "delay 20ms"},
            {"peer": "198.18.3.0/24", "direction": "in", "netem": "loss 1%"},
        ]
    )
    assert table.splitlines() == [
        "PEER               DIRECTION NETEM",
        "all                out       delay 20ms",
        "198.18.3.0/24      in        loss 1%",
    ]
