"""``overlay`` as a child process: its command line, and its fatal line read back."""

from __future__ import annotations

import re
import sys

PYTHON = sys.executable

FATAL_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \[fatal    \] (?P<text>overlay run: error: .*?)"
    r"(?: node=(?P<node>\S+))?$"
)


def fatal_text(line: str) -> str:
    """The ``overlay run: error: ...`` of a console fatal line, which must carry the
    timestamp and the level like every other line (and the node, once it is known)."""
    match = FATAL_LINE.match(line)
    assert match, f"not a stamped fatal line: {line!r}"
    return match["text"]


def overlay_cmd(*args: str) -> list[str]:
    return [PYTHON, "-m", "overlay", *args]
