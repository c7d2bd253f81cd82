"""``python -m bench.ipv6_vxlan``: IPv6 beside IPv4 on vxlan, userspace and kernel datapath
(issue 20), until the testbed builds dual-stack beds.

Per datapath, a bed of two dual-stack nodes (namespaces ``<prefix>-n1``/``-n2`` on one
bridge, 192.0.2.0/24 and 2001:db8::/64, the file registry, one ``overlay run`` each) and a
pod behind each node (a veth holding the lease's gateway addresses, as cni0 does). Pod to
pod, each family: ping RTT (``--pings`` at 10 ms, p50 and p99 of the replies) and iperf3
TCP, one stream, ``--seconds`` long, with the machine's CPU seconds per GB moved
(``bench.measure.machine_cpu_seconds``: the kernel's vxlan work is softirq, in no
process). Run it under the lock: ``flock /work/heavy.lock .venv/bin/python -m
bench.ipv6_vxlan``. Everything it makes is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any

from bench.measure import machine_cpu_seconds, percentile
from control.file_registry import FileRegistry
from control.subnet_env import parse_subnet_env

CONFIG = {
    "Network": "198.18.0.0/16",
    "EnableIPv6": True,
    "IPv6Network": "fd00:10::/56",
    "Backend": {"Type": "vxlan"},
}


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def in_ns(ns: str, *argv: str, check: bool = True) -> str:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


class Bed:
    """Two dual-stack vxlan nodes, each with a pod; ``kernel``: --kernel-vxlan."""

    def __init__(self, prefix: str, kernel: bool, work: Path) -> None:
        self.prefix = prefix
        self.nodes = [f"{prefix}-n1", f"{prefix}-n2"]
        self.pods = [f"{prefix}-p1", f"{prefix}-p2"]
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.addresses: list[tuple[str, str]] = []
        for ns in self.nodes + self.pods:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        self._underlay()
        registry = work / "registry.json"
        FileRegistry(registry).put_sync(
            "/coreos.com/network/config", json.dumps(CONFIG).encode(), None
        )
        for n, ns in enumerate(self.nodes, 1):
            subnet_file = work / f"subnet{n}.env"
            argv = [
                "ip", "netns", "exec", ns, sys.executable, "-m", "overlay", "run",
                "--registry-file", str(registry), "--iface", "eth0",
                "--subnet-file", str(subnet_file), "--status-socket", str(work / f"s{n}.sock"),
                *(["--kernel-vxlan"] if kernel else []),
            ]  # fmt: skip
            log = open(work / f"daemon{n}.log", "wb")  # noqa: SIM115 - closed with the process
            self.daemons.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            for _ in range(150):
                if subnet_file.exists():
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"{ns}: no lease: {(work / f'daemon{n}.log').read_text()}")
            self.addresses.append(self._pod(ns, self.pods[n - 1], subnet_file))

    def _underlay(self) -> None:
        hub = self.nodes[0]
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        for n, ns in enumerate(self.nodes, 1):
            sh("ip", "-n", hub, "link", "add", f"p{n}", "type", "veth", "peer", "name", "eth0",
               "netns", ns)  # fmt: skip
            sh("ip", "-n", hub, "link", "set", f"p{n}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"192.0.2.{n}/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"2001:db8::{n}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            for sysctl in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
                in_ns(ns, "sysctl", "-qw", sysctl)

    @staticmethod
    def _pod(node: str, pod: str, subnet_file: Path) -> tuple[str, str]:
        env = parse_subnet_env(subnet_file.read_text())
        assert env.ipv6_subnet is not None and env.subnet is not None
        sh("ip", "-n", node, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0",
           "netns", pod)  # fmt: skip
        sh("ip", "-n", node, "addr", "add", str(env.subnet), "dev", "veth0")
        sh("ip", "-n", node, "addr", "add", str(env.ipv6_subnet), "dev", "veth0", "nodad")
        sh("ip", "-n", node, "link", "set", "veth0", "up")
        net4, net6 = env.subnet.network, env.ipv6_subnet.network
        v4 = IPv4Interface((int(net4.network_address) + 2, net4.prefixlen))
        v6 = IPv6Interface((int(net6.network_address) + 2, net6.prefixlen))
        sh("ip", "-n", pod, "addr", "add", str(v4), "dev", "eth0")
        sh("ip", "-n", pod, "addr", "add", str(v6), "dev", "eth0", "nodad")
        sh("ip", "-n", pod, "link", "set", "eth0", "up")
        sh("ip", "-n", pod, "route", "add", "default", "via", str(env.subnet.ip))
        sh("ip", "-n", pod, "-6", "route", "add", "default", "via", str(env.ipv6_subnet.ip))
        return str(v4.ip), str(v6.ip)

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.terminate()
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for ns in self.pods + self.nodes:
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", ns, check=False)


def rtts(pod: str, address: str, count: int) -> list[float]:
    """RTTs in microseconds of ``count`` pings 10 ms apart (after a warm-up)."""
    in_ns(pod, "ping", "-c", "20", "-i", "0.01", "-W", "2", address, check=False)
    out = in_ns(pod, "ping", "-c", str(count), "-i", "0.01", "-W", "2", address, check=False)
    return [float(line.rsplit("time=", 1)[1].split()[0]) * 1000 for line in out.splitlines()
            if "time=" in line]  # fmt: skip


def tcp(bed: Bed, family: int, seconds: float) -> tuple[float, float]:
    """(Gbit/s, machine CPU seconds per GB) of one iperf3 stream pod 1 -> pod 2."""
    server = bed.addresses[1][0 if family == 4 else 1]
    srv = subprocess.Popen(
        ["ip", "netns", "exec", bed.pods[1], "iperf3", "-s", "-1", "-B", server],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        before = machine_cpu_seconds()
        out = in_ns(bed.pods[0], "iperf3", "-c", server, "-t", str(seconds), "-J")
        cpu = machine_cpu_seconds() - before
    finally:
        srv.kill()
        srv.wait()
    received = json.loads(out)["end"]["sum_received"]
    return received["bits_per_second"] / 1e9, cpu / (received["bytes"] / 1e9)


def measure(prefix: str, kernel: bool, pings: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as work:
        bed = Bed(prefix, kernel, Path(work))
        try:
            for family in (4, 6):
                address = bed.addresses[1][0 if family == 4 else 1]
                for _ in range(100):  # the path is up (the kernel's neighbours, our peers)
                    if in_ns(bed.pods[0], "ping", "-c", "1", "-W", "1", address, check=False):
                        break
                samples = rtts(bed.pods[0], address, pings)
                gbits, cpu_per_gb = tcp(bed, family, seconds)
                rows.append(
                    {
                        "path": f"{'kernel' if kernel else 'userspace'} vxlan IPv{family}",
                        "replies": len(samples),
                        "pings": pings,
                        "rtt_p50_us": round(percentile(samples, 50), 1) if samples else None,
                        "rtt_p99_us": round(percentile(samples, 99), 1) if samples else None,
                        "tcp_gbit_s": round(gbits, 2),
                        "cpu_s_per_gb": round(cpu_per_gb, 2),
                    }
                )
        finally:
            bed.close()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| path | ping p50 | ping p99 | replies | TCP 1 stream | CPU s/GB (machine) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['rtt_p50_us']} us | {r['rtt_p99_us']} us | "
            f"{r['replies']}/{r['pings']} | {r['tcp_gbit_s']} Gbit/s | {r['cpu_s_per_gb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ipv6_vxlan", description=__doc__)
    parser.add_argument("--prefix", default="v6b", help="namespace prefix (default v6b)")
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = measure(f"{args.prefix}u", False, args.pings, args.seconds)
    rows += measure(f"{args.prefix}k", True, args.pings, args.seconds)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
