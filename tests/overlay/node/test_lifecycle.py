"""`overlay run`'s lifecycle: SIGTERM and SIGINT end it within a second at every stage
(waiting for a config, retrying an unreachable etcd, blocked on a registry lock or a
FIFO, forwarding), exit statuses as flanneld's, paths that would block refused at once,
systemd's READY=1 / STOPPING=1, and which registry is in use said plainly."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from control.file_registry import FileRegistry
from overlay.observe import status_socket as status
from tests.helpers.paths import ROOT
from tests.helpers.single_daemon import Daemon

pytestmark = pytest.mark.netns
NETWORK = "198.18.0.0/16"
STOP_LIMIT = 1.0  # seconds from the signal to the process being gone


def links(ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout


def assert_stopped_in_time(daemon: Daemon, signum: int = signal.SIGTERM) -> None:
    code, took = daemon.stop(signum)
    print(f"{signal.Signals(signum).name} -> exit {code} in {took * 1000:.0f} ms")
    assert code == 0, daemon.log.read_text()[-800:]
    assert took < STOP_LIMIT, f"took {took:.2f} s"


# -- every stage ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stops_while_waiting_for_a_config(netns, tmp_path: Path, daemons, signum: int) -> None:
    ns = netns("cfg")
    daemon = daemons(ns, tmp_path, "--registry-file", str(tmp_path / "registry.json"))
    daemon.wait_event("config_missing")
    time.sleep(0.3)
    assert_stopped_in_time(daemon, signum)
    assert "flannel0" not in links(ns)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stops_while_retrying_an_unreachable_etcd(
    netns, tmp_path: Path, daemons, signum: int
) -> None:
    ns = netns("etcd")
    daemon = daemons(
        ns,
        tmp_path,
        "--etcd-endpoints",
        "http://127.0.0.1:9",  # nothing listens: refused at once, retried for a minute
        "--registry-timeout",
        "60",
    )
    daemon.wait_event("registry_unavailable")
    time.sleep(0.3)
    assert_stopped_in_time(daemon, signum)


def test_stops_while_blocked_on_the_registry_lock(netns, tmp_path: Path, daemons) -> None:
    """Another process holds the file registry's lock: the daemon's registry call blocks
    in flock (in a thread); SIGTERM must still end it at once, with nothing left."""
    ns = netns("lock")
    registry = tmp_path / "registry.json"
    lock = open(registry.with_name("registry.json.lock"), "a")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        daemon = daemons(ns, tmp_path, "--registry-file", str(registry), "--network", NETWORK)
        daemon.wait_event("registry")
        time.sleep(0.5)  # now in flock
        assert daemon.proc.poll() is None
        assert_stopped_in_time(daemon)
    finally:
        lock.close()
    assert not registry.exists() or "subnets" not in registry.read_text()
    assert "flannel0" not in links(ns)


def test_a_fifo_as_the_registry_lock_is_refused_at_once(netns, tmp_path: Path, daemons) -> None:
    """The registry's lock path is a FIFO nobody reads: opening it would block forever, so
    it is refused (without opening it) with one line naming it."""
    ns = netns("fifo")
    registry = tmp_path / "registry.json"
    lock = registry.with_name("registry.json.lock")
    os.mkfifo(lock)
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry), "--network", NETWORK)
    assert daemon.proc.wait(timeout=STOP_LIMIT + 4) == 1
    lines = [e for e in daemon.events() if e.get("level") == "fatal"]
    assert len(lines) == 1 and str(lock) in lines[0]["event"], daemon.events()


@pytest.mark.parametrize("flag", ["--subnet-file", "--registry-file"])
def test_fifo_path_is_refused_at_once(netns, tmp_path: Path, daemons, flag: str) -> None:
    ns = netns("fifo2")
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    args = [flag, str(fifo), "--network", NETWORK]
    if flag == "--subnet-file":
        args += ["--registry-file", str(tmp_path / "registry.json")]
    daemon = daemons(ns, tmp_path, *args)
    code = daemon.proc.wait(timeout=10)
    assert code == 1
    lines = [e for e in daemon.events() if e.get("level") == "fatal"]
    assert len(lines) == 1, daemon.events()
    assert f"{flag} {fifo} is not a regular file (a FIFO)" in lines[0]["event"]


def test_stops_while_forwarding_and_says_which_registry(netns, tmp_path: Path, daemons) -> None:
    ns = netns("run")
    registry = tmp_path / "registry.json"
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry), "--network", NETWORK)
    started = daemon.wait_event("started")
    first = daemon.events()[0]
    assert first["event"] == "registry" and first["kind"] == "file", first
    assert first["path"] == str(registry) and started["registry"] == "file"
    shown = status.query(daemon.socket)
    which = {k: shown["registry"][k] for k in ("kind", "path", "prefix", "state")}
    assert which == {
        "kind": "file",
        "path": str(registry),
        "prefix": "/coreos.com/network",
        "state": "connected",
    }
    assert "flannel0" in links(ns)
    assert_stopped_in_time(daemon)
    assert "flannel0" not in links(ns)
    assert daemon.subnet_file.exists()  # kept, so a restart asks for the same subnet
    assert "subnets" in registry.read_text()  # and the lease stays


def test_etcd_registry_is_named(netns, tmp_path: Path, daemons) -> None:
    ns = netns("etcdn")
    daemon = daemons(
        ns, tmp_path, "--etcd-endpoints", "http://127.0.0.1:9", "--registry-timeout", "1"
    )
    assert daemon.proc.wait(timeout=15) == 1
    first = daemon.events()[0]
    assert first["event"] == "registry" and first["kind"] == "etcd", first
    assert first["endpoints"] == ["http://127.0.0.1:9"]


def test_lease_revoked_exits_1_unlike_flanneld(netns, tmp_path: Path, daemons) -> None:
    """flanneld exits 0 when its lease is revoked, so under the common Restart=on-failure
    units it stays down; we exit 1 so both on-failure and always restart it (README)."""
    ns = netns("rev")
    registry = tmp_path / "registry.json"
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry), "--network", NETWORK)
    daemon.wait_event("started")
    key = status.query(daemon.socket)["lease"]["key"]
    assert FileRegistry(registry).delete_sync(key)
    assert daemon.proc.wait(timeout=10) == 1
    fatal = [e for e in daemon.events() if e.get("level") == "fatal"]
    assert len(fatal) == 1 and "revoked" in fatal[0]["event"]


# -- systemd -------------------------------------------------------------------------------


class FakeNotifySocket:
    """A FAKE of systemd's notify socket (no systemd can run in this sandbox): an AF_UNIX
    datagram socket the daemon is pointed at with NOTIFY_SOCKET, recording what it sends."""

    def __init__(self, address: str) -> None:
        self.env = address  # the NOTIFY_SOCKET value
        bind = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def receive(self, until: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until():
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                pass

    def states(self) -> list[str]:
        return [line for _, text in self.messages for line in text.splitlines()]

    def close(self) -> None:
        self.sock.close()
        if not self.env.startswith("@"):
            Path(self.env).unlink(missing_ok=True)


def test_systemd_ready_once_forwarding_and_stopping(netns, tmp_path: Path, daemons) -> None:
    ns = netns("sd")
    fake = FakeNotifySocket(str(tmp_path / "notify.sock"))  # a path: abstract names are
    try:  # per network namespace, and the daemon runs in its own (see the next test)
        daemon = daemons(
            ns,
            tmp_path,
            "--registry-file",
            str(tmp_path / "registry.json"),
            "--network",
            NETWORK,
            env={"NOTIFY_SOCKET": fake.env},
        )
        fake.receive(lambda: "READY=1" in fake.states())
        ready_at = next(t for t, text in fake.messages if "READY=1" in text)
        assert daemon.subnet_file.exists(), "READY=1 before subnet.env was written"
        assert "flannel0" in links(ns)
        assert any(s.startswith("STATUS=forwarding for 198.18.") for s in fake.states())
        daemon.proc.send_signal(signal.SIGTERM)
        fake.receive(lambda: "STOPPING=1" in fake.states(), timeout=5)
        assert daemon.proc.wait(timeout=5) == 0
        assert fake.states().count("READY=1") == 1 and "STOPPING=1" in fake.states()
        assert ready_at <= next(t for t, text in fake.messages if "STOPPING=1" in text)
    finally:
        fake.close()


def test_systemd_notify_abstract_socket(netns) -> None:
    """sd_notify to an abstract '@name' socket (how systemd usually names it), in the
    namespace where both ends live: overlay.node.systemd.notify against the FAKE listener."""
    ns = netns("sda")
    name = f"@overlay-test-{uuid.uuid4().hex[:8]}"
    code = (
        "import socket, sys\n"
        "from overlay.node import systemd\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        f"s.bind('\\0{name[1:]}')\n"
        f"assert systemd.notify('READY=1', {{'NOTIFY_SOCKET': '{name}'}})\n"
        "print(s.recv(100).decode())\n"
        "assert not systemd.notify('READY=1', {})\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "READY=1"
