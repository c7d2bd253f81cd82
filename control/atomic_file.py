"""Replacing a file so that a reader sees the old or the new content, never a mix."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str, mode: int = 0o644) -> None:
    """Write to a temporary file in the same directory, fsync, chmod, then rename over.

    OSError when any step fails (a full or read-only filesystem): ``path`` is then as it
    was, and the temporary file is gone (removed as far as the filesystem still lets us,
    without hiding the error that matters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        raise
