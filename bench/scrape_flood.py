"""``python -m bench.scrape_flood``: what a flood of /metrics scrapes costs a node.

A 2-node testbed (file registry, so etcd stays out of the numbers) with the health
server on every daemon. iperf3 TCP from a pod on n1 to a pod on n2, in rounds of one
quiet run and one run while a host on the underlay (an address on the bridge that no
lease carries, as an attacker's) sends ``--rate`` GET /metrics per second to the target
node, each on a new connection (``overlay.lab.http_flood``), and a liveness probe inside
the target node asks /healthz every 100 ms. Quiet and flooded runs alternate so that
whatever else the machine does falls on both alike. Prints the throughputs, the probe's
and the flood's latencies and failures, the target daemon's CPU in each kind of run, and
its RSS, fds and threads before and after. ``measure`` is what the suite's test
(tests/netns/test_scrape_flood.py) runs::

    flock /work/heavy.lock python -m bench.scrape_flood                 # 1000/s, 4 x 5 s
    flock /work/heavy.lock python -m bench.scrape_flood --rounds 1 --seconds 60 --target n2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.measure import cpu_seconds, iperf3_tcp
from bench.soak import proc_sample
from overlay.lab.http_flood import FloodReport, flooding
from overlay.lab.testbed import Testbed

HEALTH_PORT = 9100
STRANGER = 200  # underlay host number of the flooding address (no lease carries it)
PROBE_RATE = 10  # /healthz per second, from inside the target node
SETTLE = 0.5  # seconds of flood before a flooded iperf3 starts
SERVER, CLIENT = "n2-p1", "n1-p1"


@dataclass
class FloodRun:
    target: str
    rate: float
    quiet_gbps: list[float] = field(default_factory=list)  # one per round
    flood_gbps: list[float] = field(default_factory=list)
    quiet_cpu_s: float = 0.0  # the target daemon's CPU seconds in the quiet runs
    flood_cpu_s: float = 0.0  # ... and in the flooded ones (as long)
    probe: FloodReport = field(default_factory=FloodReport)  # /healthz during the floods
    flood: FloodReport = field(default_factory=FloodReport)
    before: dict[str, int] = field(default_factory=dict)  # the daemon's RSS KiB, fds, threads
    after: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> float:
        """Flooded throughput as a fraction of the quiet one, over every round."""
        quiet = sum(self.quiet_gbps)
        return sum(self.flood_gbps) / quiet if quiet else 0.0

    def lines(self) -> list[str]:
        p, f = self.probe, self.flood

        def gbps(runs: list[float]) -> str:
            return " ".join(f"{g:.2f}" for g in runs)

        return [
            f"target {self.target}, {self.rate:g} GET /metrics per second, each a new connection",
            f"iperf3 TCP {CLIENT} -> {SERVER} Gbit/s: quiet {gbps(self.quiet_gbps)}, flooded "
            f"{gbps(self.flood_gbps)}: {100 * self.kept:.0f}% kept",
            f"daemon CPU: quiet {self.quiet_cpu_s:.2f} s, flooded {self.flood_cpu_s:.2f} s",
            f"/healthz probe: {p.answered}/{p.started} answered, p50 {p.percentile(50):.1f} "
            f"p99 {p.percentile(99):.1f} max {p.percentile(100):.1f} ms, failed {p.failed}",
            f"flood: {f.answered}/{f.started} answered in {f.seconds:.1f} s, p50 "
            f"{f.percentile(50):.1f} p99 {f.percentile(99):.1f} ms, failed {f.failed}, "
            f"skipped {f.skipped}, the flood's own CPU {f.cpu_s:.2f} s",
            f"daemon RSS {self.before['rss_kib'] / 1024:.1f} -> {self.after['rss_kib'] / 1024:.1f}"
            f" MiB, fds {self.before['fds']} -> {self.after['fds']}, threads "
            f"{self.before['threads']} -> {self.after['threads']}",
        ]

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("probe", "flood")}
        out["probe"], out["flood"] = self.probe.summary(), self.flood.summary()
        out["kept"] = round(self.kept, 3)
        return out


def flood_bed(prefix: str, backend: str = "udp") -> Testbed:
    """The 2-node bed this measurement runs on (not yet up)."""
    return Testbed(
        prefix,
        nodes=2,
        pods_per_node=1,
        backend=backend,
        registry="file",
        daemon_args=("--healthz-port", str(HEALTH_PORT)),
    )


def daemon_pid(bed: Testbed, node: str) -> int:
    pid = next(n["pid"] for n in bed.status()["nodes"] if n["name"] == node)
    assert pid, f"the daemon of {node} is not running"
    return int(pid)


@contextmanager
def attacker(bed: Testbed) -> Iterator[None]:
    """An address no lease carries on the underlay bridge (in the underlay's namespace),
    for as long as the block runs."""
    address = f"{bed.underlay.network_address + STRANGER}/{bed.underlay.prefixlen}"
    addr = ["ip", "-n", bed.underlay_ns, "addr"]
    subprocess.run([*addr, "add", address, "dev", bed.bridge], check=True)
    try:
        yield
    finally:
        subprocess.run([*addr, "del", address, "dev", bed.bridge], check=False)


def measure(
    bed: Testbed, target: str = "n1", rate: float = 1000, rounds: int = 4, seconds: float = 5
) -> FloodRun:
    """``rounds`` times: iperf3 for ``seconds`` quiet, then again under the flood."""
    pid = daemon_pid(bed, target)
    server_ip = bed.pod_ip(SERVER)
    url = f"http://{bed.node_ip(bed.node_number(target))}:{HEALTH_PORT}/metrics"
    probe_url = f"http://127.0.0.1:{HEALTH_PORT}/healthz"
    run = FloodRun(target, rate, before=proc_sample(pid))
    with attacker(bed):
        for _ in range(rounds):
            cpu = cpu_seconds(pid)
            run.quiet_gbps.append(iperf3_tcp(bed, SERVER, server_ip, CLIENT, seconds, port=5211))
            run.quiet_cpu_s += cpu_seconds(pid) - cpu
            longest = seconds + SETTLE + 5  # stopped when the iperf3 is done
            with (
                flooding(None, bed.underlay_ns, url, rate, longest) as flood,
                flooding(bed, target, probe_url, PROBE_RATE, longest) as probe,
            ):
                time.sleep(SETTLE)
                cpu = cpu_seconds(pid)
                gbps = iperf3_tcp(bed, SERVER, server_ip, CLIENT, seconds, port=5212)
                run.flood_cpu_s += cpu_seconds(pid) - cpu
            run.flood_gbps.append(gbps)
            for total, report in ((run.flood, flood), (run.probe, probe)):
                total.add(report[0] if report else FloodReport(failed={"no report": 1}))
    time.sleep(1.0)  # what the flood left open is closed by now
    run.after = proc_sample(pid)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scrape_flood", description=__doc__)
    p.add_argument("--rate", type=float, default=1000.0, help="GET /metrics per second")
    p.add_argument("--rounds", type=int, default=4, help="quiet + flooded iperf3 runs")
    p.add_argument("--seconds", type=float, default=5.0, help="each iperf3 run")
    p.add_argument("--target", default="n1", choices=("n1", "n2"), help="the flooded node")
    p.add_argument("--backend", default="udp", choices=("udp", "vxlan"))
    p.add_argument("--json", action="store_true", help="also print the run as JSON")
    args = p.parse_args(argv)
    with flood_bed("sf" + uuid.uuid4().hex[:6], args.backend) as bed:
        bed.up()
        run = measure(bed, args.target, args.rate, args.rounds, args.seconds)
    print("\n".join(run.lines()), flush=True)
    if args.json:
        print(json.dumps(run.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
