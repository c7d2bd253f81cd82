"""The testbed's start server (overlay/lab/starter.py, run as ``python -m
overlay.start_server``): a bed's daemons are forked by it into their namespaces, as
``ip netns exec`` would place them, and stop, kill -9 and restart still work on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.lab.errors import TestbedError
from overlay.lab.faults import Faults
from overlay.lab.netns import list_netns, pid_alive
from overlay.lab.starter import StartServer
from overlay.lab.testbed import Testbed
from tests.helpers.paths import ROOT


def _status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split()[1]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _links_of(netns: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _links_seen_by(pid: int) -> set[str]:
    """/sys/class/net as the process sees it (through its own mount namespace)."""
    return set(os.listdir(f"/proc/{pid}/root/sys/class/net"))


@pytest.fixture
def bed() -> Iterator[Testbed]:
    made = Testbed("f" + uuid.uuid4().hex[:6], nodes=2, pods_per_node=1, registry="file")
    try:
        yield made
    finally:
        made.down()
        assert [ns for ns in list_netns() if ns.startswith(f"{made.prefix}-")] == []


@pytest.mark.netns
def test_a_beds_daemons_are_forked_into_their_namespaces(bed: Testbed) -> None:
    """Each daemon is a child of the bed's start server, in its node's network
    namespace, in a mount namespace of its own whose /sys shows the node's links (as
    under `ip netns exec`), and holds its lease."""
    bed.up()
    server = bed.start_server_pid()
    assert server is not None and pid_alive(server)
    for i in (1, 2):
        pid = bed._daemon_pid(i)
        assert pid is not None
        assert int(_status_field(pid, "PPid")) == server
        node_ns = os.stat(f"/run/netns/{bed.node_ns(i)}").st_ino
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == node_ns
        assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
        links = _links_seen_by(pid)
        assert {"lo", "eth0", "flannel0", "cni0"} <= links
        assert links == _links_of(bed.node_ns(i))
        assert bed.status()["nodes"][i - 1]["subnet"]
    bed.down()
    assert not pid_alive(server)


@pytest.mark.netns
def test_stop_kill_and_restart_of_a_forked_daemon(bed: Testbed) -> None:
    """kill -9 and start again through the fault commands, then a SIGTERM whose exit
    status comes back through the server, as a Popen's would."""
    bed.up()
    faults = Faults(bed)
    killed = faults.node_stop(2, kill=True)
    assert not pid_alive(killed["pid"])
    assert bed.status()["nodes"][1]["running"] is False
    started = faults.node_start(2)
    assert started["pid"] != killed["pid"] and started["subnet"]
    assert int(_status_field(started["pid"], "PPid")) == bed.start_server_pid()
    proc = bed._procs[2]
    proc.terminate()
    assert proc.wait(timeout=10) == 0  # the daemon's clean exit on SIGTERM
    assert bed.status()["nodes"][1]["running"] is False


@pytest.mark.netns
def test_a_namespace_that_is_not_there_is_one_line_in_the_log(tmp_path: Path) -> None:
    """The child cannot enter its namespace: it exits 1 with the reason in its log (as
    `ip netns exec` would), and the server goes on serving."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = StartServer(
        [sys.executable, "-m", "overlay.start_server", str(tmp_path)], env, tmp_path / "s.log"
    )
    try:
        log = tmp_path / "n1.log"
        missing = "nx" + uuid.uuid4().hex[:6]
        for _ in range(2):
            (daemon,) = server.start([(missing, ["run", "--help"], log)])
            assert daemon.wait(timeout=30) == 1
        lines = log.read_text().splitlines()
        assert len(lines) == 2
        assert lines[0].startswith(f"overlay start server: node daemon in {missing}: ")
        assert "No such file or directory" in lines[0]
    finally:
        server.close()
    assert server.proc.returncode == 0
    with pytest.raises(TestbedError, match="start server exited"):
        server.start([(missing, ["run"], log)])


def test_a_server_whose_testbed_is_gone_forks_no_more(tmp_path: Path) -> None:
    """`up` killed right after it asked for a batch: the server forks none of it (each
    child would leave a line in its log) and exits, so no daemon appears while the
    guard's `down` looks for what to remove."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = StartServer(
        [sys.executable, "-m", "overlay.start_server", str(tmp_path)], env, tmp_path / "s.log"
    )
    log = tmp_path / "n.log"
    starts = [{"netns": f"nx{uuid.uuid4().hex[:6]}", "argv": ["run"], "log": str(log)}] * 20
    server._to.write(json.dumps({"start": starts}).encode() + b"\n")
    server._to.close()  # as when up's process dies: the pipe's write end goes
    assert server.proc.wait(timeout=30) == 0
    server.close()
    assert not log.exists()
