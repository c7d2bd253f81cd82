"""Measurements inside a testbed: ping RTT and iperf3 throughput between two namespaces."""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass

from overlay.testbed import Testbed


@dataclass(frozen=True)
class Rtt:
    sent: int
    received: int
    avg_ms: float
    min_ms: float
    max_ms: float


def ping(bed: Testbed, source: str, target_ip: str, count: int = 10, interval: float = 0.2) -> Rtt:
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


def iperf3_tcp(
    bed: Testbed,
    server: str,
    server_ip: str,
    client: str,
    seconds: float = 5,
    streams: int = 1,
    port: int = 5201,
) -> float:
    """TCP throughput in Gbit/s (receiver side) from ``client`` to ``server``."""
    srv = bed.popen(
        server,
        ["iperf3", "-s", "-1", "-B", server_ip, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):  # wait for the listener
            probe = bed.exec(
                server, ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True
            )
            if probe.stdout.strip():
                break
            time.sleep(0.1)
        result = bed.exec(
            client,
            [
                "iperf3",
                "-c",
                server_ip,
                "-p",
                str(port),
                "-t",
                str(seconds),
                "-P",
                str(streams),
                "-J",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"iperf3 {client} -> {server_ip} failed: {result.stdout[-300:]}")
        report = json.loads(result.stdout)
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        srv.kill()
        srv.wait()
