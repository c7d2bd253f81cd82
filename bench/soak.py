"""``python -m bench.soak``: a long run under steady load, sampling what would leak.

A 3-node udp testbed on a real etcd; the daemons renew their 24 h lease every minute
(``--subnet-lease-renew-margin 1439``, the largest margin flanneld allows), so a
renewal that leaked an etcd lease object would show within minutes. Under rate-limited
iperf3 TCP between pods (n1 -> n2, n3 -> n1) and a ping, every ``--every`` seconds it
prints each daemon's RSS, open fds and threads, and etcd's lease objects and lease keys.
At the end: the change of each from the first sample, renewals logged, pings lost.
Not part of the suite (it runs for minutes)::

    python -m bench.soak                 # 10 minutes, a sample every 30 s
    python -m bench.soak --minutes 3 --every 15
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from overlay.lab.testbed import Testbed

SUBNETS = "/coreos.com/network/subnets/"


def proc_sample(pid: int) -> dict[str, int]:
    """RSS (KiB), open fds and threads of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
        "threads": int(fields["Threads"]),
    }


def etcd_sample(bed: Testbed) -> dict[str, int]:
    leases = bed.etcd.etcdctl("lease", "list").stdout.split()
    keys = bed.etcd.etcdctl("get", SUBNETS, "--prefix", "--keys-only").stdout.split()
    return {"etcd_leases": max(len(leases) - 3, 0), "lease_keys": len(keys)}


def sample(bed: Testbed) -> dict[str, Any]:
    nodes = bed.status()["nodes"]
    return {
        "t": time.monotonic(),
        "daemons": {n["name"]: proc_sample(n["pid"]) for n in nodes if n["pid"]},
        **etcd_sample(bed),
    }


def renewals(bed: Testbed, i: int) -> int:
    count = 0
    for line in bed.log_file(i).read_text(errors="replace").splitlines():
        try:
            count += json.loads(line).get("event") == "lease_renewed"
        except ValueError:
            pass
    return count


def row(s: dict[str, Any], start: float) -> str:
    cells = [f"{s['t'] - start:6.0f}"]
    for name in sorted(s["daemons"]):
        d = s["daemons"][name]
        cells.append(f"{d['rss_kib'] / 1024:7.1f} {d['fds']:4d} {d['threads']:3d}")
    cells.append(f"{s['etcd_leases']:6d} {s['lease_keys']:5d}")
    return " | ".join(cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--rate", default="200M", help="iperf3 -b per stream (default 200M)")
    args = p.parse_args(argv)
    seconds = args.minutes * 60
    bed = Testbed(
        "sk" + uuid.uuid4().hex[:6],
        nodes=3,
        pods_per_node=1,
        registry="etcd",
        daemon_args=("--subnet-lease-renew-margin", "1439"),
    )
    with bed:
        bed.up()
        loads = []
        for client, server, port in (("n1-p1", "n2-p1", 5201), ("n3-p1", "n1-p1", 5202)):
            ip = bed.pod_ip(server)
            loads.append(
                bed.popen(
                    server,
                    ["iperf3", "-s", "-B", ip, "-p", str(port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            time.sleep(0.3)
            loads.append(
                bed.popen(
                    client,
                    [
                        "iperf3",
                        "-c",
                        ip,
                        "-p",
                        str(port),
                        "-t",
                        str(int(seconds) + 5),
                        "-b",
                        args.rate,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        ping = bed.popen(
            "n2-p1",
            ["ping", "-i", "0.5", "-W", "1", bed.pod_ip("n3-p1")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        names = sorted(n["name"] for n in bed.status()["nodes"])
        header = ["     s"] + [f"{n}: RSS MiB  fds thr" for n in names] + ["etcd leases keys"]
        print(" | ".join(header), flush=True)
        first = sample(bed)
        start = first["t"]
        print(row(first, start), flush=True)
        last = first
        try:
            while time.monotonic() - start < seconds:
                time.sleep(min(args.every, max(seconds - (time.monotonic() - start), 0.1)))
                last = sample(bed)
                print(row(last, start), flush=True)
        finally:
            ping.send_signal(signal.SIGINT)
            output, _ = ping.communicate(timeout=10)
            for proc in loads:
                proc.terminate()
                proc.wait(timeout=10)
        counts = re.search(r"(\d+) packets transmitted, (\d+) received", output)
        print()
        for name in names:
            a, b = first["daemons"][name], last["daemons"][name]
            print(
                f"{name}: RSS {a['rss_kib'] / 1024:.1f} -> {b['rss_kib'] / 1024:.1f} MiB, "
                f"fds {a['fds']} -> {b['fds']}, threads {a['threads']} -> {b['threads']}, "
                f"renewals {renewals(bed, int(name[1:]))}"
            )
        print(
            f"etcd lease objects {first['etcd_leases']} -> {last['etcd_leases']}, "
            f"lease keys {first['lease_keys']} -> {last['lease_keys']}"
        )
        if counts:
            print(f"pings: {counts[1]} sent, {counts[2]} answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
