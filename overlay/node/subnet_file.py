"""Writing subnet.env atomically (write, fsync, rename), mode 0644, as flanneld does."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from control.atomic_file import write_atomic
from control.subnet_env import SubnetEnv, SubnetEnvError, parse_subnet_env

LIMIT = 64 * 1024  # a subnet.env is a few lines; anything larger is not one


def write_subnet_env(path: Path, env: SubnetEnv) -> None:
    write_atomic(path, env.render(), 0o644)


def read_previous(path: Path) -> SubnetEnv | None:
    """The subnet.env of a previous run, if any and readable (used to ask for the same
    lease). Opened without blocking: a FIFO or a device at the path is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, LIMIT).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return parse_subnet_env(text)
    except SubnetEnvError:
        return None
