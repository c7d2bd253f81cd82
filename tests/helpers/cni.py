"""The CNI plugin as a container runtime calls it: a process with CNI_* variables and its
network config on stdin, next to Debian's containernetworking-plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from overlay.lab.netns import run_in
from tests.helpers.paths import ROOT

CNI_BIN = Path("/usr/lib/cni")
PLUGIN = [sys.executable, "-m", "overlay.cni"]
RUN = f"c{os.getpid() % 10000}"

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not (CNI_BIN / "bridge").exists(),
    reason="needs root and containernetworking-plugins in /usr/lib/cni",
)


def subnet_env_text(ip_masq: bool = True) -> str:
    return (
        "FLANNEL_NETWORK=198.18.0.0/16\n"
        "FLANNEL_SUBNET=198.18.3.1/24\n"
        "FLANNEL_MTU=1400\n"
        f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}\n"
    )


def netconf(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": f"overlay-{RUN}",
        "type": "overlay-cni",
        "subnetFile": str(tmp_path / "subnet.env"),
        "dataDir": str(tmp_path / "cni"),
        "ipamDataDir": str(tmp_path / "ipam"),
    }
    conf.update(extra)
    return conf


def cni_env(command: str, container: str, netns: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CNI_COMMAND=command,
        CNI_CONTAINERID=container,
        CNI_IFNAME="eth0",
        CNI_PATH=str(CNI_BIN),
    )
    if netns is not None:
        env["CNI_NETNS"] = f"/run/netns/{netns}"
    return env


def invoke(
    command: str,
    conf: dict[str, Any] | str,
    *,
    node: str | None = None,
    pod: str | None = None,
    container: str = "ctr1",
) -> subprocess.CompletedProcess[str]:
    """Run the plugin as a runtime would: a process with CNI_* env and config on stdin."""
    stdin = conf if isinstance(conf, str) else json.dumps(conf)
    argv = PLUGIN if node is None else ["ip", "netns", "exec", node, *PLUGIN]
    return subprocess.run(
        argv,
        input=stdin,
        env=cni_env(command, container, pod),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def ip_json(ns: str, *args: str) -> Any:
    proc = run_in(ns, ["ip", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)
