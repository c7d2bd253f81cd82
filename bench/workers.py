"""`overlay run --workers`: iperf3 TCP pod to pod with 1 vs N forwarding processes.

One 2-node testbed per setting (file registry, as `overlay bench`), all up at once, runs
interleaved round-robin so that load from elsewhere on the machine hits every setting
alike. Prints min / median / max Gbit/s, the daemons' CPU% (main process and workers),
and how n1's sent packets were split over its workers.

    python -m bench.workers --backend udp --workers 1,2 --streams 4 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

from bench.measure import cpu_seconds, iperf3_tcp, ping
from overlay import status
from overlay.testbed import Testbed


def _tx_split(bed: Testbed) -> list[int]:
    st = status.query(bed.state_dir / "n1" / "status.sock")
    workers = st.get("workers") or [{"counters": st["counters"]}]
    return [int(w["counters"]["tx_packets"]) for w in workers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--backend", choices=("udp", "vxlan"), default="udp")
    parser.add_argument("--workers", default="1,2", help="settings to compare (default 1,2)")
    parser.add_argument("--streams", type=int, default=4, help="iperf3 -P (default 4)")
    parser.add_argument("--runs", type=int, default=3, help="runs per setting (default 3)")
    parser.add_argument("--seconds", type=float, default=5, help="iperf3 -t (default 5)")
    args = parser.parse_args(argv)
    settings = [int(x) for x in args.workers.split(",")]
    beds: dict[int, Testbed] = {}
    results: dict[int, dict[str, list[Any]]] = {n: {"gbits": [], "cpu": []} for n in settings}
    try:
        for n in settings:
            bed = Testbed(
                "k" + uuid.uuid4().hex[:6],
                nodes=2,
                pods_per_node=1,
                backend=args.backend,
                registry="file",
                daemon_args=("--workers", str(n)),
            )
            beds[n] = bed
            bed.up()
            ping(bed, "n1-p1", bed.pod_ip("n2-p1"), count=3, interval=0.05)  # warm up
        for run in range(args.runs):
            for n, bed in beds.items():
                pids = [node["pid"] for node in bed.status()["nodes"]]
                before = [cpu_seconds(pid) for pid in pids]
                start = time.monotonic()
                ip = bed.pod_ip("n2-p1")
                gbits = iperf3_tcp(
                    bed, "n2-p1", ip, "n1-p1", seconds=args.seconds, streams=args.streams
                )
                wall = time.monotonic() - start
                cpu = [100 * (cpu_seconds(p) - b) / wall for p, b in zip(pids, before, strict=True)]
                results[n]["gbits"].append(gbits)
                results[n]["cpu"].append(cpu)
                print(
                    f"run {run + 1} --workers {n}: {gbits:.2f} Gbit/s, daemon CPU% "
                    f"n1 {cpu[0]:.0f} / n2 {cpu[1]:.0f}",
                    flush=True,
                )
        time.sleep(1.2)  # one worker report interval
        print(
            f"\n{args.backend}, iperf3 TCP -P {args.streams} -t {args.seconds:g}, pod to pod, "
            f"{args.runs} runs interleaved"
        )
        print("| --workers | Gbit/s median (min-max) | daemon CPU% n1 / n2 | n1 tx by worker |")
        print("|---|---|---|---|")
        for n, bed in beds.items():
            g = results[n]["gbits"]
            cpu1 = statistics.median(c[0] for c in results[n]["cpu"])
            cpu2 = statistics.median(c[1] for c in results[n]["cpu"])
            split = " / ".join(str(x) for x in _tx_split(bed))
            print(
                f"| {n} | {statistics.median(g):.2f} ({min(g):.2f}-{max(g):.2f}) | "
                f"{cpu1:.0f} / {cpu2:.0f} | {split} |"
            )
    finally:
        for bed in beds.values():
            bed.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
