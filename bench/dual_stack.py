"""The dual-stack bed of ``overlay bench``'s IPv6 rows (issue 20), until the testbed
builds dual-stack beds.

Two dual-stack vxlan nodes (namespaces ``<prefix>-n1``/``-n2`` on one bridge,
192.0.2.0/24 and 2001:db8::/64, the file registry with ``EnableIPv6``, one ``overlay run``
each, ``--kernel-vxlan`` for the kernel datapath) and a pod behind each node
(``<prefix>-n1-p1``/``-n2-p1``: a veth holding the lease's gateway addresses, as cni0
does). Members are named as the testbed names them (``n1``, ``n2-p1``), so the bench's
measurements run on either. Everything it makes is removed by ``down``, also when
``__init__`` fails half-way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any

from control.file_registry import FileRegistry
from control.subnet_env import parse_subnet_env

CONFIG = {
    "Network": "198.18.0.0/16",
    "EnableIPv6": True,
    "IPv6Network": "fd00:10::/56",
    "Backend": {"Type": "vxlan"},
}
NODES = ("n1", "n2")
LEASE_WAIT_S = 15.0


def _sh(*argv: str, check: bool = True) -> str:
    """Run ``argv``; a failure is a RuntimeError naming the command and its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


class DualStackBed:
    """Two dual-stack vxlan nodes with a pod each; ``kernel``: both on --kernel-vxlan;
    ``daemon_args``: more flags for every daemon (``--workers 2``)."""

    def __init__(self, prefix: str, kernel: bool, daemon_args: tuple[str, ...] = ()) -> None:
        self.prefix = prefix
        self.daemon_args = daemon_args
        self.work = Path(tempfile.mkdtemp(prefix=f"overlay-{prefix}-"))  # 0700, ours
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.addresses: dict[str, tuple[str, str]] = {}  # pod -> (IPv4, IPv6)
        try:
            self._up(kernel)
        except BaseException:
            self.down()
            raise

    def ns(self, name: str) -> str:
        """The namespace of member ``name`` (``n1``, ``n2-p1``)."""
        return f"{self.prefix}-{name}"

    def exec(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside member ``name`` (subprocess.run semantics), as Testbed.exec."""
        return subprocess.run(["ip", "netns", "exec", self.ns(name), *argv], **kwargs)

    def popen(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside member ``name``; ``down`` kills it if still running."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(name), *argv], **kwargs)

    def pod_ip(self, pod: str, family: int) -> str:
        return self.addresses[pod][0 if family == 4 else 1]

    def daemon_pids(self) -> dict[str, int]:
        return {node: daemon.pid for node, daemon in self.daemons.items()}

    def _up(self, kernel: bool) -> None:
        for name in (*NODES, *(f"{n}-p1" for n in NODES)):
            _sh("ip", "netns", "add", self.ns(name))
            _sh("ip", "-n", self.ns(name), "link", "set", "lo", "up")
        self._underlay()
        registry = self.work / "registry.json"
        FileRegistry(registry).put_sync(
            "/coreos.com/network/config", json.dumps(CONFIG).encode(), None
        )
        for node in NODES:
            subnet_file = self._start_daemon(node, registry, kernel)
            self.addresses[f"{node}-p1"] = self._pod(node, subnet_file)

    def _underlay(self) -> None:
        hub = self.ns(NODES[0])
        _sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", hub, "link", "set", "br0", "up")
        for n, node in enumerate(NODES, 1):
            ns = self.ns(node)
            _sh("ip", "-n", hub, "link", "add", f"p{n}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)  # fmt: skip
            _sh("ip", "-n", hub, "link", "set", f"p{n}", "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"192.0.2.{n}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "addr", "add", f"2001:db8::{n}/64", "dev", "eth0", "nodad")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            for sysctl in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
                _sh("ip", "netns", "exec", ns, "sysctl", "-qw", sysctl)

    def _start_daemon(self, node: str, registry: Path, kernel: bool) -> Path:
        """``overlay run`` in ``node``; its subnet file once it holds a lease."""
        subnet_file = self.work / f"{node}.env"
        argv = [
            sys.executable, "-m", "overlay", "run",
            "--registry-file", str(registry), "--iface", "eth0",
            "--subnet-file", str(subnet_file),
            "--status-socket", str(self.work / f"{node}.sock"),
            *(["--kernel-vxlan"] if kernel else []),
            *self.daemon_args,
        ]  # fmt: skip
        log_path = self.work / f"{node}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            self.daemons[node] = self.popen(node, argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + LEASE_WAIT_S
        while not subnet_file.exists():
            if time.monotonic() > deadline or self.daemons[node].poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"{self.ns(node)}: no lease: {' | '.join(tail)}")
            time.sleep(0.1)
        return subnet_file

    def _pod(self, node: str, subnet_file: Path) -> tuple[str, str]:
        """The pod behind ``node``: its addresses in the lease's subnets, routed via it."""
        env = parse_subnet_env(subnet_file.read_text())
        if env.ipv6_subnet is None or env.subnet is None:
            raise RuntimeError(f"{self.ns(node)}: the lease is not dual stack")
        host, pod = self.ns(node), self.ns(f"{node}-p1")
        _sh("ip", "-n", host, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0",
            "netns", pod)  # fmt: skip
        _sh("ip", "-n", host, "addr", "add", str(env.subnet), "dev", "veth0")
        _sh("ip", "-n", host, "addr", "add", str(env.ipv6_subnet), "dev", "veth0", "nodad")
        _sh("ip", "-n", host, "link", "set", "veth0", "up")
        net4, net6 = env.subnet.network, env.ipv6_subnet.network
        v4 = IPv4Interface((int(net4.network_address) + 2, net4.prefixlen))
        v6 = IPv6Interface((int(net6.network_address) + 2, net6.prefixlen))
        _sh("ip", "-n", pod, "addr", "add", str(v4), "dev", "eth0")
        _sh("ip", "-n", pod, "addr", "add", str(v6), "dev", "eth0", "nodad")
        _sh("ip", "-n", pod, "link", "set", "eth0", "up")
        _sh("ip", "-n", pod, "route", "add", "default", "via", str(env.subnet.ip))
        _sh("ip", "-n", pod, "-6", "route", "add", "default", "via", str(env.ipv6_subnet.ip))
        return str(v4.ip), str(v6.ip)

    def down(self) -> None:
        """Stop the daemons, kill what else runs in our namespaces, delete them and the
        work directory; safe to repeat."""
        for daemon in self.daemons.values():
            daemon.terminate()
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self.daemons = {}
        members = [f"{n}-p1" for n in NODES] + list(NODES)
        for ns in (self.ns(m) for m in members):
            if ns not in _sh("ip", "netns", "list", check=False).split():
                continue
            for pid in _sh("ip", "netns", "pids", ns, check=False).split():
                _sh("kill", "-9", pid, check=False)
            _sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.work, ignore_errors=True)
