"""``python -m bench.vxlan_interop``: iperf3 TCP and ping RTT between the vxlan datapaths.

One 4-node vxlan testbed (file registry): n1 and n2 run the userspace datapath, n3 and n4
the kernel's vxlan device. Rows: userspace <-> userspace, userspace -> kernel,
kernel -> userspace, kernel <-> kernel, pod to pod, median of ``--runs``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import uuid

from bench.measure import iperf3_tcp, ping
from overlay.lab.testbed import Testbed

PAIRS = [
    ("userspace -> userspace", "n1-p1", "n2-p1"),
    ("userspace -> kernel", "n1-p1", "n3-p1"),
    ("kernel -> userspace", "n3-p1", "n1-p1"),
    ("kernel -> kernel", "n3-p1", "n4-p1"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vxlan_interop", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args(argv)
    bed = Testbed(
        "vi" + uuid.uuid4().hex[:6],
        nodes=4,
        pods_per_node=1,
        backend="vxlan",
        registry="file",
        kernel_nodes=(3, 4),
    )
    with bed:
        bed.up()
        ips = {p["name"]: p["ip"] for p in bed.status()["pods"]}
        print(
            f"| path (vxlan, pod to pod) | TCP 1 stream Gbit/s (median of {args.runs}) "
            "| ping avg us |"
        )
        print("|---|---|---|")
        for label, src, dst in PAIRS:
            ping(bed, src, ips[dst], count=3)
            rtt = ping(bed, src, ips[dst], count=20, interval=0.05)
            runs = [
                iperf3_tcp(bed, dst, ips[dst], src, seconds=args.seconds) for _ in range(args.runs)
            ]
            print(
                f"| {label} | {statistics.median(runs):.2f} "
                f"({min(runs):.2f}-{max(runs):.2f}) | {rtt.avg_ms * 1000:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
