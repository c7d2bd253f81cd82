"""Writing subnet.env atomically (write, fsync, rename), mode 0644, as flanneld does."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from control.subnet_env import SubnetEnv, SubnetEnvError, parse_subnet_env


def write_subnet_env(path: Path, env: SubnetEnv) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(env.render())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_previous(path: Path) -> SubnetEnv | None:
    """The subnet.env of a previous run, if any and readable (used to ask for the same lease)."""
    try:
        return parse_subnet_env(path.read_text())
    except (OSError, SubnetEnvError):
        return None
