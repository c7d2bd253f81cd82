"""The installed package's version, as `overlay --version`, the status and /metrics say it."""

from __future__ import annotations

from functools import cache
from importlib import metadata


@cache  # read once: the installed metadata is parsed with the email parser (~0.3 ms)
def version() -> str:
    try:
        return metadata.version("flannel-overlay")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
