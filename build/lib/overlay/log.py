"""structlog setup: console lines for people, JSON lines for machines; one line per event."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import structlog


def configure(fmt: str = "console", verbosity: int = 0) -> None:
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


def fatal(prog: str, message: str, fmt: str = "console") -> int:
    """Print one line saying what went wrong and return the exit status (1)."""
    if fmt == "json":
        sys.stderr.write(json.dumps({"level": "fatal", "event": message, "prog": prog}) + "\n")
    else:
        sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    return 1
