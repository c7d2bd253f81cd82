"""overlay.node.mtu in a hostile environment, on one daemon (udp, the namespace's lo as
its underlay, changed with real netlink): an underlay MTU too small for the backend is
one error line and nothing else changes; a subnet.env that cannot be rewritten is one
error line, the datapath follows all the same, and the file is rewritten once it can
be. The end-to-end behaviour on testbeds is in tests/netns/test_underlay_mtu.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from control.subnet_env import parse_subnet_env
from overlay.observe import status_socket as status
from tests.helpers.polling import poll
from tests.helpers.single_daemon import Daemon

pytestmark = pytest.mark.netns
NETWORK = "198.18.0.0/16"


def ip(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, *args], check=True, capture_output=True, text=True
    ).stdout


def tun_mtu(ns: str) -> int:
    return int(json.loads(ip(ns, "-j", "link", "show", "flannel0"))[0]["mtu"])


def named(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == event]


def started(ns: str, tmp_path: Path, daemons: Any) -> Daemon:
    ip(ns, "link", "set", "lo", "mtu", "1500")
    daemon: Daemon = daemons(
        ns, tmp_path, "--registry-file", str(tmp_path / "registry.json"), "--network", NETWORK
    )
    daemon.wait_event("started")
    assert tun_mtu(ns) == 1472
    return daemon


def test_an_underlay_mtu_too_small_is_one_error_and_changes_nothing(
    netns: Any, tmp_path: Path, daemons: Any
) -> None:
    ns = netns("small")
    daemon = started(ns, tmp_path, daemons)
    ip(ns, "link", "set", "lo", "mtu", "90")  # udp needs 68 + 28
    assert poll(lambda: named(daemon, "underlay_mtu_too_small"), 3.0), daemon.events()[-3:]
    [error] = named(daemon, "underlay_mtu_too_small")
    assert error["level"] == "error"
    assert (error["iface"], error["underlay_mtu"], error["needs"], error["mtu"]) == (
        "lo",
        90,
        96,
        1472,
    )
    ip(ns, "addr", "add", "127.0.0.9/8", "dev", "lo")  # another netlink event: said once
    shown = status.query(daemon.socket)
    assert (shown["mtu"], shown["underlay_mtu"], shown["mtu_changes"]) == (1472, 1500, 0)
    assert tun_mtu(ns) == 1472 and parse_subnet_env(daemon.subnet_file.read_text()).mtu == 1472
    ip(ns, "link", "set", "lo", "mtu", "1400")  # one that fits is followed
    assert poll(lambda: tun_mtu(ns) == 1372, 3.0)
    assert len(named(daemon, "underlay_mtu_too_small")) == 1
    assert daemon.proc.poll() is None


def test_a_subnet_env_that_cannot_be_rewritten_is_one_error_then_rewritten(
    netns: Any, tmp_path: Path, daemons: Any
) -> None:
    ns = netns("envro")
    daemon = started(ns, tmp_path, daemons)
    env = daemon.subnet_file
    env.unlink()
    env.mkdir()  # a directory that is not empty: the atomic rename onto it fails
    (env / "in-the-way").write_text("")
    ip(ns, "link", "set", "lo", "mtu", "1400")
    assert poll(lambda: named(daemon, "subnet_env_not_rewritten"), 3.0), daemon.events()[-3:]
    [error] = named(daemon, "subnet_env_not_rewritten")
    assert error["level"] == "error" and error["path"] == str(env)
    assert tun_mtu(ns) == 1372  # the datapath followed all the same
    assert status.query(daemon.socket)["mtu_changes"] == 1
    (env / "in-the-way").unlink()
    env.rmdir()
    ip(ns, "addr", "add", "127.0.0.9/8", "dev", "lo")  # a netlink event: a check, which can
    assert poll(lambda: env.is_file(), 3.0)
    assert parse_subnet_env(env.read_text()).mtu == 1372
    assert len(named(daemon, "subnet_env_not_rewritten")) == 1
    assert named(daemon, "subnet_env_rewritten")
    assert daemon.proc.poll() is None
