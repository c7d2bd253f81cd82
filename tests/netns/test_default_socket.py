"""Daemons in several network namespaces of one machine with their defaults (issue 21,
item 1): each listens on its namespace's own status socket, and `overlay status` run in a
namespace finds that namespace's daemon."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from overlay.observe import status_socket
from tests.helpers.commands import overlay_cmd
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.netns


def in_ns(ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FLANNELD_STATUS_SOCKET", None)
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


def wait_status(ns: str, timeout: float = 30) -> dict[str, object]:
    """`overlay status --json` in ``ns``, once its daemon has its lease."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        result = in_ns(ns, *overlay_cmd("status", "--json"))
        if result.returncode == 0:
            found: dict[str, object] = json.loads(result.stdout)
            if found.get("state") == "running":
                return found
        last = result.stderr or result.stdout
        time.sleep(0.2)
    raise AssertionError(f"no running daemon answers in {ns}: {last}")


def test_two_daemons_in_two_namespaces_with_default_flags(
    netns: Callable[[str], str], tmp_path: Path
) -> None:
    """Only what is machine-wide by design is given (the shared registry file, and each
    subnet.env, flanneld's one path, which a test must not overwrite): no status socket,
    no interface."""
    a, b = netns("a"), netns("b")
    subprocess.run(
        ["ip", "link", "add", "veth0", "netns", a, "type", "veth", "peer", "veth0", "netns", b],
        check=True,
    )
    for ns, address in ((a, "192.0.2.1/24"), (b, "192.0.2.2/24")):
        subprocess.run(["ip", "-n", ns, "addr", "add", address, "dev", "veth0"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "veth0", "up"], check=True)
    registry = tmp_path / "registry.json"
    daemons = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FLANNELD_STATUS_SOCKET", None)
    try:
        for ns in (a, b):
            argv = overlay_cmd(
                "run", "--registry-file", str(registry), "--network", "198.18.0.0/16"
            )
            argv += ["--subnet-file", str(tmp_path / f"{ns}.env")]
            log = open(tmp_path / f"{ns}.log", "wb")  # noqa: SIM115 - closed with the daemon
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv], stdout=log, stderr=subprocess.STDOUT, env=env
            )
            daemons.append((proc, log))
        seen = {ns: wait_status(ns) for ns in (a, b)}
        leases = {ns: seen[ns]["lease"]["subnet"] for ns in (a, b)}  # type: ignore[index]
        assert leases[a] != leases[b]
        for ns, other in ((a, b), (b, a)):
            assert seen[ns]["node"] == ("192.0.2.1" if ns == a else "192.0.2.2")
            peers = [p["subnet"] for p in seen[ns]["peers"]]  # type: ignore[attr-defined]
            assert peers in ([], [leases[other]])  # the other once the watch has it
            path = Path(f"/run/flannel/netns/{ns}/overlay.sock")
            mode = path.lstat().st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            # `overlay impair` finds the same daemon: its answer names no other node's rules.
            impair = in_ns(ns, *overlay_cmd("impair"))
            assert impair.returncode == 0 and impair.stdout.strip() == "no impairment"
        for proc, _ in daemons:
            proc.terminate()
            assert proc.wait(timeout=10) == 0
        for ns in (a, b):  # the socket and its namespace's directory went with the daemon
            assert not Path(f"/run/flannel/netns/{ns}").exists()
        gone = in_ns(a, *overlay_cmd("status"))
        assert gone.returncode == 1 and f"/run/flannel/netns/{a}/overlay.sock" in gone.stderr
    finally:
        for proc, log in daemons:
            if proc.poll() is None:
                proc.terminate()  # it removes its socket
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
        for ns in (a, b):
            subprocess.run(["rm", "-rf", f"/run/flannel/netns/{ns}"], check=False)
        with contextlib.suppress(OSError):  # another namespace's daemon may be using it
            Path("/run/flannel/netns").rmdir()


def test_default_path_per_namespace(netns: Callable[[str], str], prefix: str) -> None:
    """The machine's namespace keeps flanneld-era's path, a named one gets its name, one
    whose name would not fit a socket path its inode."""
    code = "from overlay.observe.status_socket import default_path; print(default_path())"
    here = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert here.stdout.strip() == status_socket.DEFAULT_SOCKET == "/run/flannel/overlay.sock"
    named = netns("n")
    assert in_ns(named, sys.executable, "-c", code).stdout.strip() == (
        f"/run/flannel/netns/{named}/overlay.sock"
    )
    long_name = netns("x" * 90)
    inode = os.stat(f"/run/netns/{long_name}").st_ino
    assert in_ns(long_name, sys.executable, "-c", code).stdout.strip() == (
        f"/run/flannel/netns-inode/{inode}/overlay.sock"
    )
