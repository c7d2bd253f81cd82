"""`overlay testbed scale`'s flags: a wrong combination is one line naming it, exit 2,
before anything is built."""

from __future__ import annotations

import pytest

from tests.helpers.testbed import testbed_cli as run_testbed_cli


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--live", "0"], "--live must be 1 or more and at most --leases"),
        (["--leases", "3", "--live", "4"], "--live must be 1 or more and at most --leases"),
        (["--reconcile-peers", "20,x"], "--reconcile-peers"),
        (["--leases", "-5"], "must be at least 0"),
    ],
)
def test_wrong_flags_are_one_line(flags: list[str], said: str) -> None:
    proc = run_testbed_cli("scale", *flags)
    assert proc.returncode == 2
    assert said in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
