"""``overlay bench``: the benchmark matrix, written to bench/results/<name>.{md,json,png}.

Rows (paths), each its own 2-node testbed with one pod per node and the file registry
(no etcd process competing for the two CPUs):

- ``veth``: the plain underlay, node -> node over eth0 (no overlay at all);
- ``kernel-vxlan``: both nodes on the kernel's vxlan device, pod -> pod (eth0 with a
  veth's default offloads, as on every testbed node);
- ``udp``: our udp backend, pod -> pod;
- ``vxlan``: our userspace vxlan backend, pod -> pod;
- ``udp-nooffload``: our udp backend with ``--no-offload`` (the plain per-packet path);
- ``c-proxy``: the udp testbed with both daemons replaced by ``bench/c_proxy.c`` (compiled
  when the bench runs), which forwards the way flanneld's own C proxy does: one poll over
  TUN, socket and control socket, then one TUN read + sendto and one recv + TUN write in
  turn until both are empty, TTL decrement with an incremental checksum, a first-match
  route table fed over the control socket: the bar "beat flannel's C proxy" is measured;
- ``udp-busypoll``: our udp backend with ``--busy-poll-us`` ``BUSY_POLL_US``;
- ``udp-workers2``: our udp backend with ``--workers 2`` (beside the single process);
- ``udp-notso`` (only with ``--only``): our udp backend with ``--no-tun-tso``;
- ``vxlan-workers2`` / ``vxlan6-workers2`` (only with ``--only``): our userspace vxlan
  with ``--workers 2``, over IPv4 and (on the dual-stack bed) over IPv6;
- ``vxlan6`` / ``kernel-vxlan6``: our userspace vxlan / the kernel's vxlan device, pod ->
  pod over IPv6, on the dual-stack bed of ``bench/dual_stack.py`` (the testbed builds
  IPv4-only beds); each is also compared with its IPv4 row of the same run (issue 20:
  userspace TCP 1 stream over IPv6 within 20% of IPv4).

Columns: iperf3 TCP with 1 and 4 streams (Gbit/s, receiver side); UDP with 1400-byte and
64-byte datagrams at the highest offered rate that lost < 0.1% (a short search, below);
ping RTT p50/p99/avg from every reply of ``--pings`` pings 10 ms apart (on an idle VM
the RTT depends on that gap: waking a halted vCPU costs ~100 us); the CPU of each
node's daemon during the TCP 1-stream run, as % of one core and as CPU seconds per GB
the receiver got (n1 sends, n2 receives); the whole machine's CPU seconds per GB during
the TCP 1- and 4-stream runs (/proc/stat: every process and the kernel's softirq work,
where kernel vxlan does its forwarding, so every row is on the same scale); and what
latency costs: each daemon's CPU % with no traffic (``IDLE_SECONDS``) and during the
pings, and how often it went to sleep (voluntary context switches) per ping: its
wake-ups per round trip. Throughput is measured
``--runs`` times, round-robin over the paths (all testbeds are up together, so a burst of
other load on the machine hits every path instead of all runs of one), and reported as
min / median / max; the pings of all runs are pooled.

The UDP search: first as fast as the sender can (``-b 0``); if that loses < 0.1% the path
is sender-limited and that rate is the answer. Otherwise bisect between 0 and 1.2x what
got through, starting at 0.9x, for ``--udp-steps`` trials in all; the answer is the
highest offered rate that passed. iperf3 runs UDP with ``-w 4M`` so that drops in the
receiving iperf3's own socket buffer (a descheduled server on 2 busy cores) do not count
against the path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Protocol

from bench import codec_micro
from bench.dual_stack import DualStackBed
from bench.measure import (
    UDP_SOCKET_BUFFER,
    Members,
    UdpTrial,
    cpu_seconds,
    iperf3_tcp_bytes,
    iperf3_udp,
    machine_cpu_seconds,
    percentile,
    ping_samples,
    sleeps,
    summary,
)
from overlay.cli.parser import OneLineParser
from overlay.lab.errors import TestbedError
from overlay.lab.netns import terminate
from overlay.lab.progress import Progress
from overlay.lab.testbed import Testbed

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_LOSS_PCT = 0.1
BASE = "kernel-vxlan"  # ratios are to this path (and to veth)
# The busy-poll row's window: on the bench's testbed a ping's reply reaches the sending
# node a few hundred us after its request; the poll ends once the reply is forwarded, so
# a window with room costs more only when no reply comes.
BUSY_POLL_US = 500
IDLE_SECONDS = 3.0  # no traffic: what each daemon burns doing nothing


@dataclass(frozen=True)
class PathSpec:
    key: str
    label: str
    backend: str
    kernel_nodes: tuple[int, ...] = ()
    daemon_args: tuple[str, ...] = ()
    underlay: bool = False  # node -> node over eth0 instead of pod -> pod
    proxy: bool = False  # replace the daemons by bench/c_proxy.c (flanneld's C proxy loop)
    default: bool = True  # in the matrix unless --only names the paths
    family: int = 4  # 6: pod -> pod over IPv6 on the dual-stack bed
    ipv4_key: str | None = None  # the IPv4 row an IPv6 row is compared with


PATHS = [
    PathSpec("veth", "plain veth underlay (node -> node)", "udp", underlay=True),
    PathSpec("kernel-vxlan", "kernel vxlan", "vxlan", kernel_nodes=(1, 2)),
    PathSpec("udp", "our udp backend", "udp"),
    PathSpec("vxlan", "our userspace vxlan", "vxlan"),
    PathSpec("udp-nooffload", "our udp --no-offload", "udp", daemon_args=("--no-offload",)),
    PathSpec("c-proxy", "C proxy (flanneld's udp loop)", "udp", proxy=True),
    PathSpec(
        "udp-busypoll",
        f"our udp --busy-poll-us {BUSY_POLL_US}",
        "udp",
        daemon_args=("--busy-poll-us", str(BUSY_POLL_US)),
    ),
    PathSpec("udp-workers2", "our udp --workers 2", "udp", daemon_args=("--workers", "2")),
    # Only on request (--only udp,udp-notso): an option measured against the default.
    PathSpec(
        "udp-notso", "our udp --no-tun-tso", "udp", daemon_args=("--no-tun-tso",), default=False
    ),
    PathSpec("vxlan6", "our userspace vxlan, IPv6", "vxlan", family=6, ipv4_key="vxlan"),
    PathSpec(
        "kernel-vxlan6",
        "kernel vxlan, IPv6",
        "vxlan",
        kernel_nodes=(1, 2),
        family=6,
        ipv4_key="kernel-vxlan",
    ),
    # Only on request (--only vxlan-workers2,vxlan6-workers2): userspace vxlan's IPv6 half
    # spread over two processes, beside its IPv4 half spread the same way.
    PathSpec(
        "vxlan-workers2",
        "our userspace vxlan --workers 2",
        "vxlan",
        daemon_args=("--workers", "2"),
        default=False,
    ),
    PathSpec(
        "vxlan6-workers2",
        "our userspace vxlan --workers 2, IPv6",
        "vxlan",
        family=6,
        daemon_args=("--workers", "2"),
        ipv4_key="vxlan-workers2",
        default=False,
    ),
]
# What the IPv6 userspace row must reach, as a share of its IPv4 row (issue 20).
IPV6_TCP_TARGET = 0.8
BY_KEY = {p.key: p for p in PATHS}


@dataclass
class PathResult:
    spec: PathSpec
    tcp1: list[float] = field(default_factory=list)
    tcp4: list[float] = field(default_factory=list)
    udp1400: list[dict[str, Any]] = field(default_factory=list)
    udp64: list[dict[str, Any]] = field(default_factory=list)
    rtts_us: list[float] = field(default_factory=list)
    pings_sent: int = 0
    cpu: dict[str, list[float]] = field(default_factory=dict)
    cpu_s_per_gb: dict[str, list[float]] = field(default_factory=dict)
    machine_s_per_gb: dict[str, list[float]] = field(default_factory=dict)  # tcp1, tcp4
    idle_cpu: dict[str, list[float]] = field(default_factory=dict)  # % of a core, by node
    ping_cpu: dict[str, list[float]] = field(default_factory=dict)  # % of a core, by node
    sleeps_per_ping: dict[str, list[float]] = field(default_factory=dict)  # by node
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        def udp(searches: list[dict[str, Any]], key: str) -> dict[str, Any]:
            return {**summary([s[key] for s in searches]), "runs": searches}

        def by_node(values: dict[str, list[float]]) -> dict[str, Any]:
            return {node: {**summary(v), "runs": v} for node, v in values.items()}

        rtt = self.rtts_us
        return {
            "key": self.spec.key,
            "label": self.spec.label,
            "backend": self.spec.backend,
            "kernel_nodes": list(self.spec.kernel_nodes),
            "daemon_args": list(self.spec.daemon_args),
            "between": "n1 -> n2 (eth0)" if self.spec.underlay else "n1-p1 -> n2-p1",
            "family": self.spec.family,
            "ipv4_key": self.spec.ipv4_key,
            "error": self.error,
            "tcp1_gbits": {**summary(self.tcp1), "runs": self.tcp1},
            "tcp4_gbits": {**summary(self.tcp4), "runs": self.tcp4},
            "udp1400_gbits": udp(self.udp1400, "gbits"),
            "udp64_pps": udp(self.udp64, "pps"),
            "ping_us": {
                "sent": self.pings_sent,
                "received": len(rtt),
                "p50": percentile(rtt, 50) if rtt else 0.0,
                "p99": percentile(rtt, 99) if rtt else 0.0,
                "avg": statistics.fmean(rtt) if rtt else 0.0,
                "min": min(rtt) if rtt else 0.0,
                "max": max(rtt) if rtt else 0.0,
            },
            "daemon_cpu_pct_tcp1": by_node(self.cpu),
            "daemon_cpu_s_per_gb_tcp1": by_node(self.cpu_s_per_gb),
            "machine_cpu_s_per_gb": by_node(self.machine_s_per_gb),
            "daemon_cpu_pct_idle": by_node(self.idle_cpu),
            "daemon_cpu_pct_ping": by_node(self.ping_cpu),
            "daemon_sleeps_per_ping": by_node(self.sleeps_per_ping),
        }


# -- the UDP search (sans-IO: ``trial`` does the measuring) ---------------------------------


def loss_free_search(
    trial: Callable[[float], UdpTrial], steps: int, max_loss: float = MAX_LOSS_PCT
) -> tuple[UdpTrial | None, list[UdpTrial], bool]:
    """(best passing trial or None, every trial, sender-limited?); ``trial(0)`` = unlimited."""
    first = trial(0)
    trials = [first]
    if first.loss_pct < max_loss:
        return first, trials, True
    best: UdpTrial | None = None
    low, high = 0.0, min(first.sent_bps, 1.2 * first.received_bps)
    rate = 0.9 * first.received_bps if first.received_bps > 0 else high / 2
    for _ in range(steps - 1):
        if rate <= 0:
            break
        t = trial(rate)
        trials.append(t)
        if t.loss_pct < max_loss:
            low = rate
            if best is None or t.offered_bps > best.offered_bps:
                best = t
        else:
            high = rate
        # Until one rate has passed there is no floor to bisect from: step down by 4x, so
        # a loaded path still yields a loss-free rate within a few trials (not 0).
        rate = (low + high) / 2 if best is not None else rate / 4
    return best, trials, False


def _udp_search(
    bed: Members, src: str, dst: str, dst_ip: str, size: int, args: argparse.Namespace
) -> dict[str, Any]:
    def trial(rate: float) -> UdpTrial:
        return iperf3_udp(bed, dst, dst_ip, src, size, rate, seconds=args.udp_seconds)

    best, trials, sender_limited = loss_free_search(trial, args.udp_steps)
    return {
        "gbits": best.offered_bps / 1e9 if best else 0.0,
        "pps": best.received_pps if best else 0.0,
        "received_gbits": best.received_bps / 1e9 if best else 0.0,
        "loss_pct": best.loss_pct if best else None,
        "sender_limited": sender_limited,
        "trials": [t.as_dict() for t in trials],
    }


# -- one testbed per path -----------------------------------------------------------------


class BenchBed(Members, Protocol):
    """What the matrix needs of a bed: the testbed, or the dual-stack bed."""

    prefix: str

    def down(self) -> object: ...


@dataclass
class Bench:
    spec: PathSpec
    bed: BenchBed
    src: str
    dst: str
    dst_ip: str
    result: PathResult
    pids: dict[str, int]  # whose CPU is measured: the daemons, or the C proxies
    controls: list[socket.socket] = field(default_factory=list)  # c-proxy control sockets


def _up(spec: PathSpec, result: PathResult) -> Bench:
    if spec.family == 6:
        return _up_dual_stack(spec, result)
    bed = Testbed(
        "b" + uuid.uuid4().hex[:6],
        nodes=2,
        pods_per_node=1,
        backend=spec.backend,
        registry="file",
        kernel_nodes=spec.kernel_nodes,
        daemon_args=spec.daemon_args,
    )
    bed.progress = PROGRESS.sub(f"up {spec.key}")
    bed.up()  # removes whatever it made if it fails
    try:
        pids, controls = _swap_in_c_proxy(bed) if spec.proxy else (_daemon_pids(bed), [])
        if spec.underlay:
            bench = Bench(spec, bed, "n1", "n2", str(bed.node_ip(2)), result, pids)
        else:
            bench = Bench(spec, bed, "n1-p1", "n2-p1", bed.pod_ip("n2-p1"), result, pids, controls)
        # Warm up ARP, the peer table and (kernel vxlan) the fdb before anything is timed.
        ping_samples(bed, bench.src, bench.dst_ip, count=5, interval=0.05)
    except BaseException:
        bed.down()
        raise
    return bench


def _up_dual_stack(spec: PathSpec, result: PathResult) -> Bench:
    """An IPv6 row: the dual-stack bed, pod -> pod to the IPv6 address."""
    kernel = bool(spec.kernel_nodes)
    bed = DualStackBed("b" + uuid.uuid4().hex[:6], kernel=kernel, daemon_args=spec.daemon_args)
    try:
        dst_ip = bed.pod_ip("n2-p1", 6)
        bench = Bench(spec, bed, "n1-p1", "n2-p1", dst_ip, result, bed.daemon_pids())
        for _ in range(PATH_UP_PINGS):  # neighbours and peers: until one reply comes back
            probe = ["ping", "-c", "1", "-W", "1", dst_ip]
            if bed.exec(bench.src, probe, capture_output=True).returncode == 0:
                break
        ping_samples(bed, bench.src, dst_ip, count=5, interval=0.05)
    except BaseException:
        bed.down()
        raise
    return bench


PATH_UP_PINGS = 30


def _daemon_pids(bed: Testbed) -> dict[str, int]:
    return {n["name"]: n["pid"] for n in bed.status()["nodes"] if n["pid"]}


C_PROXY_SOURCE = Path(__file__).resolve().parent / "c_proxy.c"
# flanneld's struct command {int cmd; in_addr_t dest_net; int dest_net_len;
# in_addr_t next_hop_ip; short next_hop_port;}, addresses in network order, padded to 20.
_C_PROXY_COMMAND = struct.Struct("=i4si4sh2x")
_SET_ROUTE = 1
UDP_PORT = 8285


def build_c_proxy(out_dir: Path) -> Path:
    """Compile bench/c_proxy.c (gcc -O2, as flanneld's cgo build) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "c_proxy"
    result = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(C_PROXY_SOURCE)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"compiling {C_PROXY_SOURCE.name}: {result.stderr.strip()}")
    return binary


def _swap_in_c_proxy(bed: Testbed) -> tuple[dict[str, int], list[socket.socket]]:
    """Stop both udp daemons (their TUN goes with them) and run the C proxy in their
    place: flannel0 as flanneld configures it (the subnet's network address /32, MTU
    underlay - 28, the network routed into it), the same UDP port and framing, the route
    to the peer set over the control socket. Returns the proxies' pids by node and the
    control sockets (closing one stops its proxy)."""
    binary = build_c_proxy(bed.state_dir / "c-proxy")
    nodes = bed.status()["nodes"]
    terminate([node["pid"] for node in nodes], 10.0)  # SIGTERM, then SIGKILL
    network = IPv4Network(bed.network)
    mtu = 1500 - 28
    pids: dict[str, int] = {}
    controls: list[socket.socket] = []
    try:
        for i, node in enumerate(nodes):
            name, peer = node["name"], nodes[1 - i]
            address = str(IPv4Network(node["subnet"]).network_address)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            controls.append(ours)
            argv = [str(binary), "flannel0", address, str(mtu), node["underlay_ip"]]
            proc = bed.popen(name, [*argv, str(UDP_PORT)], stdin=theirs, stdout=subprocess.PIPE)
            theirs.close()
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"c_proxy did not start in {name} (exit {proc.wait()})")
            pids[name] = proc.pid
            for argv in (
                ["ip", "link", "set", "flannel0", "mtu", str(mtu), "up"],
                ["ip", "addr", "add", f"{address}/32", "dev", "flannel0"],
                ["ip", "route", "replace", str(network), "dev", "flannel0", "scope", "link"],
            ):
                bed.exec(name, argv, check=True, capture_output=True)
            subnet = IPv4Network(peer["subnet"])
            ours.send(
                _C_PROXY_COMMAND.pack(
                    _SET_ROUTE,
                    subnet.network_address.packed,
                    subnet.prefixlen,
                    socket.inet_aton(peer["underlay_ip"]),
                    UDP_PORT,
                )
            )
    except BaseException:
        for control in controls:
            control.close()
        raise
    return pids, controls


def _measure_latency(b: Bench, args: argparse.Namespace, pids: dict[str, int]) -> None:
    """The daemons' CPU with no traffic, then the pings: RTTs, the daemons' CPU and how
    often each went to sleep per round trip."""
    r, bed = b.result, b.bed
    cpu = {node: cpu_seconds(pid) for node, pid in pids.items()}
    time.sleep(IDLE_SECONDS)
    for node, pid in pids.items():
        r.idle_cpu.setdefault(node, []).append(100 * (cpu_seconds(pid) - cpu[node]) / IDLE_SECONDS)
    cpu = {node: cpu_seconds(pid) for node, pid in pids.items()}
    slept = {node: sleeps(pid) for node, pid in pids.items()}
    start = time.monotonic()
    sent, rtts = ping_samples(bed, b.src, b.dst_ip, count=args.pings, interval=args.ping_interval)
    wall = time.monotonic() - start
    r.pings_sent += sent
    r.rtts_us += rtts
    for node, pid in pids.items():
        r.ping_cpu.setdefault(node, []).append(100 * (cpu_seconds(pid) - cpu[node]) / wall)
        r.sleeps_per_ping.setdefault(node, []).append((sleeps(pid) - slept[node]) / sent)


@dataclass(frozen=True)
class TcpCost:
    """One iperf3 TCP run and the CPU it took."""

    gbits: float
    received_gb: float  # what the receiver got
    daemon_seconds: dict[str, float]  # each daemon's CPU seconds, by node
    machine_seconds: float  # the whole machine's (machine_cpu_seconds)
    wall: float


def _tcp_with_cost(
    b: Bench, args: argparse.Namespace, pids: dict[str, int], streams: int
) -> TcpCost:
    before = {node: cpu_seconds(pid) for node, pid in pids.items()}
    machine = machine_cpu_seconds()
    start = time.monotonic()
    gbits, received = iperf3_tcp_bytes(
        b.bed, b.dst, b.dst_ip, b.src, seconds=args.seconds, streams=streams
    )
    wall = time.monotonic() - start
    machine = machine_cpu_seconds() - machine
    used = {node: cpu_seconds(pid) - before[node] for node, pid in pids.items()}
    return TcpCost(gbits, received / 1e9, used, machine, wall)


def _measure_run(b: Bench, args: argparse.Namespace) -> None:
    """One run of every column for one path, appended to ``b.result``."""
    r, bed = b.result, b.bed
    pids = b.pids
    _measure_latency(b, args, pids)
    for streams, runs in ((1, r.tcp1), (4, r.tcp4)):
        tcp = _tcp_with_cost(b, args, pids, streams)
        runs.append(tcp.gbits)
        if tcp.received_gb:
            per_gb = tcp.machine_seconds / tcp.received_gb
            r.machine_s_per_gb.setdefault(f"tcp{streams}", []).append(per_gb)
        if streams != 1:
            continue
        for node, used in tcp.daemon_seconds.items():
            r.cpu.setdefault(node, []).append(100 * used / tcp.wall)
            if tcp.received_gb:
                r.cpu_s_per_gb.setdefault(node, []).append(used / tcp.received_gb)
    r.udp1400.append(_udp_search(bed, b.src, b.dst, b.dst_ip, 1400, args))
    r.udp64.append(_udp_search(bed, b.src, b.dst, b.dst_ip, 64, args))


def run_matrix(specs: list[PathSpec], args: argparse.Namespace) -> list[PathResult]:
    benches: list[Bench] = []
    results = [PathResult(spec) for spec in specs]
    try:
        for i, spec in enumerate(specs):
            PROGRESS.step(f"up: {spec.key}")
            try:
                benches.append(_up(spec, results[i]))
            except (TestbedError, RuntimeError, OSError) as e:
                results[i].error = f"testbed: {e}"
                _log(f"{spec.key}: {results[i].error}")
        for run in range(1, args.runs + 1):
            for b in benches:
                if b.result.error:
                    continue
                PROGRESS.step(f"run {run}/{args.runs}: {b.spec.key}")
                try:
                    _measure_run(b, args)
                except (RuntimeError, OSError, ValueError, KeyError) as e:
                    b.result.error = f"run {run}: {e}"
                    _log(f"{b.spec.key}: {b.result.error}")
    finally:
        for b in benches:
            for control in b.controls:
                control.close()
            try:
                b.bed.down()
            except TestbedError as e:
                _log(f"down {b.bed.prefix}: {e}")
    return results


# -- output -----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value == 0 else f"{value:.{digits}f}"


def _spread(d: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if not d["median"]:
        return "-"
    med = _fmt(d["median"] * scale, digits)
    if d["min"] == d["max"]:
        return med
    return f"{med} ({d['min'] * scale:.{digits}f}-{d['max'] * scale:.{digits}f})"


def _ratio(value: float, base: float | None) -> str:
    if not base or not value:
        return "-"
    return f"{value / base:.3f}" if value / base < 10 else f"{value / base:.1f}"


def format_markdown(report: dict[str, Any]) -> str:
    paths = report["paths"]
    by_key = {p["key"]: p for p in paths}
    s = report["settings"]
    h = report["host"]
    lines = [
        f"# overlay bench: {report['name']}",
        "",
        f"{report['started']}, {report['duration_s'] / 60:.1f} min; {h['cpus']} CPUs, "
        f"kernel {h['kernel']}, Python {h['python']}; load average {h['loadavg_before']} "
        f"before, {h['loadavg_after']} after. `{report['command']}`",
        "",
        f"Each path is its own 2-node testbed (one pod per node) with the **file registry**, "
        f"so no etcd process competes for the CPUs; traffic is pod -> pod, except the veth "
        f"row (node -> node over eth0). {s['runs']} run(s) per path, round-robin over the "
        f"paths; throughput is median (min-max). TCP: iperf3 {s['seconds']:g} s. UDP: "
        f"highest offered rate with < {MAX_LOSS_PCT}% loss ({s['udp_steps']} trials of "
        f"{s['udp_seconds']:g} s at most; * = sender-limited, nothing lost at full speed). "
        f"Ping: {s['pings']} pings {1000 * s['ping_interval']:g} ms apart per run, all runs "
        f"pooled. CPU: each daemon "
        f"during the TCP 1-stream run, as % of one core and as CPU seconds per GB "
        f"received (n1 sends, n2 receives); machine: the whole machine's CPU seconds "
        f"(/proc/stat, every process and softirq) per GB received during the TCP 1- and "
        f"4-stream runs. Every eth0 keeps a veth's default offloads. "
        f"The C proxy is bench/c_proxy.c, flanneld's udp proxy loop. iperf3 UDP uses -w "
        f"{UDP_SOCKET_BUFFER}, so the receiving iperf3's socket is not what drops.",
        "",
        "| path | TCP 1 stream Gbit/s | TCP 4 streams Gbit/s | UDP 1400 B Gbit/s "
        "| UDP 64 B kpps | ping p50 us | ping p99 us | ping avg us | daemon CPU% n1 / n2 "
        "| daemon CPU s/GB n1 / n2 | machine CPU s/GB TCP 1 / TCP 4 |",
        "|---|---|---|---|---|---:|---:|---:|---|---|---|",
    ]
    for p in paths:
        if p["error"] and not p["tcp1_gbits"]["runs"]:
            lines.append(f"| {p['label']} | failed: {p['error']} |||||||||")
            continue
        star = "*" if any(r["sender_limited"] for r in p["udp1400_gbits"]["runs"]) else ""
        star64 = "*" if any(r["sender_limited"] for r in p["udp64_pps"]["runs"]) else ""
        cpu = p["daemon_cpu_pct_tcp1"]
        cpu_text = " / ".join(f"{cpu[n]['median']:.0f}" if n in cpu else "-" for n in ("n1", "n2"))
        per_gb = p.get("daemon_cpu_s_per_gb_tcp1", {})
        per_gb_text = " / ".join(
            f"{per_gb[n]['median']:.2f}" if n in per_gb else "-" for n in ("n1", "n2")
        )
        ping = p["ping_us"]
        lines.append(
            f"| {p['label']} | {_spread(p['tcp1_gbits'])} | {_spread(p['tcp4_gbits'])} "
            f"| {_spread(p['udp1400_gbits'], 1, 3)}{star} "
            f"| {_spread(p['udp64_pps'], 1e-3, 0)}{star64} "
            f"| {ping['p50']:.0f} | {ping['p99']:.0f} | {ping['avg']:.0f} | {cpu_text} "
            f"| {per_gb_text} | {_by_node(p.get('machine_cpu_s_per_gb', {}), ('tcp1', 'tcp4'))} |"
        )
    errors = [p for p in paths if p["error"]]
    for p in errors:
        lines.append(f"\n{p['label']}: {p['error']}")
    lines += _latency_table(paths, s)

    base, veth = by_key.get(BASE), by_key.get("veth")
    if base or veth:
        lines += [
            "",
            "Ratios to kernel vxlan (x kvx) and to plain veth, medians from this run "
            "(for RTT, lower is better):",
            "",
            "| path | TCP 1 x kvx | TCP 1 x veth | TCP 4 x kvx | UDP 1400 x kvx "
            "| UDP 64 x kvx | ping p50 x kvx | ping avg x kvx |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def med(p: dict[str, Any] | None, key: str) -> float | None:
            return p[key]["median"] if p else None

        def rtt(p: dict[str, Any] | None, key: str) -> float | None:
            return p["ping_us"][key] if p else None

        for p in paths:
            lines.append(
                f"| {p['label']} "
                f"| {_ratio(med(p, 'tcp1_gbits') or 0, med(base, 'tcp1_gbits'))} "
                f"| {_ratio(med(p, 'tcp1_gbits') or 0, med(veth, 'tcp1_gbits'))} "
                f"| {_ratio(med(p, 'tcp4_gbits') or 0, med(base, 'tcp4_gbits'))} "
                f"| {_ratio(med(p, 'udp1400_gbits') or 0, med(base, 'udp1400_gbits'))} "
                f"| {_ratio(med(p, 'udp64_pps') or 0, med(base, 'udp64_pps'))} "
                f"| {_ratio(rtt(p, 'p50') or 0, rtt(base, 'p50'))} "
                f"| {_ratio(rtt(p, 'avg') or 0, rtt(base, 'avg'))} |"
            )
    lines += _ipv6_table(paths)
    targets = report.get("targets") or []
    if targets:
        lines += ["", "Targets of issues 12, 19 and 20 (ratios measured in this run):", ""]
        lines += [f"- {t['text']}: {t['measured']} -> **{t['verdict']}**" for t in targets]
    if report.get("micro"):
        pyperf_args = " ".join(s.get("micro_pyperf_args", []))
        lines += [
            "",
            f"Codec micro-benchmarks (pyperf `{pyperf_args}`: mean ± stdev of every worker "
            "process's values, ns per packet, including ~10 ns of timeit loop; "
            "`python -m bench.codec_micro`):",
            "",
            codec_micro.format_table(report["micro"]),
        ]
    elif report.get("micro_error"):
        lines += ["", f"Codec micro-benchmarks failed: {report['micro_error']}"]
    lines += ["", f"![TCP 1 stream and ping RTT per path]({report['name']}.png)", ""]
    return "\n".join(lines)


def _by_node(values: dict[str, Any], keys: tuple[str, ...] = ("n1", "n2"), digits: int = 2) -> str:
    """Medians of ``keys`` joined by " / " ("-" for one not measured)."""
    return " / ".join(f"{values[k]['median']:.{digits}f}" if k in values else "-" for k in keys)


def _ipv6_table(paths: list[dict[str, Any]]) -> list[str]:
    """Each IPv6 row against its IPv4 row of the same run (issue 20's comparison)."""
    by_key = {p["key"]: p for p in paths}
    pairs = [(p, by_key.get(p.get("ipv4_key") or "")) for p in paths if p.get("family") == 6]
    if not pairs:
        return []
    lines = [
        "",
        "IPv6 against IPv4, medians from this run (x IPv4: IPv6's TCP 1 stream over the "
        "IPv4 row's; machine CPU s/GB over TCP 1, lower is better):",
        "",
        "| path | vs | TCP 1 Gbit/s IPv6 / IPv4 | TCP 1 x IPv4 | ping p50 us IPv6 / IPv4 "
        "| machine CPU s/GB IPv6 / IPv4 |",
        "|---|---|---|---:|---|---|",
    ]
    for v6, v4 in pairs:
        if v4 is None:
            lines.append(f"| {v6['label']} | (IPv4 row {v6['ipv4_key']} not in this run) |||||")
            continue
        tcp6, tcp4 = v6["tcp1_gbits"]["median"], v4["tcp1_gbits"]["median"]
        cpu6 = _by_node(v6.get("machine_cpu_s_per_gb", {}), ("tcp1",))
        cpu4 = _by_node(v4.get("machine_cpu_s_per_gb", {}), ("tcp1",))
        lines.append(
            f"| {v6['label']} | {v4['label']} | {_fmt(tcp6)} / {_fmt(tcp4)} "
            f"| {_ratio(tcp6, tcp4)} | {v6['ping_us']['p50']:.0f} / {v4['ping_us']['p50']:.0f} "
            f"| {cpu6} / {cpu4} |"
        )
    return lines


def _latency_table(paths: list[dict[str, Any]], s: dict[str, Any]) -> list[str]:
    """Latency and what it costs: RTTs, each daemon's CPU idle and under the pings, and
    its sleeps (wake-ups) per round trip."""
    lines = [
        "",
        f"Latency and what it costs: each daemon's CPU with no traffic ({IDLE_SECONDS:g} s) "
        f"and during the pings (one every {1000 * s['ping_interval']:g} ms), and how often "
        "it went to sleep per ping (voluntary context switches: its wake-ups per round "
        "trip; kernel vxlan's daemons do not forward, the kernel does):",
        "",
        "| path | ping p50 / p99 / avg us | avg x C proxy | idle CPU% n1 / n2 "
        "| CPU% at the pings n1 / n2 | sleeps per ping n1 / n2 |",
        "|---|---|---:|---|---|---|",
    ]
    proxy = next((p for p in paths if p["key"] == "c-proxy"), None)
    for p in paths:
        if not p["ping_us"]["received"]:
            continue
        ping = p["ping_us"]
        base = proxy["ping_us"]["avg"] if proxy else None
        lines.append(
            f"| {p['label']} | {ping['p50']:.0f} / {ping['p99']:.0f} / {ping['avg']:.0f} "
            f"| {_ratio(ping['avg'], base)} "
            f"| {_by_node(p.get('daemon_cpu_pct_idle', {}), digits=1)} "
            f"| {_by_node(p.get('daemon_cpu_pct_ping', {}), digits=1)} "
            f"| {_by_node(p.get('daemon_sleeps_per_ping', {}), digits=1)} |"
        )
    return lines


def check_targets(
    paths: list[dict[str, Any]], earlier: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """Issue 12's targets, as ratios to kernel vxlan and to the C proxy from the same run;
    the CPU target compares with ``earlier``, a report of the code before (``--compare``)."""
    by_key = {p["key"]: p for p in paths}
    out: list[dict[str, str]] = []

    def ratio(key: str, to: str, metric: str, field: str) -> float | None:
        p, q = by_key.get(key), by_key.get(to)
        if not p or not q or not p[metric][field] or not q[metric][field]:
            return None
        return float(p[metric][field] / q[metric][field])

    def target(text: str, shown: str, verdict: str) -> None:
        out.append({"text": text, "measured": shown, "verdict": verdict})

    for key, name in (("udp", "udp backend"), ("vxlan", "userspace vxlan")):
        r = ratio(key, BASE, "tcp1_gbits", "median")
        if r is not None:
            verdict = "stretch met" if r >= 0.60 else "met" if r >= 0.40 else "missed"
            text = f"TCP 1 stream, {name} >= 40% of kernel vxlan (stretch 60%)"
            target(text, f"{100 * r:.1f}%", verdict)
    r = ratio("udp", "c-proxy", "ping_us", "avg")
    if r is not None:
        kvx = ratio("udp", BASE, "ping_us", "avg")
        verdict = "stretch met" if kvx is not None and kvx <= 2 else _met(r <= 1)
        p99 = by_key["udp"]["ping_us"]["p99"]
        shown = f"{r:.2f}x the C proxy's, {kvx or 0:.2f}x kernel vxlan's; p99 {p99:.0f} us"
        target(
            "ping RTT avg, udp backend <= the C proxy's (stretch <= 2x kernel vxlan)",
            shown,
            verdict,
        )
    r = ratio("udp-busypoll", "c-proxy", "ping_us", "avg")
    if r is not None:
        target(
            f"ping RTT avg, udp --busy-poll-us {BUSY_POLL_US} <= the C proxy's",
            f"{r:.2f}x",
            _met(r <= 1),
        )
    r = ratio("udp", "c-proxy", "ping_us", "avg")
    if r is not None:
        target(
            "ping RTT avg, udp backend without busy-poll no worse than before (<= 1.42x C proxy)",
            f"{r:.2f}x",
            _met(r <= 1.42),
        )
    r = ratio("udp", BASE, "udp64_pps", "median")
    if r is not None:
        target("UDP 64 B loss-free rate, udp backend >= kernel vxlan's", f"{r:.2f}x", _met(r >= 1))
    r = ratio("vxlan6", "vxlan", "tcp1_gbits", "median")
    if r is not None:
        target(
            f"TCP 1 stream, userspace vxlan over IPv6 within "
            f"{100 * (1 - IPV6_TCP_TARGET):.0f}% of IPv4",
            f"{100 * r:.1f}% of IPv4",
            _met(r >= IPV6_TCP_TARGET),
        )
    if earlier is not None:
        before = {p["key"]: p for p in earlier.get("paths", [])}
        for key in ("udp", "vxlan"):
            now = by_key.get(key, {}).get("daemon_cpu_s_per_gb_tcp1", {})
            then = before.get(key, {}).get("daemon_cpu_s_per_gb_tcp1", {})
            for node, role in (("n1", "sender"), ("n2", "receiver")):
                if node in now and node in then and now[node]["median"]:
                    r = then[node]["median"] / now[node]["median"]
                    text = f"daemon CPU s/GB, {key} {role}, >= 3x lower than {earlier['name']}"
                    shown = f"{then[node]['median']:.2f} -> {now[node]['median']:.2f} ({r:.1f}x)"
                    target(text, shown, _met(r >= 3))
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def write_png(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [p for p in report["paths"] if p["tcp1_gbits"]["runs"]]
    labels = [p["key"] for p in paths]
    med = [p["tcp1_gbits"]["median"] for p in paths]
    err = [
        [m - p["tcp1_gbits"]["min"] for m, p in zip(med, paths, strict=True)],
        [p["tcp1_gbits"]["max"] - m for m, p in zip(med, paths, strict=True)],
    ]
    p50 = [p["ping_us"]["p50"] for p in paths]
    p99 = [p["ping_us"]["p99"] for p in paths]
    colors = ["#888888" if k in ("veth", BASE) else "#1f77b4" for k in labels]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = left.bar(labels, med, yerr=err, capsize=4, color=colors)
    left.bar_label(bars, labels=[f"{m:.2f}" for m in med], padding=2, fontsize=8)
    left.set_ylabel("Gbit/s (median, min-max)")
    left.set_title("iperf3 TCP, 1 stream")
    bars = right.bar(labels, p50, color=colors)
    right.bar_label(
        bars,
        labels=[f"{a:.0f}\n(p99 {b:.0f})" for a, b in zip(p50, p99, strict=True)],
        padding=2,
        fontsize=7,
    )
    right.set_ylim(0, max(p50, default=1) * 1.3)
    right.set_ylabel("microseconds")
    right.set_title("ping RTT p50")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"overlay bench {report['name']} (2-node testbeds, file registry)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# What the run is doing, on a terminal only (main sets it up); errors go through _log.
PROGRESS = Progress.off()


def _log(message: str) -> None:
    """A line that stays, also in a pipe (errors, what was left undone)."""
    PROGRESS.note(f"overlay bench: {message}")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# -- CLI ---------------------------------------------------------------------------------------


def _only(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in BY_KEY]
    if bad or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown path {', '.join(bad) or text!r} (use {', '.join(BY_KEY)})"
        )
    return keys


def _parser() -> OneLineParser:
    p = OneLineParser(
        prog="overlay bench",
        description="Benchmark matrix: paths x {TCP 1/4 streams, UDP 1400/64 B at the "
        "loss-free rate, ping p50/p99, daemon CPU%} plus codec micro-benchmarks; writes "
        "RESULTS_DIR/NAME.{md,json,png}. Needs root (it builds testbeds).",
    )
    p.add_argument("--runs", type=int, default=None, help="runs per path (default 3)")
    p.add_argument("--seconds", type=float, default=None, help="one TCP run (default 5 s)")
    p.add_argument(
        "--udp-seconds", type=float, default=None, help="one UDP search trial (default 2 s)"
    )
    p.add_argument("--udp-steps", type=int, default=None, help="trials per UDP search (default 5)")
    p.add_argument("--pings", type=int, default=None, help="pings per run (default 200)")
    p.add_argument(
        "--ping-interval",
        type=float,
        default=0.01,
        help="seconds between pings (default 0.01; RTTs on an idle VM depend on it: "
        "shorter gaps keep the vCPUs awake)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test sizes: 1 run, 2 s TCP, 3 UDP trials of 1 s, 50 pings, short micro",
    )
    p.add_argument(
        "--only",
        type=_only,
        action="extend",
        default=None,
        help=f"comma-separated paths to run, in matrix order (of {', '.join(BY_KEY)})",
    )
    p.add_argument("--no-micro", action="store_true", help="skip the codec micro-benchmarks")
    p.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="an earlier report (NAME.json) to compare daemon CPU seconds per GB with",
    )
    p.add_argument("--out", default=None, help="result name (default: date-time stamp)")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"where NAME.md/.json/.png go (default {RESULTS_DIR})",
    )
    return p


def _settings(args: argparse.Namespace) -> None:
    quick = args.quick
    defaults = {
        "runs": 1 if quick else 3,
        "seconds": 2.0 if quick else 5.0,
        "udp_seconds": 1.0 if quick else 2.0,
        "udp_steps": 3 if quick else 5,
        "pings": 50 if quick else 200,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if (
        min(args.runs, args.udp_steps) < 1
        or args.pings < 2
        or min(args.seconds, args.udp_seconds, args.ping_interval) <= 0
    ):
        raise SystemExit(
            "overlay bench: error: --runs and --udp-steps must be >= 1, --pings >= 2, "
            "--seconds and --udp-seconds > 0"
        )


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        _settings(args)
    except SystemExit as e:
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
            return 2
        return int(e.code or 0)
    if os.geteuid() != 0:
        sys.stderr.write("overlay bench: error: needs root (network namespaces, TUN)\n")
        return 1
    name = args.out or datetime.now().strftime("%Y%m%d-%H%M%S")
    if "/" in name or not name.strip():
        sys.stderr.write(f"overlay bench: error: --out {name!r} must be a plain file name\n")
        return 2
    earlier: dict[str, Any] | None = None
    if args.compare is not None:
        try:
            earlier = json.loads(args.compare.read_text())
        except (OSError, ValueError) as e:
            sys.stderr.write(f"overlay bench: error: --compare {args.compare}: {e}\n")
            return 2
    wanted = set(args.only or [p.key for p in PATHS if p.default])
    specs = [p for p in PATHS if p.key in wanted]

    started = datetime.now()
    t0 = time.monotonic()
    load_before = _loadavg()
    global PROGRESS
    PROGRESS = Progress("overlay bench", len(specs) * (1 + args.runs) + (not args.no_micro))
    try:
        results = run_matrix(specs, args)
    except KeyboardInterrupt:
        _log("interrupted; testbeds are down, nothing written")
        return 130
    micro: dict[str, dict[str, float]] = {}
    micro_error: str | None = None
    if not args.no_micro:
        PROGRESS.step("codec micro-benchmarks (pyperf, in a subprocess)")
        try:
            micro = codec_micro.run(quick=args.quick)
        except RuntimeError as e:  # keep the matrix's results; the report says what failed
            micro_error = str(e)
            _log(f"codec micro-benchmarks: {micro_error}")
    report: dict[str, Any] = {
        "name": name,
        "command": "overlay bench " + " ".join(sys.argv[2:] if argv is None else argv),
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
        },
        "settings": {
            "runs": args.runs,
            "seconds": args.seconds,
            "udp_seconds": args.udp_seconds,
            "udp_steps": args.udp_steps,
            "pings": args.pings,
            "ping_interval": args.ping_interval,
            "registry": "file",
            "max_loss_pct": MAX_LOSS_PCT,
            "micro_pyperf_args": []
            if args.no_micro
            else list(codec_micro.QUICK_ARGS if args.quick else codec_micro.FULL_ARGS),
        },
        "paths": [r.as_dict() for r in results],
        "micro": micro,
        "micro_error": micro_error,
    }
    report["targets"] = check_targets(report["paths"], earlier)

    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    PROGRESS.done()
    md = format_markdown(report)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(md)
    write_png(report, out_dir / f"{name}.png")
    print(md)
    print(f"wrote {out_dir / name}.md, .json, .png ({report['duration_s'] / 60:.1f} min)")
    return 1 if micro_error or any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
