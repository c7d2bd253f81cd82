"""Shared fixtures: a unique name prefix per run, and network namespaces that always go away.

Fixtures and hooks only: nothing imports this file; what tests share otherwise is in
tests/helpers/."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _netns_capable() -> str | None:
    """Why netns tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, TUN)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs iproute2 (`make setup` installs it)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _netns_capable()
    if reason is None:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI must run the netns tests, but this machine {reason}")
    for item in items:
        if "netns" in item.keywords or "underlay" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def prefix() -> str:
    """A name prefix unique to this test (<= 8 chars, [a-z0-9]) so runs never collide."""
    return "t" + uuid.uuid4().hex[:7]


@pytest.fixture
def netns(prefix: str) -> Iterator[Callable[[str], str]]:
    """Factory: netns("a") creates namespace "<prefix>-a" (lo up); all deleted afterwards."""
    made: list[str] = []

    def make(suffix: str) -> str:
        name = f"{prefix}-{suffix}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    yield make
    for name in reversed(made):
        for pid in subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True
        ).stdout.split():
            subprocess.run(["kill", "-9", pid], check=False)
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def underlay() -> Iterator[Any]:
    """Our node's network namespace and the peers', joined by a veth pair (tests/helpers/wire.py);
    one per test module, removed afterwards."""
    from tests.helpers.wire import Underlay

    made = Underlay("t" + uuid.uuid4().hex[:7])
    yield made
    made.close()


@pytest.fixture
def wires(underlay: Any) -> Iterator[Callable[..., Any]]:
    """Factory: wires(port=8285) opens the dataplane's socket and the peers' on the
    underlay (tests/helpers/wire.py); all closed afterwards."""
    from tests.helpers.wire import Wire

    opened: list[Wire] = []

    def make(*args: Any, **kwargs: Any) -> Wire:
        opened.append(Wire(underlay, *args, **kwargs))
        return opened[-1]

    yield make
    for w in opened:
        w.close()


@pytest.fixture
def daemons() -> Iterator[Callable[..., Any]]:
    """Factory: daemons(ns, tmp_path, *flags) starts `overlay run` in ns
    (tests/helpers/single_daemon.py); every one is killed afterwards."""
    from tests.helpers.single_daemon import Daemon

    started: list[Daemon] = []

    def start(*args: Any, **kwargs: Any) -> Daemon:
        daemon = Daemon(*args, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[Any]:
    """Factory: disks.tmpfs("name", size="256k") mounts a tmpfs at tmp_path/name,
    disks.failing("name") an ext4 whose writes can be made to fail with EIO
    (tests/helpers/disks.py); all unmounted (and loop devices detached) afterwards."""
    from tests.helpers.disks import FailingDisk, Tmpfs

    made: list[Tmpfs | FailingDisk] = []

    class Disks:
        def tmpfs(self, name: str, size: str = "256k") -> Tmpfs:
            disk = Tmpfs(tmp_path / name, size)
            made.append(disk)
            return disk

        def failing(self, name: str) -> FailingDisk:
            disk = FailingDisk(tmp_path / name)
            made.append(disk)
            return disk

    yield Disks()
    for disk in reversed(made):
        disk.close()
