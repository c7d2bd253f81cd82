"""The installed package's version, as `overlay --version`, the status and /metrics say it."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("flannel-overlay")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
