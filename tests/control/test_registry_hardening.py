"""Issue 10 items 2, 5, 8 and 9 for the embedded file registry: its file and lock are
exclusive to root, hostile or broken content never crashes a daemon, and bad operator
input is refused with one line, at once, before anything is written.

The registry-level tests use the real FileRegistry on real files (a real second process
holds the lock, a real `nobody` process tries to open it); the daemon-level ones run
`overlay run` in a namespace of their own."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from control.config import config_json
from control.file_registry import MAX_FILE, FileRegistry
from control.kv import RegistryConfigError, RegistryError
from control.lease import Lease
from control.subnet_manager import SubnetManager
from tests.helpers.commands import overlay_cmd
from tests.helpers.watching import Recorder, start_watch, wait_until

CONFIG_KEY = "/coreos.com/network/config"
SUBNETS = "/coreos.com/network/subnets/"
NETWORK = IPv4Network("10.244.0.0/16")
NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, a nobody process)")


def seeded(path: Path, **kwargs: Any) -> FileRegistry:
    registry = FileRegistry(path, poll_interval=0.01, **kwargs)
    registry.put_sync(CONFIG_KEY, config_json(NETWORK).encode(), None)
    return registry


def one_line_error(call: Callable[[], object], *needles: str) -> str:
    with pytest.raises(RegistryConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# -- item 2: owner and mode -----------------------------------------------------------------


def test_file_and_lock_are_0600_and_an_old_0644_lock_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    lock = tmp_path / "registry.json.lock"
    lock.touch(mode=0o644)
    os.chmod(lock, 0o644)  # as the daemon before this fix left it
    seeded(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777, 0o1777], ids=lambda m: f"{m:04o}")
def test_a_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "reg"
    directory.mkdir()
    os.chmod(directory, mode)
    registry = FileRegistry(directory / "registry.json")
    one_line_error(registry.check_sync, str(directory), "writable by others")
    one_line_error(lambda: registry.put_sync("/k", b"v", None), "writable by others")
    assert list(directory.iterdir()) == []  # nothing was created in it


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666], ids=lambda m: f"{m:04o}")
def test_a_registry_file_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "registry.json"
    seeded(path)
    os.chmod(path, mode)
    registry = FileRegistry(path)
    one_line_error(registry.check_sync, str(path), "writable by others")
    one_line_error(lambda: registry.get_sync(CONFIG_KEY), "writable by others")


def test_an_ancestor_others_may_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    (open_dir / "flannel").mkdir(parents=True)
    os.chmod(open_dir, 0o777)
    registry = FileRegistry(open_dir / "flannel" / "registry.json")
    one_line_error(registry.check_sync, str(open_dir), "writable by others")
    os.chmod(open_dir, 0o1777)  # like /tmp: others cannot rename what is ours in it
    registry.check_sync()


@ROOT_ONLY
@pytest.mark.parametrize("which", ["file", "lock", "directory"])
def test_a_registry_owned_by_someone_else_is_refused(tmp_path: Path, which: str) -> None:
    directory = tmp_path / "reg"
    directory.mkdir()
    path = directory / "registry.json"
    seeded(path)
    target = {"file": path, "lock": directory / "registry.json.lock", "directory": directory}
    os.chown(target[which], NOBODY, NOBODY)
    one_line_error(FileRegistry(path).check_sync, f"owned by uid {NOBODY}")


def test_a_lock_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    (tmp_path / "elsewhere").touch()
    (tmp_path / "registry.json.lock").symlink_to(tmp_path / "elsewhere")
    one_line_error(FileRegistry(path).check_sync, "registry.json.lock", "symbolic link")


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A root-owned 0755 directory others can traverse (as /run/flannel is), removed after."""
    directory = Path("/run") / f"overlay-test-{uuid.uuid4().hex[:8]}"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


NOBODY_FLOCK = """
import fcntl, os, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
try:
    f = open(sys.argv[1], "rb")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked")
except OSError as e:
    print(type(e).__name__)
"""


@ROOT_ONLY
def test_nobody_cannot_open_the_lock_to_hold_it(run_dir: Path) -> None:
    """The DoS of the issue: any user could open the world-readable lock and flock it."""
    path = run_dir / "registry.json"
    seeded(path)
    for target in (path.with_name("registry.json.lock"), path):
        result = subprocess.run(
            [sys.executable, "-c", NOBODY_FLOCK, str(target)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.stdout.strip() == "PermissionError", (target, result.stdout, result.stderr)


HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "rb")
fcntl.flock(f, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[tuple[FileRegistry, subprocess.Popen[str], list[Any]]]:
    """A registry whose lock another real process holds (until the test ends)."""
    notes: list[Any] = []
    path = tmp_path / "registry.json"
    seeded(path)
    registry = FileRegistry(
        path, lock_timeout=2.0, notify=lambda event, **f: notes.append((event, f))
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path.with_name("registry.json.lock"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield registry, holder, notes
    finally:
        holder.kill()
        holder.wait()


def test_a_held_lock_is_reported_once_naming_its_holder_then_times_out(
    lock_holder: tuple[FileRegistry, subprocess.Popen[str], list[Any]],
) -> None:
    registry, holder, notes = lock_holder
    started = time.monotonic()
    with pytest.raises(RegistryError) as info:
        registry.put_sync("/k", b"v", None)
    took = time.monotonic() - started
    assert 2.0 <= took < 4.0
    assert f"held by pid {holder.pid} (python" in str(info.value), info.value
    assert "for more than 2 s" in str(info.value)
    held = [f for event, f in notes if event == "registry_lock_held"]
    assert len(held) == 1 and held[0]["holder"].startswith(f"pid {holder.pid} ")
    assert 1.0 <= held[0]["waited_s"] < 2.0
    # Still held: another try times out again, without a second report.
    with pytest.raises(RegistryError):
        registry.get_sync("/k")
    assert sum(event == "registry_lock_held" for event, _ in notes) == 1
    # Released: operations work again at once.
    holder.kill()
    holder.wait()
    registry.put_sync("/k", b"v", None)
    entry = registry.get_sync("/k")
    assert entry is not None and entry.value == b"v"


async def test_close_ends_a_lock_wait_at_once(
    lock_holder: tuple[FileRegistry, subprocess.Popen[str], list[Any]],
) -> None:
    registry, _, _ = lock_holder
    registry.lock_timeout = 60.0
    waiting = asyncio.create_task(registry.put("/k", b"v", None))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await registry.close()
    with pytest.raises(RegistryError, match="closed"):
        await waiting
    assert time.monotonic() - started < 0.5


# -- item 5: any content, and what is not a regular file -------------------------------------

BROKEN: list[tuple[str, Callable[[Path], None]]] = [
    ("not-utf8", lambda p: p.write_bytes(b'{"revision": 1, "keys": {"\xff\xfe": 1}}')),
    ("binary", lambda p: p.write_bytes(os.urandom(4096))),
    ("truncated-json", lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2])),
    ("empty", lambda p: p.write_bytes(b"")),
    ("huge", lambda p: os.truncate(p, MAX_FILE + 1)),  # sparse: costs no disk
]


@pytest.mark.parametrize("damage", [b[1] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_content_is_a_one_line_error_for_every_operation(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "registry.json"
    seeded(path)
    damage(path)
    before = path.read_bytes() if path.stat().st_size < MAX_FILE else None
    registry = FileRegistry(path)
    for operation in (
        registry.check_sync,
        lambda: registry.get_sync(CONFIG_KEY),
        lambda: registry.list_sync("/"),
        lambda: registry.put_sync("/b", b"v", None),
        lambda: registry.create_sync("/c", b"v", None),
    ):
        one_line_error(operation, str(path), "corrupt")
    if before is not None:
        assert path.read_bytes() == before  # never overwritten


def test_a_fifo_or_a_directory_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    started = time.monotonic()
    one_line_error(FileRegistry(fifo).check_sync, str(fifo), "not a regular file")
    assert time.monotonic() - started < 1.0
    directory = tmp_path / "dir.json"
    directory.mkdir()
    one_line_error(FileRegistry(directory).check_sync, str(directory), "not a regular file")


async def test_a_running_watch_keeps_its_last_good_state_through_garbage(tmp_path: Path) -> None:
    """The watch of a running daemon: non-UTF-8 bytes, then truncated JSON, then a good
    file again. One warning, one recovery; no snapshot or event in between; no crash."""
    path = tmp_path / "registry.json"
    registry = seeded(path)
    notes: list[str] = []
    m = SubnetManager(
        FileRegistry(path, poll_interval=0.01),
        public_ip=IPv4Address("192.0.2.1"),
        notify=lambda event, **_: notes.append(event),
    )
    config = await m.read_config()
    assert config is not None
    own = await m.acquire(config)
    # Peers beyond the first 100 free subnets acquire picks from: never our own.
    peer = Lease(IPv4Network("10.244.200.0/24"), IPv4Address("192.0.2.2"))
    registry.put_sync(f"{SUBNETS}{peer.key}", peer.value_json().encode(), 3600)
    good = path.read_bytes()
    recorder = Recorder()
    task = start_watch(m, own, recorder)
    try:
        await wait_until(lambda: len(recorder.snapshots) == 1)
        path.write_bytes(b"\xff\xfe\x00garbage")
        await wait_until(lambda: "watch_failed" in notes, 5, "the failure noticed")
        path.write_bytes(good[: len(good) // 2])
        await asyncio.sleep(1.5)
        assert not task.done()
        assert notes.count("watch_failed") == 1
        assert len(recorder.snapshots) == 1 and recorder.events == []
        path.write_bytes(good)
        await wait_until(lambda: "watch_recovered" in notes, 10, "the recovery noticed")
        assert notes.count("watch_failed") == 1 and notes.count("watch_recovered") == 1
        # Working again: a change is delivered.
        newcomer = Lease(IPv4Network("10.244.201.0/24"), IPv4Address("192.0.2.3"))
        registry.put_sync(f"{SUBNETS}{newcomer.key}", newcomer.value_json().encode(), 3600)
        await wait_until(lambda: recorder.added(newcomer.subnet), 5, "a change after it")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- items 5, 8, 9 at start: `overlay run`, one line, at once ---------------------------------


def run_daemon(ns: str, tmp_path: Path, registry: Path, *extra: str) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            *overlay_cmd(
                "run",
                "--registry-file",
                str(registry),
                "--iface",
                "lo",
                "--registry-timeout",
                "5",
                "--subnet-file",
                str(tmp_path / "subnet.env"),
                "--status-socket",
                str(tmp_path / "status.sock"),
                *extra,
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return result.returncode, errors[0], time.monotonic() - started


@pytest.fixture
def lo_ns(netns: Callable[[str], str]) -> str:
    return netns("reg")


def _not_utf8(p: Path) -> None:
    p.write_bytes(b"\xff\xfe\xfd not a registry")


def _directory(p: Path) -> None:
    p.mkdir()


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _group_writable(p: Path) -> None:
    p.write_text("{}")
    os.chmod(p, 0o664)


def _open_directory(p: Path) -> None:
    os.chmod(p.parent, 0o777)


@pytest.mark.netns
@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_not_utf8, "corrupt"),
        (_directory, "not a regular file"),
        (_fifo, "not a regular file"),
        (_group_writable, "writable by others"),
        (_open_directory, "writable by others"),
    ],
    ids=["not-utf8", "directory", "fifo", "group-writable", "open-directory"],
)
def test_a_bad_registry_file_stops_the_start_at_once_naming_the_path(
    lo_ns: str, tmp_path: Path, make: Callable[[Path], None], needle: str
) -> None:
    directory = tmp_path / "reg"
    directory.mkdir()
    registry = directory / "registry.json"
    make(registry)
    code, line, took = run_daemon(lo_ns, tmp_path, registry, "--network", "198.18.0.0/16")
    assert code == 1 and needle in line and str(registry) in line, line
    assert took < 4.0, f"took {took:.1f} s: retried instead of refused"
    assert "registry unreachable" not in line
    assert not (tmp_path / "subnet.env").exists()


BAD_NETWORKS = [
    ("smaller-than-28", ["--network", "198.18.0.0/29"], "smaller than /28"),
    ("everything", ["--network", "0.0.0.0/0"], "0.0.0.0/8"),
    ("loopback", ["--network", "127.0.0.0/16"], "loopback"),
    ("multicast", ["--network", "224.1.0.0/16"], "multicast"),
    (
        "holds-the-underlay",
        ["--network", "198.18.0.0/16", "--public-ip", "198.18.7.1"],
        "contains this node's underlay address 198.18.7.1",
    ),
]


@pytest.mark.netns
@pytest.mark.parametrize(
    ("args", "needle"), [b[1:] for b in BAD_NETWORKS], ids=[b[0] for b in BAD_NETWORKS]
)
def test_a_network_that_cannot_work_is_refused_before_anything_is_written(
    lo_ns: str, tmp_path: Path, args: list[str], needle: str
) -> None:
    registry = tmp_path / "registry.json"
    code, line, took = run_daemon(lo_ns, tmp_path, registry, *args)
    assert code == 1 and needle in line and "--network" in line, line
    assert took < 4.0
    # Nothing in the registry: a later start with a good --network is not blocked.
    content = json.loads(registry.read_text()) if registry.exists() else {"keys": {}}
    assert content["keys"] == {}, f"the bad seed was written: {content['keys']}"
