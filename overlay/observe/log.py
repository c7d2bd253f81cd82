"""structlog setup: console lines for people, JSON lines for machines; one line per event.

Verbosity follows flanneld's glog ``-v N``: 0 is lifecycle and warnings (and the first
drop of each reason, once), 1 adds datapath errors (a drop summary every few seconds
instead of every minute), 2 adds per-event debug lines (every registry event, peer table
change, trace and scrape). ``enabled(n)`` is glog's ``V(n)``: test it before building an
expensive line.

A line that cannot be written (stderr a file on a full disk, a pipe whose reader went
away) is counted (``lines_lost``, in `overlay status` and /metrics), never raised into the
task that logged it: a daemon must not stop forwarding because its log cannot grow.

``install_stack_dumps``: SIGUSR1 and SIGQUIT print every thread's stack (from the signal
handler, so also when the event loop is stuck in Python code) and every asyncio task's,
as Go's runtime prints its goroutines for flanneld's users. SIGUSR1 leaves the daemon
running; SIGQUIT then stops it (cleanly, exit status 2, like a Go program after its
SIGQUIT dump).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import structlog

_verbosity = 0
_lines_lost = 0


class _LossyPrintLogger(structlog.PrintLogger):
    """structlog's PrintLogger, counting a line it cannot write instead of raising."""

    def msg(self, message: str) -> None:
        global _lines_lost
        try:
            super().msg(message)
        except OSError:
            _lines_lost += 1

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def lines_lost() -> int:
    """Log lines this process could not write (stderr full, or gone)."""
    return _lines_lost


@dataclass(frozen=True)
class LogOptions:
    """How a process logs: ``console`` or ``json`` lines, and glog's ``-v`` level."""

    format: str = "console"
    verbosity: int = 0


def configure(fmt: str = "console", verbosity: int = 0) -> None:
    global _verbosity
    _verbosity = verbosity
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: _LossyPrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def enabled(level: int) -> bool:
    """glog's V(level): whether -v asked for lines of this level."""
    return _verbosity >= level


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def fatal(prog: str, message: str, fmt: str = "console", node: str | None = None) -> int:
    """Print one line saying what went wrong, stamped like every other line (time, node),
    and return the exit status (1)."""
    if fmt == "json":
        line: dict[str, Any] = {"event": message, "prog": prog, "level": "fatal"}
        if node:
            line["node"] = node
        line["timestamp"] = _timestamp()
        text = json.dumps(line) + "\n"
    else:
        where = f" node={node}" if node else ""
        text = f"{_timestamp()} [fatal    ] {prog}: error: {message}{where}\n"
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except OSError:
        pass  # nowhere left to say it: the exit status still does
    return 1


def format_threads(current: FrameType | None = None) -> str:
    """Every Python thread's stack, most recent call first, as faulthandler prints them;
    ``current``: where the calling thread was (a signal handler's frame argument: the
    handler's own frames are left out).

    Read with ``sys._current_frames()``, which holds the interpreter's locks: faulthandler's
    own all-thread dump from a signal handler reads other threads' frames without them and
    crashes the process (SIGSEGV) when a thread starts or ends during the dump (CPython
    gh-116008; a thread pool starting its workers is enough)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    lines = []
    for ident, frame in sys._current_frames().items():
        which = "Current thread" if ident == me else "Thread"
        lines.append(f"{which} {ident:#x} [{names.get(ident, '?')}] (most recent call first):")
        at: FrameType | None = current if ident == me and current is not None else frame
        while at is not None:
            code = at.f_code
            lines.append(f'  File "{code.co_filename}", line {at.f_lineno} in {code.co_name}')
            at = at.f_back
        lines.append("")
    return "\n".join(lines) + "\n"


def _write_stderr(text: str) -> None:
    """Straight to fd 2: a signal handler may interrupt a write to sys.stderr, and writing
    to it again from there would be a reentrant call."""
    data = text.encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(2, data) :]
    except OSError:
        pass


def dump_tasks(signame: str, out: Any = None) -> None:
    """Every asyncio task's stack, and which thread is which (the thread stacks have been
    printed just before, by id)."""
    out = out or sys.stderr
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    threads = ", ".join(  # a thread still starting has no ident yet
        f"{t.ident:#x} {t.name}" if t.ident else f"(starting) {t.name}"
        for t in threading.enumerate()
    )
    out.write(f"--- {signame}: {len(tasks)} asyncio tasks; threads: {threads}\n")
    for task in tasks:
        out.write(f"task {task.get_name()!r}: {task.get_coro()!r}\n")
        task.print_stack(file=out)
    out.write(f"--- end of {signame} dump\n")
    out.flush()


_SIGNALS = (signal.SIGUSR1, signal.SIGQUIT)


def install_stack_dumps(loop: asyncio.AbstractEventLoop, on_quit: Callable[[], None]) -> None:
    """SIGUSR1: dump and carry on; SIGQUIT: dump, then ``on_quit`` (the daemon stops).

    The threads are dumped in Python's handler for the signal, which the main thread runs
    between two bytecodes, also while a callback keeps the loop from its next turn; the
    tasks and the stop follow on the loop, which owns them. The loop's registration comes
    first, for its wake-up descriptor: a signal that reaches another thread must still
    wake the main thread out of its poll."""

    def after(name: str) -> None:
        try:
            dump_tasks(name)
        finally:  # the stop does not depend on the dump
            if name == "SIGQUIT":
                on_quit()

    def threads(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        try:
            text = format_threads(frame)
        except Exception as e:  # noqa: BLE001 - never raised into whatever was running
            text = f"(cannot read the thread stacks: {type(e).__name__}: {e})\n"
        _write_stderr(f"--- {name}: thread stacks\n{text}")

    for signum in _SIGNALS:
        loop.add_signal_handler(signum, after, signum.name)
        signal.signal(signum, threads)  # in place of the loop's no-op; its wake-up stays
        signal.siginterrupt(signum, False)  # as the loop had it: system calls restart


def remove_stack_dumps(loop: asyncio.AbstractEventLoop) -> None:
    for signum in _SIGNALS:
        loop.remove_signal_handler(signum)
