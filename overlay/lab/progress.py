"""Progress of long CLI work: one status line on a terminal, nothing in a pipe.

The line goes to stderr and is rewritten in place (``\\r`` and erase-line), with the step
count and the time so far; ``done()`` clears it, so what the command prints at the end
stands alone. When stderr is not a terminal (a pipe, a log file, a test) nothing is
written at all: scripts see only the result.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO


class Progress:
    def __init__(self, what: str, total: int | None = None, stream: IO[str] | None = None) -> None:
        self.what = what
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream)
        self.count = 0
        self.started = time.monotonic()
        self._shown = False

    @classmethod
    def off(cls) -> Progress:
        """A Progress that never writes (what library callers get by default)."""
        progress = cls("")
        progress.enabled = False
        return progress

    def step(self, text: str, advance: bool = True) -> None:
        """Say what is being done now; ``advance`` counts it as one of ``total`` steps."""
        if advance:
            self.count += 1
        if not self.enabled:
            return
        count = f" [{self.count}/{self.total}]" if self.total else ""
        elapsed = time.monotonic() - self.started
        line = f"{self.what}{count} {text} ({elapsed:.0f} s)"
        width = _width(self.stream)
        self.stream.write("\r\033[K" + line[: width - 1])
        self.stream.flush()
        self._shown = True

    def sub(self, label: str) -> Progress:
        """A view for a part of the work (one testbed of a benchmark): its steps show
        under ``label`` on this line without counting as steps of their own."""
        child = _Child(label, self)
        return child

    def done(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

    def note(self, text: str) -> None:
        """A line that stays (a warning, an error): printed in a pipe too."""
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._shown = False


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _width(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 80


class _Child(Progress):
    def __init__(self, label: str, parent: Progress) -> None:
        super().__init__(label, stream=parent.stream)
        self.parent = parent
        self.enabled = parent.enabled

    def step(self, text: str, advance: bool = True) -> None:
        self.parent.step(f"{self.what}: {text}", advance=False)

    def done(self) -> None:
        pass  # the parent's line stays until the parent is done

    def note(self, text: str) -> None:
        self.parent.note(text)
