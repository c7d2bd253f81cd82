"""``python -m bench.bed_scale``: how large a namespace testbed this machine holds.

Builds N nodes x K pods (``overlay testbed up``'s code, progress on a terminal), lets the
daemons idle, then measures: the time up took and each of its stages, each idle daemon's
RSS (min, median, max), etcd's, the machine's memory the bed holds (MemAvailable before
up minus after), and the time ``down`` took and each of its stages. Also where a daemon's
memory goes: the RSS of a fresh interpreter, after the daemon's imports, and after the
etcd client's. Run it under the heavy lock (it is the machine's figure)::

    flock /work/heavy.lock python -m bench.bed_scale                  # 200 nodes x 1 pod, etcd
    flock /work/heavy.lock python -m bench.bed_scale --nodes 50 --registry file

Writes ``bench/results/<out>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from overlay.lab.progress import Progress
from overlay.lab.testbed import DAEMON_STARTS, Testbed

RESULTS = Path(__file__).resolve().parent / "results"

# What a daemon imports, step by step, each in a fresh interpreter (VmRSS after it).
IMPORT_STEPS = {
    "python": "",
    "+ the daemon (file registry)": "import overlay.node.daemon, overlay.cli.run",
    "+ the etcd client (HTTP/2 by h2)": "import overlay.node.daemon, overlay.cli.run, "
    "control.etcd_registry",
}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: each shared page divided among the processes mapping it."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def mib_stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "min": round(ordered[0], 1),
        "median": round(statistics.median(ordered), 1),
        "max": round(ordered[-1], 1),
        "sum": round(sum(ordered), 0),
    }


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def import_rss() -> dict[str, float]:
    """MiB resident after each of IMPORT_STEPS, each in a fresh interpreter."""
    probe = "import re, pathlib; print(re.search(r'VmRSS:\\s+(\\d+)', " + (
        "pathlib.Path('/proc/self/status').read_text())[1])"
    )
    result = {}
    for label, imports in IMPORT_STEPS.items():
        code = f"{imports}\n{probe}" if imports else probe
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        result[label] = round(int(out.split()[-1]) / 1024, 1)
    return result


def measure(
    nodes: int, pods: int, registry: str, settle: float, daemon_start: str
) -> dict[str, Any]:
    bed = Testbed("s" + uuid.uuid4().hex[:5], nodes=nodes, pods_per_node=pods, registry=registry)
    bed.daemon_start = daemon_start
    bed.progress = Progress(f"bed_scale up {nodes}x{pods}", bed.up_steps())
    available_before = mem_available_kib()
    started = time.monotonic()
    try:
        try:
            bed.up()
        finally:
            bed.progress.done()
        up_s = time.monotonic() - started
        up_stages = dict(bed.timings)
        time.sleep(settle)
        pids = [n["pid"] for n in bed.status()["nodes"]]
        rss = [rss_kib(pid) / 1024 for pid in pids if pid]
        pss = [pss_kib(pid) / 1024 for pid in pids if pid]
        server = bed.start_server_pid()
        server_pss = pss_kib(server) / 1024 if server else 0.0
        etcd = [rss_kib(pid) / 1024 for pid in bed.etcd.pids()] if registry == "etcd" else []
        held_mib = (available_before - mem_available_kib()) / 1024
    finally:
        bed.progress = Progress(f"bed_scale down {nodes}x{pods}")
        started = time.monotonic()
        try:
            bed.down()
        finally:
            bed.progress.done()
        down_s = time.monotonic() - started
        down_stages = dict(bed.timings)
    return {
        "prefix": bed.prefix,
        "nodes": nodes,
        "pods_per_node": pods,
        "registry": registry,
        "daemon_start": daemon_start,
        "up_s": round(up_s, 1),
        "down_s": round(down_s, 1),
        "up_stages_s": up_stages,
        "down_stages_s": down_stages,
        "daemons": len(rss),
        "daemon_rss_mib": mib_stats(rss),
        "daemon_pss_mib": mib_stats(pss),
        "start_server_pss_mib": round(server_pss, 1),
        "etcd_rss_mib": round(sum(etcd), 1),
        "machine_mib_held": round(held_mib, 0),
        "settle_s": settle,
    }


def report(result: dict[str, Any]) -> str:
    r, d, p = result, result["daemon_rss_mib"], result["daemon_pss_mib"]
    lines = [
        f"# bed_scale: {r['nodes']} nodes x {r['pods_per_node']} pod, {r['registry']} registry, "
        f"daemons started by {r['daemon_start']}",
        "",
        "| up | down | daemon RSS min / median / max | daemon PSS min / median / max "
        "| all daemons RSS / PSS | start server PSS | etcd | machine memory held |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['up_s']} s | {r['down_s']} s | {d['min']} / {d['median']} / {d['max']} MiB "
        f"| {p['min']} / {p['median']} / {p['max']} MiB | {d['sum']:.0f} / {p['sum']:.0f} MiB "
        f"| {r['start_server_pss_mib']} MiB | {r['etcd_rss_mib']} MiB "
        f"| {r['machine_mib_held']:.0f} MiB |",
        "",
        f"(RSS and PSS after {r['settle_s']:.0f} s idle; PSS divides each shared page among "
        "the processes that map it, so the daemons' PSS adds up to what they hold; machine "
        "memory = MemAvailable before up minus after.)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| up: {stage} | {s} |" for stage, s in r["up_stages_s"].items()),
        *(f"| down: {stage} | {s} |" for stage, s in r["down_stages_s"].items()),
        "",
        "(Daemons start all at once and each node's pods are added as soon as its daemon is "
        "up, so `daemons up` includes pods' CNI ADDs; `pods after the last daemon` is the "
        "tail.)",
        "",
        "| a fresh interpreter | RSS MiB |",
        "|---|---|",
        *(f"| {label} | {mib} |" for label, mib in r["imports_mib"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.bed_scale", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--pods", type=int, default=1, help="pods per node (default 1)")
    p.add_argument("--registry", choices=("etcd", "file"), default="etcd")
    p.add_argument(
        "--daemon-start",
        choices=DAEMON_STARTS,
        default=DAEMON_STARTS[0],
        help="fork (default, a start server) or exec (`ip netns exec` per daemon)",
    )
    p.add_argument("--settle", type=float, default=10.0, help="idle seconds before RSS")
    p.add_argument("--out", default=None, help="result name (default bed-scale-N)")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = measure(args.nodes, args.pods, args.registry, args.settle, args.daemon_start)
    result["imports_mib"] = import_rss()
    text = report(result)
    print(text, end="")
    name = args.out or f"bed-scale-{args.nodes}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{name}.md").write_text(text)
    (args.results_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results_dir / name}.md, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
