"""The installed package's version, as `overlay --version`, the status and /metrics say it."""

from __future__ import annotations

from functools import cache


@cache  # read once: the installed metadata is parsed with the email parser (~0.3 ms)
def version() -> str:
    # Imported when asked, not above: importlib.metadata loads the email parser, zipfile
    # and csv (1 MB of a daemon nobody has asked for its status yet).
    from importlib import metadata

    try:
        return metadata.version("flannel-overlay")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
