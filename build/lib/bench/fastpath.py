"""``python -m bench.fastpath``: the udp backend's fast path against the plain underlay.

Builds a 2-node testbed (one pod per node) per configuration and prints, for the plain
underlay (node -> node), the udp backend with offloads (UDP GSO/GRO) and with
``--no-offload``: iperf3 TCP single-stream throughput (median of ``--runs``) and ping RTT,
each with its ratio to the plain underlay.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import uuid
from dataclasses import dataclass

from bench.measure import iperf3_tcp, ping
from overlay.testbed import Testbed


class NoOffloadTestbed(Testbed):
    """A testbed whose daemons run with ``--no-offload`` (the plain per-packet path)."""

    __test__ = False

    def daemon_argv(self, i: int) -> list[str]:
        return [*super().daemon_argv(i), "--no-offload"]


@dataclass(frozen=True)
class Row:
    name: str
    gbits: list[float]
    rtt_ms: float

    @property
    def median(self) -> float:
        return statistics.median(self.gbits)


def _measure(
    bed: Testbed, name: str, src: str, dst: str, dst_ip: str, args: argparse.Namespace
) -> Row:
    ping(bed, src, dst_ip, count=3, interval=0.2)  # warm up ARP and the peer table
    rtt = ping(bed, src, dst_ip, count=args.pings, interval=0.1)
    if rtt.received == 0:
        raise RuntimeError(f"{name}: {src} cannot reach {dst_ip}")
    runs = [iperf3_tcp(bed, dst, dst_ip, src, seconds=args.seconds) for _ in range(args.runs)]
    return Row(name, runs, rtt.avg_ms)


def _pod_ip(bed: Testbed, name: str) -> str:
    return str(next(p["ip"] for p in bed.status()["pods"] if p["name"] == name))


def _run(cls: type[Testbed], label: str, args: argparse.Namespace, underlay: bool) -> list[Row]:
    bed = cls(
        "fp" + uuid.uuid4().hex[:6],
        nodes=2,
        pods_per_node=1,
        backend="udp",
        registry=args.registry,
    )
    rows = []
    try:
        bed.up()
        if underlay:
            rows.append(_measure(bed, "plain underlay", "n1", "n2", str(bed.node_ip(2)), args))
        rows.append(_measure(bed, label, "n1-p1", "n2-p1", _pod_ip(bed, "n2-p1"), args))
    finally:
        bed.down()
    return rows


def format_table(rows: list[Row]) -> str:
    base = rows[0]
    lines = [
        f"{'path':<24} {'TCP Gbit/s':>10} {'x underlay':>10} {'runs':<20} "
        f"{'ping avg ms':>11} {'x underlay':>10}"
    ]
    for row in rows:
        runs = " ".join(f"{g:.2f}" for g in row.gbits)
        lines.append(
            f"{row.name:<24} {row.median:>10.2f} {row.median / base.median:>10.3f} {runs:<20} "
            f"{row.rtt_ms:>11.3f} {row.rtt_ms / base.rtt_ms:>10.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fastpath", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (median)")
    parser.add_argument("--seconds", type=float, default=5, help="length of one iperf3 run")
    parser.add_argument("--pings", type=int, default=20, help="pings per path")
    parser.add_argument(
        "--only", choices=("offload", "no-offload"), help="measure one udp configuration"
    )
    parser.add_argument(
        "--registry",
        default="file",
        choices=("file", "etcd"),
        help="testbed registry (default file: no etcd process competing for the CPUs)",
    )
    args = parser.parse_args(argv)
    rows: list[Row] = []
    if args.only != "no-offload":
        rows += _run(Testbed, "udp backend (offload)", args, underlay=True)
    if args.only != "offload":
        rows += _run(NoOffloadTestbed, "udp backend --no-offload", args, underlay=not rows)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
