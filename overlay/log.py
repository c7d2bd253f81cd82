"""structlog setup: console lines for people, JSON lines for machines; one line per event.

Verbosity follows flanneld's glog ``-v N``: 0 is lifecycle and warnings (and the first
drop of each reason, once), 1 adds datapath errors (a drop summary every few seconds
instead of every minute), 2 adds per-event debug lines (every registry event, peer table
change, trace and scrape). ``enabled(n)`` is glog's ``V(n)``: test it before building an
expensive line.

``install_stack_dumps``: SIGUSR1 and SIGQUIT print every thread's stack (faulthandler,
from the signal handler itself, so also when the event loop is stuck) and every asyncio
task's, as Go's runtime prints its goroutines for flanneld's users. SIGUSR1 leaves the
daemon running; SIGQUIT then stops it (cleanly, exit status 2, like a Go program after
its SIGQUIT dump).
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

_verbosity = 0


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
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
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
        sys.stderr.write(json.dumps(line) + "\n")
    else:
        where = f" node={node}" if node else ""
        sys.stderr.write(f"{_timestamp()} [fatal    ] {prog}: error: {message}{where}\n")
    sys.stderr.flush()
    return 1


def dump_tasks(signame: str, out: Any = None) -> None:
    """Every asyncio task's stack, and which thread is which (faulthandler has printed
    their stacks by id just before)."""
    out = out or sys.stderr
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    threads = ", ".join(f"{t.ident:#x} {t.name}" for t in threading.enumerate())
    out.write(f"--- {signame}: {len(tasks)} asyncio tasks; threads: {threads}\n")
    for task in tasks:
        out.write(f"task {task.get_name()!r}: {task.get_coro()!r}\n")
        task.print_stack(file=out)
    out.write(f"--- end of {signame} dump\n")
    out.flush()


def install_stack_dumps(loop: asyncio.AbstractEventLoop, on_quit: Callable[[], None]) -> None:
    """SIGUSR1: dump and carry on; SIGQUIT: dump, then ``on_quit`` (the daemon stops)."""

    def usr1() -> None:
        dump_tasks("SIGUSR1")

    def quit_() -> None:
        dump_tasks("SIGQUIT")
        on_quit()

    loop.add_signal_handler(signal.SIGUSR1, usr1)
    loop.add_signal_handler(signal.SIGQUIT, quit_)
    # After the loop's handlers: faulthandler prints the threads, then chains to them.
    for signum in (signal.SIGUSR1, signal.SIGQUIT):
        faulthandler.register(signum, file=sys.stderr, all_threads=True, chain=True)


def remove_stack_dumps(loop: asyncio.AbstractEventLoop) -> None:
    for signum in (signal.SIGUSR1, signal.SIGQUIT):
        faulthandler.unregister(signum)
        loop.remove_signal_handler(signum)
