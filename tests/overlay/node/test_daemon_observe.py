"""One daemon on its own (a namespace, the file registry): its status socket is only
ever its own (issue 10 item 6), SIGUSR1/SIGQUIT dump every thread and task, -v N means
something, and the fatal line is stamped like the others."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from control.file_registry import FileRegistry
from overlay.lab.netns import entered
from overlay.node.options import PEER_SERIES
from overlay.observe import status_socket as status
from tests.helpers.commands import fatal_text, overlay_cmd
from tests.helpers.polling import poll

pytestmark = pytest.mark.netns

PREFIX = "/coreos.com/network/subnets/"


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    log: Path
    sock: Path
    subnet_env: Path
    ns: str

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict]:
        return [json.loads(x) for x in self.text().splitlines() if x.startswith("{")]


@pytest.fixture
def start(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """start(*flags, sock=None, name="a"): a daemon in a fresh namespace (on lo)."""
    runs: list[Run] = []
    namespaces: dict[str, str] = {}

    def run(*flags: str, sock: Path | None = None, name: str = "a", ns: str = "") -> Run:
        if not ns:
            ns = namespaces.setdefault(name, netns(name))
        here = tmp_path / name
        here.mkdir(exist_ok=True)
        sock = sock or here / "s.sock"
        log = here / f"log{len(runs)}"
        argv = [
            *["ip", "netns", "exec", ns, *overlay_cmd("run")],
            *["--registry-file", str(tmp_path / "r.json"), "--network", "198.18.0.0/16"],
            *["--iface", "lo", "--subnet-file", str(here / "subnet.env")],
            *["--status-socket", str(sock), *flags],
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        result = Run(proc, log, sock, here / "subnet.env", ns)
        runs.append(result)
        return result

    yield run
    for r in runs:
        if r.proc.poll() is None:
            r.proc.kill()
        r.proc.wait()


def up(run: Run) -> Run:
    assert poll(run.subnet_env.exists, 20), run.text()
    assert poll(lambda: run.sock.exists(), 5)
    return run


def test_a_regular_file_at_the_socket_path_is_refused_and_kept(start, tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("do not delete me\n")
    run = start(sock=path)
    assert run.proc.wait(timeout=20) == 1
    lines = [x for x in run.text().splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert "exists and is not a socket: refusing to replace it" in fatal_text(lines[0])
    assert path.read_text() == "do not delete me\n"
    assert not run.subnet_env.exists()  # refused before anything was leased


def test_a_second_daemon_on_a_live_socket_is_refused(start, tmp_path: Path) -> None:
    first = up(start())
    ino = first.sock.stat().st_ino
    second = start(sock=first.sock, name="b")
    assert second.proc.wait(timeout=20) == 1
    assert "another daemon answers on --status-socket" in fatal_text(second.text().strip())
    assert first.sock.stat().st_ino == ino  # still the first one's
    assert status.query(first.sock)["lease"]["subnet"]
    first.proc.terminate()
    assert first.proc.wait(timeout=10) == 0
    assert not first.sock.exists()  # its own socket, removed at exit


def test_a_stale_socket_is_taken_over(start, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # what a daemon killed with -9 leaves: a socket nobody listens on
    up(start(sock=path))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert status.query(path)["state"] == "running"


def test_exit_leaves_a_socket_that_is_no_longer_ours(start, tmp_path: Path) -> None:
    run = up(start())
    run.sock.unlink()  # someone else put their own socket there meanwhile
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(run.sock))
    try:
        ino = run.sock.stat().st_ino
        run.proc.terminate()
        assert run.proc.wait(timeout=10) == 0
        assert run.sock.exists() and run.sock.stat().st_ino == ino
    finally:
        other.close()


def test_status_answers_while_the_daemon_waits_for_its_config(netns, tmp_path: Path) -> None:
    ns = netns("wait")
    sock = tmp_path / "s.sock"
    argv = [
        *["ip", "netns", "exec", ns, *overlay_cmd("run")],
        *["--registry-file", str(tmp_path / "r.json"), "--iface", "lo"],
        *["--subnet-file", str(tmp_path / "subnet.env"), "--status-socket", str(sock)],
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert poll(sock.exists, 10)
        st = status.query(sock)
        assert st["state"] == "starting" and st["ready"]["ready"] is False
        table = subprocess.run(
            overlay_cmd("status", "--status-socket", str(sock)), capture_output=True, text=True
        ).stdout
        assert "starting (waiting for a lease" in table
    finally:
        proc.terminate()
        code = proc.wait(timeout=10)
    assert code == 0 and not sock.exists()


def test_sigusr1_dumps_every_thread_and_task_and_carries_on(start) -> None:
    run = up(start("--log-format", "json"))
    # subnet.env is written just before the daemon's long-running tasks are created: on a
    # loaded machine the first dump can come before them, so ask again until it shows them.
    for dumps in range(1, 11):
        os.kill(run.proc.pid, signal.SIGUSR1)
        assert poll(lambda n=dumps: run.text().count("--- end of SIGUSR1 dump") >= n, 10)
        if "keep_renewed" in run.text():
            break
        time.sleep(0.2)
    text = run.text()
    assert "Current thread 0x" in text and "(most recent call first)" in text  # the thread stacks
    assert "asyncio tasks; threads:" in text and "task " in text
    assert "keep_renewed" in text  # the renewal task's stack is there
    assert run.proc.poll() is None
    assert status.query(run.sock)["state"] == "running"


def test_sigquit_dumps_then_stops_with_status_2(start) -> None:
    run = up(start())
    os.kill(run.proc.pid, signal.SIGQUIT)
    assert run.proc.wait(timeout=15) == 2
    text = run.text()
    assert "--- SIGQUIT:" in text and "Current thread 0x" in text
    assert not run.sock.exists()  # a clean stop: the socket and the TUN went away
    links = subprocess.run(["ip", "-n", run.ns, "-o", "link"], capture_output=True, text=True)
    assert "flannel0" not in links.stdout


@pytest.mark.parametrize(("level", "debug"), [("0", False), ("2", True)])
def test_v_2_logs_every_registry_event(start, level: str, debug: bool) -> None:
    run = up(start("-v", level, "--log-format", "json"))
    time.sleep(0.3)
    run.proc.terminate()
    run.proc.wait(timeout=10)
    listed = [e for e in run.events() if e["event"] == "leases_listed"]
    assert bool(listed) == debug, run.text()
    if debug:
        assert listed[0]["level"] == "debug"
    assert all(e["level"] != "debug" for e in run.events()) or debug


def _metrics(ns: str, port: int) -> str:
    with entered(ns):  # the connection's socket is made in the daemon's namespace
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/metrics")
            return connection.getresponse().read().decode()
        finally:
            connection.close()


def test_metrics_have_per_peer_series_for_a_bounded_number_of_peers(start, tmp_path: Path) -> None:
    """Issue 19: 150 peers, per-peer series for PEER_SERIES (100) of them; overlay_peers
    and `overlay status` still count and list them all."""
    port = 9155
    run = up(start("--healthz-port", str(port), "--healthz-ip", "127.0.0.1"))
    registry = FileRegistry(tmp_path / "r.json")
    for i in range(150):
        value = json.dumps({"PublicIP": f"192.0.2.{i + 10}", "PublicIPv6": None})
        registry.put_sync(f"/coreos.com/network/subnets/198.18.{i + 100}.0-24", value.encode(), 600)
    assert poll(lambda: len(status.query(run.sock)["peers"]) == 150, 20), run.text()
    text = _metrics(run.ns, port)
    assert "overlay_peers 150.0" in text
    labelled = set(re.findall(r'^overlay_peer_sent_packets_total\{peer="([^"]+)"', text, re.M))
    assert len(labelled) == PEER_SERIES, f"{len(labelled)} peers have series"


def test_status_lists_the_peers_by_subnet_through_adds_edits_and_removals(
    start, tmp_path: Path
) -> None:
    """Issue 19: the rows come from the order kept beside the peer table batch by batch
    (overlay.node.peer_order), not sorted per answer: after a burst of adds written out
    of order, then single edits, removals and adds, they are still exactly the registry's
    leases, by subnet (subnets above those acquire picks from: never our own)."""
    run = up(start())
    registry = FileRegistry(tmp_path / "r.json")
    wanted: dict[str, str] = {}

    def put(third: int, host: int) -> None:
        value = json.dumps({"PublicIP": f"192.0.2.{host}", "PublicIPv6": None})
        registry.put_sync(f"{PREFIX}198.18.{third}.0-24", value.encode(), 600)
        wanted[f"198.18.{third}.0/24"] = f"192.0.2.{host}"

    def remove(third: int) -> None:
        registry.delete_sync(f"{PREFIX}198.18.{third}.0-24")
        del wanted[f"198.18.{third}.0/24"]

    def listed() -> list[tuple[str, str]]:
        return [(p["subnet"], p["public_ip"]) for p in status.query(run.sock)["peers"]]

    def by_subnet() -> list[tuple[str, str]]:
        return sorted(wanted.items(), key=lambda row: IPv4Network(row[0]))

    burst = list(range(180, 250))
    random.Random(19).shuffle(burst)
    for third in burst:
        put(third, third - 170)
    assert poll(lambda: listed() == by_subnet(), 20), run.text()
    for third in (181, 215, 249):
        put(third, 250)  # an edit: the same subnet, another public IP
        assert poll(lambda: listed() == by_subnet(), 10), run.text()
    for third in (180, 200, 230):
        remove(third)
        assert poll(lambda: listed() == by_subnet(), 10), run.text()
    for third in (250, 179, 200):
        put(third, 251)
        assert poll(lambda: listed() == by_subnet(), 10), run.text()
