"""Issue 18 item 1: a full or read-only disk never takes a node down.

Two daemons in namespaces joined by a veth share one file registry on a real tmpfs of
their own (tests/helpers/disks.py). The lease renewal comes a minute after the lease
(`--subnet-lease-renew-margin 1439`, the real flag) and is retried a minute after a
failure (flanneld's interval): the disk is full at the first renewal, read-only at the
retry, writable at the next, and the nodes forward all along and renew at the end. The
other tests are quick: a start on a full registry disk or with a subnet.env it cannot
write says why in one line; a node whose log is on a full disk keeps forwarding and
counts the lines it lost; `overlay trace -w` to a full disk says which file."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from control.file_registry import FileRegistry
from overlay.observe import status_socket as status
from tests.helpers.commands import overlay_cmd
from tests.helpers.polling import poll
from tests.helpers.single_daemon import Daemon

pytestmark = pytest.mark.netns
NETWORK = "198.18.0.0/16"
RENEWAL = 60 + 30  # seconds: the first renewal, a minute after the lease, and some room
RETRY = 60 + 30  # the retry after a failed renewal (RENEW_RETRY), and some room


@dataclass
class Pair:
    """Two node namespaces on one veth: a (192.0.2.1) and b (192.0.2.2)."""

    a: str
    b: str
    a_iface: str
    b_iface: str


@pytest.fixture
def pair(netns: Callable[[str], str], prefix: str) -> Pair:
    a, b = netns("a"), netns("b")
    a_iface, b_iface = f"{prefix}-va", f"{prefix}-vb"
    subprocess.run(
        ["ip", "link", "add", a_iface, "type", "veth", "peer", "name", b_iface], check=True
    )
    for ns, iface, address in ((a, a_iface, "192.0.2.1/24"), (b, b_iface, "192.0.2.2/24")):
        subprocess.run(["ip", "link", "set", iface, "netns", ns], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", address, "dev", iface], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", iface, "up"], check=True)
    return Pair(a, b, a_iface, b_iface)  # the veth goes with the namespaces


def node(
    daemons: Callable[..., Daemon], ns: str, iface: str, here: Path, registry: Path, *flags: str
) -> Daemon:
    here.mkdir(exist_ok=True)
    return daemons(
        ns,
        here,
        *["--registry-file", str(registry), "--network", NETWORK, "--iface", iface, *flags],
        lo=False,
    )


def tun_address(daemon: Daemon) -> str:
    """The node's flannel0 address: its lease's network address."""
    assert poll(daemon.subnet_file.exists, 20), daemon.log.read_text()[-1500:]
    subnet = re.search(r"FLANNEL_SUBNET=([\d.]+)/", daemon.subnet_file.read_text())
    assert subnet, daemon.subnet_file.read_text()
    return subnet[1].rsplit(".", 1)[0] + ".0"


def wait_for(daemon: Daemon, check: Callable[[dict[str, Any]], bool], timeout: float) -> dict:
    """The first event of ``daemon`` that passes ``check`` (fails if it exits first)."""
    found = poll(
        lambda: next((e for e in daemon.events() if check(e)), None) or daemon.proc.poll(),
        timeout,
        0.2,
    )
    assert isinstance(found, dict), f"exit {daemon.proc.poll()}: {daemon.log.read_text()[-1500:]}"
    return found


def renew_failed(reason: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == "lease_renew_failed" and reason in e.get("error", "")


@pytest.fixture
def pinging() -> Iterator[Callable[[str, str], subprocess.Popen[str]]]:
    """pinging(ns, address): ping -i 0.2 in the background; stopped (SIGINT) afterwards."""
    started: list[subprocess.Popen[str]] = []

    def start(ns: str, address: str) -> subprocess.Popen[str]:
        argv = ["ip", "netns", "exec", ns, "ping", "-i", "0.2", "-W", "1", address]
        started.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
        return started[-1]

    yield start
    for ping in started:
        if ping.poll() is None:
            ping.kill()
        ping.communicate()


def ping_summary(ping: subprocess.Popen[str]) -> tuple[int, int]:
    """(sent, answered) of a background ping, which is stopped."""
    ping.send_signal(signal.SIGINT)
    output, _ = ping.communicate(timeout=10)
    counts = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert counts, output
    return int(counts[1]), int(counts[2])


def alive(*nodes: Daemon) -> None:
    for daemon in nodes:
        assert daemon.proc.poll() is None, daemon.log.read_text()[-1500:]
        assert status.query(daemon.socket)["state"] == "running"


def test_nodes_forward_and_renew_through_a_full_then_read_only_registry_disk(
    pair: Pair, disks, daemons, pinging, tmp_path: Path
) -> None:
    disk = disks.tmpfs("reg")
    registry = disk.path / "registry.json"
    flags = ("--subnet-lease-renew-margin", "1439")
    a = node(daemons, pair.a, pair.a_iface, tmp_path / "a", registry, *flags)
    b = node(daemons, pair.b, pair.b_iface, tmp_path / "b", registry, *flags)
    target = tun_address(b)
    tun_address(a)
    assert poll(lambda: len(status.query(a.socket).get("peers", [])) == 1, 10)
    ping = pinging(pair.a, target)
    started = time.time()
    disk.fill()

    # The first renewal, a minute after the lease: the disk is full.
    for daemon in (a, b):
        failed = wait_for(daemon, renew_failed("No space left on device"), RENEWAL)
        assert str(registry) in failed["error"] and "cannot write it" in failed["error"]
        print(f"{daemon.tmp.name}: {failed['error']}")
    alive(a, b)

    # The retry, a minute later: there is room again, but the disk is read-only.
    disk.free()
    disk.read_only()
    for daemon in (a, b):
        failed = wait_for(daemon, renew_failed("Read-only file system"), RETRY)
        print(f"{daemon.tmp.name}: {failed['error']}")
    alive(a, b)

    # The next retry: writable again, and the lease is renewed.
    disk.read_write()
    for daemon in (a, b):
        wait_for(daemon, lambda e: e.get("event") == "lease_renewed", RETRY)
    alive(a, b)
    sent, answered = ping_summary(ping)
    took = time.time() - started
    print(f"{took:.0f} s: {answered} of {sent} pings a -> b answered")
    assert sent >= 5 * took * 0.8 and answered >= sent - 3, (sent, answered)

    keys = json.loads(registry.read_text())["keys"]
    leases = {k: v for k, v in keys.items() if "/subnets/" in k}
    assert len(leases) == 2
    for key, item in leases.items():
        assert item["expires"] > time.time() + 86400 - 120, (key, item)  # renewed just now
    for daemon in (a, b):
        code, _ = daemon.stop()
        assert code == 0, daemon.log.read_text()[-1500:]


# -- a start that cannot write says so in one line -------------------------------------------


def fatal_line(daemon: Daemon, timeout: float = 20) -> str:
    assert daemon.proc.wait(timeout=timeout) == 1, daemon.log.read_text()[-1500:]
    lines = [e for e in daemon.events() if e.get("level") == "fatal"]
    assert len(lines) == 1, daemon.events()
    print(lines[0]["event"])
    return str(lines[0]["event"])


def test_a_start_on_a_full_registry_disk_says_which_file_in_one_line(
    netns: Callable[[str], str], disks, daemons, tmp_path: Path
) -> None:
    ns = netns("start")
    disk = disks.tmpfs("reg")
    disk.fill()
    registry = disk.path / "registry.json"
    flags = ["--registry-file", str(registry), "--network", NETWORK, "--registry-timeout", "1"]
    line = fatal_line(daemons(ns, tmp_path, *flags))
    assert str(registry) in line and "cannot write it: No space left on device" in line
    assert "flannel0" not in links(ns)


def links(ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout


def test_subnet_env_on_a_full_disk_restarts_unchanged_and_fails_in_one_line_else(
    netns: Callable[[str], str], disks, daemons, tmp_path: Path
) -> None:
    """A restart that would write the same subnet.env starts on a full disk (nothing to
    write); one that must write it stops with one line naming it, leaving nothing."""
    ns = netns("env")
    disk = disks.tmpfs("run")
    subnet_env = disk.path / "subnet.env"
    flags = ["--registry-file", str(tmp_path / "registry.json"), "--network", NETWORK]
    flags += ["--subnet-file", str(subnet_env)]
    for run in ("1", "2", "3"):
        (tmp_path / run).mkdir()
    first = daemons(ns, tmp_path / "1", *flags)
    assert poll(subnet_env.exists, 20), first.log.read_text()[-1500:]
    written = subnet_env.read_text()
    assert first.stop()[0] == 0
    disk.fill()

    again = daemons(ns, tmp_path / "2", *flags)
    wait_for(again, lambda e: e.get("event") == "started", 20)
    assert subnet_env.read_text() == written
    assert again.stop()[0] == 0

    subnet_env.unlink()
    disk.fill()  # the page subnet.env had is taken too
    third = daemons(ns, tmp_path / "3", *flags)
    line = fatal_line(third)
    assert line == f"--subnet-file {subnet_env}: cannot write it: No space left on device"
    assert not subnet_env.exists()
    assert "flannel0" not in links(ns)


# -- a log that cannot be written ----------------------------------------------------------


def test_a_node_whose_log_disk_is_full_keeps_forwarding_and_counts_the_lines_lost(
    pair: Pair, disks, daemons, pinging, tmp_path: Path
) -> None:
    logs = disks.tmpfs("logs")
    log = logs.path / "a.log"
    registry = tmp_path / "registry.json"
    a_dir = tmp_path / "a"
    a_dir.mkdir()
    a = daemons(
        pair.a,
        a_dir,
        *["--registry-file", str(registry), "--network", NETWORK, "--iface", pair.a_iface],
        lo=False,
        log=log,
    )
    tun_address(a)
    with open(log, "ab") as out:  # the log's last page taken: its next line needs a new one
        out.write(b" " * (-log.stat().st_size % 4096))
    logs.fill()

    b = node(daemons, pair.b, pair.b_iface, tmp_path / "b", registry)
    target = tun_address(b)
    assert poll(lambda: len(status.query(a.socket).get("peers", [])) == 1, 10)
    ping = pinging(pair.a, target)
    time.sleep(2)
    sent, answered = ping_summary(ping)
    print(f"log disk full: {answered} of {sent} pings a -> b answered")
    assert sent >= 5 and answered >= sent - 1
    alive(a)
    lost = status.query(a.socket)["log_lines_lost"]
    print(f"lines lost: {lost}")
    assert lost >= 1

    logs.free()
    assert b.stop()[0] == 0
    b_key = next(k for k in json.loads(registry.read_text())["keys"] if f"/{target}-24" in k)
    FileRegistry(registry).delete_sync(b_key)  # a logs the peer going: written now
    assert poll(lambda: "peer_removed" in log.read_text(errors="replace"), 10)
    alive(a)


# -- overlay trace -w to a full disk ----------------------------------------------------------


def test_trace_to_a_full_disk_is_one_line_naming_the_file(
    netns: Callable[[str], str], disks, daemons, tmp_path: Path
) -> None:
    ns = netns("trace")
    daemon = daemons(
        ns, tmp_path, "--registry-file", str(tmp_path / "registry.json"), "--network", NETWORK
    )
    assert poll(daemon.subnet_file.exists, 20), daemon.log.read_text()[-1500:]
    disk = disks.tmpfs("captures")
    disk.fill()
    capture = disk.path / "trace.pcapng"
    result = subprocess.run(
        [*overlay_cmd("trace", "--status-socket", str(daemon.socket), "-c", "5", "-w")]
        + [str(capture)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    print(result.stderr)
    assert result.returncode == 1
    assert lines[-1] == f"overlay trace: error: cannot write {capture}: No space left on device"
    assert "Traceback" not in result.stderr
    alive(daemon)
