"""``python -m bench.impair``'s arithmetic: loss bursts from ping's sequence numbers, and
the table that says which row is outside its tolerance."""

from __future__ import annotations

from bench.impair import Pings, Row, format_table


def test_lost_bursts_are_runs_of_missing_sequence_numbers() -> None:
    replies = {seq: 1.0 for seq in (1, 2, 5, 6, 7, 9)}
    assert Pings(sent=12, replies=replies).lost_bursts() == [2, 1, 3]
    assert Pings(sent=3, replies={1: 1.0, 2: 1.0, 3: 1.0}).lost_bursts() == []
    assert Pings(sent=2, replies={}).lost_bursts() == [2]


def test_the_table_marks_a_row_outside_its_tolerance() -> None:
    table = format_table(
        [
            Row("udp", "loss 1%", "loss", "1.00%", "1.10%", True),
            Row("vxlan", "delay 20ms", "added delay p50", "20 ms", "30 ms", False),
        ]
    )
    lines = table.splitlines()
    assert lines[2].endswith("| yes |") and lines[3].endswith("| **no** |")
