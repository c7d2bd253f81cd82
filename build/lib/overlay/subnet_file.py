"""Writing subnet.env atomically (write, fsync, rename), mode 0644, as flanneld does."""

from __future__ import annotations

from pathlib import Path

from control.atomic_file import write_atomic
from control.subnet_env import SubnetEnv, SubnetEnvError, parse_subnet_env


def write_subnet_env(path: Path, env: SubnetEnv) -> None:
    write_atomic(path, env.render(), 0o644)


def read_previous(path: Path) -> SubnetEnv | None:
    """The subnet.env of a previous run, if any and readable (used to ask for the same lease)."""
    try:
        return parse_subnet_env(path.read_text())
    except (OSError, SubnetEnvError):
        return None
