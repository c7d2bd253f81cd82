"""Writing subnet.env atomically (write, fsync, rename), mode 0644, as flanneld does."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from control.atomic_file import write_atomic
from control.subnet_env import SubnetEnv, SubnetEnvError, parse_subnet_env

LIMIT = 64 * 1024  # a subnet.env is a few lines; anything larger is not one
MODE = 0o644


class SubnetFileError(Exception):
    """subnet.env could not be written; the message names the path and the reason."""


def write_subnet_env(path: Path, env: SubnetEnv) -> bool:
    """Write ``env`` to ``path``, unless the file already holds exactly that (a restart
    with the same lease then starts on a full or read-only filesystem too). True when
    it was written; SubnetFileError (the file left as it was) when it could not be."""
    text = env.render()
    if _read_regular(path) == (text, MODE, os.geteuid()):
        return False
    try:
        write_atomic(path, text, MODE)
    except OSError as e:
        raise SubnetFileError(f"--subnet-file {path}: cannot write it: {e.strerror or e}") from None
    return True


def read_previous(path: Path) -> SubnetEnv | None:
    """The subnet.env of a previous run, if any and readable (used to ask for the same
    lease)."""
    held = _read_regular(path)
    if held is None:
        return None
    try:
        return parse_subnet_env(held[0])
    except SubnetEnvError:
        return None


def _read_regular(path: Path) -> tuple[str, int, int] | None:
    """(the text, the permission bits, the owner) of the regular file at ``path``, or
    None. Opened without blocking: a FIFO or a device at the path is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        text = os.read(fd, LIMIT).decode("utf-8", "replace")
        return text, stat.S_IMODE(st.st_mode), st.st_uid
    except OSError:
        return None
    finally:
        os.close(fd)
