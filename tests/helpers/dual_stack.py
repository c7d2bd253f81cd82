"""Two (or more) node namespaces on one IPv4 + IPv6 underlay (192.0.2.0/24 and
2001:db8::/64, a bridge in the first node's namespace; or IPv6 only), pods behind a veth
as the CNI bridge makes them, a file registry seeded with a config, one daemon per node,
a TCP probe of the source address a connection arrives with, and the checked transfers of
``overlay.lab.transfer`` between such pods: what the dual-stack, IPv6-only, observation
and nftables suites share."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any

from control.file_registry import FileRegistry
from control.subnet_env import SubnetEnv
from overlay.observe import status_socket as status

CONFIG_KEY = "/coreos.com/network/config"
SUBNETS = "/coreos.com/network/subnets/"
DUAL = {"Network": "198.18.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10::/56"}
V6_ONLY = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10::/56"}
# The datapaths that carry IPv6: (Backend, the daemon's flags), and their test ids.
DATAPATHS = [
    ({"Type": "host-gw"}, ()),
    ({"Type": "vxlan"}, ("--kernel-vxlan",)),
    ({"Type": "vxlan"}, ()),
]
DATAPATH_IDS = ["host-gw", "kernel-vxlan", "userspace-vxlan"]


def ip(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, *args], check=True, capture_output=True, text=True
    ).stdout


def ip_out(ns: str, *args: str) -> str:
    """``ip`` output, empty when it fails (a device that is gone, for now)."""
    return subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True).stdout


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], check=check, capture_output=True, text=True
    )


def underlay(nodes: list[str], ipv4: bool = True, hub: str | None = None) -> None:
    """eth0 in each node on one bridge in ``hub`` (default: the first node's namespace;
    br0, with a port per node), 192.0.2.<n>/24 (unless not ``ipv4``) and
    2001:db8::<n>/64 (no DAD: usable at once). With three nodes or more, give a hub of its
    own: a node's netfilter (its ip-masq rules) would see the others' bridged traffic."""
    hub = hub or nodes[0]
    ip(hub, "link", "add", "br0", "type", "bridge")
    ip(hub, "link", "set", "br0", "up")
    for n, ns in enumerate(nodes, 1):
        ip(hub, "link", "add", f"p{n}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip(hub, "link", "set", f"p{n}", "master", "br0", "up")
        if ipv4:
            ip(ns, "addr", "add", f"192.0.2.{n}/24", "dev", "eth0")
        ip(ns, "addr", "add", f"2001:db8::{n}/64", "dev", "eth0", "nodad")
        ip(ns, "link", "set", "eth0", "up")
        for sysctl in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            in_ns(ns, "sysctl", "-qw", sysctl)


def pod(node: str, pod_ns: str, env: SubnetEnv) -> tuple[str, str]:
    """A pod behind a veth: the node side holds the lease's gateway addresses (as the CNI
    bridge cni0 does), the pod .2 of each subnet with default routes; its addresses."""
    assert env.ipv6_subnet is not None
    ip(node, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
    ip(node, "addr", "add", str(env.subnet), "dev", "veth0")
    ip(node, "addr", "add", str(env.ipv6_subnet), "dev", "veth0", "nodad")
    ip(node, "link", "set", "veth0", "up")
    v4 = IPv4Interface((int(env.subnet.network.network_address) + 2, env.subnet.network.prefixlen))
    subnet6 = env.ipv6_subnet.network
    v6 = IPv6Interface((int(subnet6.network_address) + 2, subnet6.prefixlen))
    ip(pod_ns, "addr", "add", str(v4), "dev", "eth0")
    ip(pod_ns, "addr", "add", str(v6), "dev", "eth0", "nodad")
    ip(pod_ns, "link", "set", "eth0", "up")
    ip(pod_ns, "route", "add", "default", "via", str(env.subnet.ip))
    ip(pod_ns, "-6", "route", "add", "default", "via", str(env.ipv6_subnet.ip))
    return str(v4.ip), str(v6.ip)


def pod6(node: str, pod_ns: str, env: SubnetEnv) -> str:
    """An IPv6-only pod (IPv6-only subnet.env): its ::2 of the lease behind a veth whose
    node side holds the gateway address; its address."""
    assert env.ipv6_subnet is not None and env.subnet is None
    ip(node, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
    ip(node, "addr", "add", str(env.ipv6_subnet), "dev", "veth0", "nodad")
    ip(node, "link", "set", "veth0", "up")
    subnet6 = env.ipv6_subnet.network
    v6 = IPv6Interface((int(subnet6.network_address) + 2, subnet6.prefixlen))
    ip(pod_ns, "addr", "add", str(v6), "dev", "eth0", "nodad")
    ip(pod_ns, "link", "set", "eth0", "up")
    ip(pod_ns, "-6", "route", "add", "default", "via", str(env.ipv6_subnet.ip))
    return str(v6.ip)


class Pods:
    """What ``overlay.lab.transfer.transfer`` needs of a bed, for pods made here: their
    addresses by name, and running a program in one."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses

    def pod_ip(self, pod_ns: str) -> str:
        return self.addresses[pod_ns]

    def popen(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)

    def exec(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], check=False, **kwargs)


def kernel_of(daemon: Any) -> dict[str, Any]:
    return dict(status.query(daemon.socket)["kernel"])


def kernel_exact(daemon: Any) -> bool:
    """A check has run and found nothing missing and nothing extra, in both families."""
    kernel = kernel_of(daemon)
    return bool(kernel["checked_at"]) and kernel["missing"] == kernel["extra"] == []


def pings(src_ns: str, address: str) -> bool:
    return in_ns(src_ns, "ping", "-c", "1", "-W", "1", address, check=False).returncode == 0


def seed(tmp_path: Path, config: dict[str, Any]) -> Path:
    registry = tmp_path / "registry.json"
    FileRegistry(registry).put_sync(CONFIG_KEY, json.dumps(config).encode(), None)
    return registry


def leases(registry: Path) -> dict[str, dict[str, Any]]:
    entries, _ = FileRegistry(registry).list_sync(SUBNETS)
    return {e.key.rsplit("/", 1)[-1]: json.loads(e.value) for e in entries}


def start_nodes(
    netns: Callable[[str], str],
    daemons: Any,
    tmp_path: Path,
    config: dict[str, Any],
    *flags: str,
    count: int = 2,
    ipv4: bool = True,
) -> tuple[list[str], list[Any], Path]:
    """``count`` nodes on one underlay (IPv6 only unless ``ipv4``), a daemon each."""
    nodes = [netns(f"n{n}") for n in range(1, count + 1)]
    underlay(nodes, ipv4, hub=netns("ul") if count > 2 else None)
    registry = seed(tmp_path, config)
    started = []
    for n, ns in enumerate(nodes, 1):
        work = tmp_path / f"n{n}"
        work.mkdir()
        started.append(
            daemons(ns, work, "--registry-file", str(registry), "--iface", "eth0", *flags, lo=False)
        )
    for daemon in started:
        daemon.wait_event("started")
    return nodes, started, registry


# Who connected, as the server saw it: prints the peer address of one TCP connection.
PEER_SERVER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.create_server((sys.argv[1], 7777), family=family)
print("ready", flush=True)
conn, peer = s.accept()
print(peer[0], flush=True)
"""
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], 7777), timeout=5).close()"


@contextmanager
def serving(ns: str, script: str, *args: str) -> Iterator[Callable[[], str]]:
    """``script`` running in ``ns`` until the block ends, once it printed "ready": its
    next output line, on each call."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, "python3", "-c", script, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        out = server.stdout
        assert out.readline().strip() == "ready"
        yield lambda: out.readline().strip()
    finally:
        server.kill()
        server.wait()


def peer_seen(server_ns: str, address: str, client_ns: str) -> str:
    """The source address a TCP connection from ``client_ns`` to ``address`` arrives with."""
    with serving(server_ns, PEER_SERVER, address) as line:
        in_ns(client_ns, "python3", "-c", CONNECT, address)
        return line()


# Receives one TCP connection on [address]:7778 and prints the SHA-256 of what came.
SINK = """
import hashlib, socket, sys
s = socket.create_server((sys.argv[1], 7778), family=socket.AF_INET6)
print("ready", flush=True)
conn, _ = s.accept()
digest = hashlib.sha256()
while chunk := conn.recv(1 << 16):
    digest.update(chunk)
print(digest.hexdigest(), flush=True)
"""
# Sends argv[2] MB of seeded random bytes to [argv[1]]:7778; prints their SHA-256.
SOURCE = """
import hashlib, random, socket, sys
data = random.Random(7).randbytes(int(sys.argv[2]) << 20)
with socket.create_connection((sys.argv[1], 7778), timeout=30) as c:
    c.sendall(data)
print(hashlib.sha256(data).hexdigest(), flush=True)
"""


def tcp_transfer(src_ns: str, dst_ns: str, address: str, megabytes: int = 20) -> None:
    """``megabytes`` over one TCP connection from ``src_ns`` to ``address`` in ``dst_ns``,
    arriving intact (the SHA-256 of both ends compared)."""
    with serving(dst_ns, SINK, address) as line:
        sent = in_ns(src_ns, "timeout", "60", "python3", "-c", SOURCE, address, str(megabytes))
        assert line() == sent.stdout.strip()
