"""Measurements inside a testbed: ping RTT, iperf3 TCP/UDP throughput, daemon CPU time."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# iperf3 -w for UDP: the receiving socket sized so a descheduled iperf3 server does not
# drop datagrams the path delivered (the kernel caps it at net.core.rmem_max).
UDP_SOCKET_BUFFER = "4M"
_RTT_LINE = re.compile(r"icmp_seq=\d+ .*time=([\d.]+) ms")


class Members(Protocol):
    """A bed whose nodes and pods run commands by name ("n1", "n2-p1"): the testbed, or
    bench/dual_stack.py's dual-stack bed."""

    def exec(
        self, name: str, argv: list[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]: ...

    def popen(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]: ...


@dataclass(frozen=True)
class Rtt:
    sent: int
    received: int
    avg_ms: float
    min_ms: float
    max_ms: float


def ping(bed: Members, source: str, target_ip: str, count: int = 10, interval: float = 0.2) -> Rtt:
    """Ping ``target_ip`` from the node or pod ``source``; RTTs from ping's summary line."""
    result = bed.exec(
        source,
        ["ping", "-c", str(count), "-i", str(interval), "-W", "2", target_ip],
        capture_output=True,
        text=True,
    )
    sent = re.search(r"(\d+) packets transmitted, (\d+) received", result.stdout)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", result.stdout)
    if not sent:
        raise RuntimeError(f"ping from {source} to {target_ip} failed: {result.stderr.strip()}")
    low, avg, high = (float(x) for x in rtt.groups()) if rtt else (0.0, 0.0, 0.0)
    return Rtt(int(sent.group(1)), int(sent.group(2)), avg, low, high)


def ping_samples(
    bed: Members, source: str, target_ip: str, count: int = 200, interval: float = 0.01
) -> tuple[int, list[float]]:
    """(pings sent, every reply's RTT in microseconds), from ping's per-reply lines.

    Intervals below 0.2 s need root, which the testbed needs anyway.
    """
    result = bed.exec(
        source,
        ["ping", "-c", str(count), "-i", str(interval), "-W", "2", target_ip],
        capture_output=True,
        text=True,
        timeout=count * interval + 30,
    )
    rtts = [float(m.group(1)) * 1000 for m in _RTT_LINE.finditer(result.stdout)]
    if not rtts:
        raise RuntimeError(f"ping from {source} to {target_ip}: no replies {result.stderr.strip()}")
    return count, rtts


def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile (``pct`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@contextmanager
def iperf3_server(bed: Members, server: str, server_ip: str, port: int = 5201) -> Iterator[None]:
    """A one-shot iperf3 server in ``server``, listening before the block starts."""
    srv = bed.popen(
        server,
        ["iperf3", "-s", "-1", "-B", server_ip, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):  # wait for the listener (TCP control connection, also for -u)
            probe = bed.exec(
                server, ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True
            )
            if probe.stdout.strip():
                break
            time.sleep(0.1)
        yield
    finally:
        srv.kill()
        srv.wait()


def iperf3_json(
    bed: Members,
    server: str,
    server_ip: str,
    client: str,
    args: list[str],
    seconds: float,
    port: int = 5201,
) -> dict[str, Any]:
    """One iperf3 run from ``client`` to ``server`` with extra client ``args``; its -J report."""
    with iperf3_server(bed, server, server_ip, port):
        result = bed.exec(
            client,
            ["iperf3", "-c", server_ip, "-p", str(port), "-t", str(seconds), "-J", *args],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
    if result.returncode != 0:
        raise RuntimeError(f"iperf3 {client} -> {server_ip} failed: {result.stdout[-300:]}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def iperf3_tcp(
    bed: Members,
    server: str,
    server_ip: str,
    client: str,
    seconds: float = 5,
    streams: int = 1,
    port: int = 5201,
) -> float:
    """TCP throughput in Gbit/s (receiver side) from ``client`` to ``server``."""
    return iperf3_tcp_bytes(bed, server, server_ip, client, seconds, streams, port)[0]


def iperf3_tcp_bytes(
    bed: Members,
    server: str,
    server_ip: str,
    client: str,
    seconds: float = 5,
    streams: int = 1,
    port: int = 5201,
) -> tuple[float, int]:
    """(Gbit/s, bytes) the receiver got from ``client``, for CPU seconds per GB."""
    report = iperf3_json(bed, server, server_ip, client, ["-P", str(streams)], seconds, port)
    received = report["end"]["sum_received"]
    return float(received["bits_per_second"]) / 1e9, int(received["bytes"])


@dataclass(frozen=True)
class UdpTrial:
    """One iperf3 -u run: what was offered and what arrived."""

    size: int  # UDP payload bytes (-l)
    offered_bps: float  # the -b rate, or what the sender reached when unlimited (-b 0)
    unlimited: bool
    sent_bps: float
    received_bps: float
    received_pps: float
    loss_pct: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def iperf3_udp(
    bed: Members,
    server: str,
    server_ip: str,
    client: str,
    size: int,
    rate_bps: float,
    seconds: float = 2,
    port: int = 5201,
) -> UdpTrial:
    """UDP datagrams of ``size`` bytes at ``rate_bps`` (0: as fast as the sender can)."""
    report = iperf3_json(
        bed,
        server,
        server_ip,
        client,
        ["-u", "-l", str(size), "-b", str(int(rate_bps)), "-w", UDP_SOCKET_BUFFER],
        seconds,
        port,
    )
    end = report["end"]
    sent = end.get("sum_sent", end["sum"])
    got = end.get("sum_received", end["sum"])
    # Rates over the sending time: the receiver's own interval includes the tail wait.
    duration = float(sent["seconds"]) or float(seconds)
    packets = int(got["packets"])
    lost = int(got["lost_packets"])
    sent_bps = float(sent["bits_per_second"])
    return UdpTrial(
        size=size,
        offered_bps=float(rate_bps) if rate_bps else sent_bps,
        unlimited=not rate_bps,
        sent_bps=sent_bps,
        received_bps=(packets - lost) * size * 8 / duration,
        received_pps=(packets - lost) / duration,
        loss_pct=100.0 * lost / packets if packets else 100.0,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all threads) and of its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
    return total


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot, all CPUs: every process,
    the kernel and its interrupt and softirq work (/proc/stat: user, nice, system, irq,
    softirq; guest time is inside user; steal, the hypervisor's, is not ours). The
    kernel's vxlan device does its work in softirq, which no process's CPU time shows."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def sleeps(pid: int) -> int:
    """How often ``pid`` (all threads) and its live descendants went to sleep and were
    woken: the voluntary context switches of /proc/<pid>/task/<tid>/status."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        for status in Path(f"/proc/{p}/task").glob("*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(x) for x in task.read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def summary(values: list[float]) -> dict[str, float]:
    """min / median / max of the runs (an empty list gives zeros)."""
    if not values:
        return {"min": 0.0, "median": 0.0, "max": 0.0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
