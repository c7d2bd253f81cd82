"""``python -m bench.impair``: how closely the dataplane's impairment (``overlay impair``)
does what it is told, configured beside observed, on a 2-node testbed per datapath.

Pod n1-p1 talks to pod n2-p1; n1's daemon impairs what it sends to n2 (``out``; one row
also what it receives, ``in``). Each row is measured over a few thousand packets:

- delay (plain, uniform jitter, normal jitter, and on the receive side): ping RTTs; the
  observed added delay at p50 and p99 is that percentile of the RTTs minus the
  unimpaired p50 (so the p99 carries the path's own spread as well);
- loss (random, and Gilbert-Elliott bursts): the echo requests that got no reply, beside
  what the daemon counted as ``tx_impair_loss``; for bursts also the mean burst length
  (netem's model: 1/R);
- rate: iperf3 UDP at twice the rate, inner packets (IP + UDP + 1400 B) that arrived per
  second of sending.

The verdict column applies the tolerances of ``tests/netns/test_impair.py``: the p50 of
an added delay within -0.5 / +3 ms, a loss rate within 4 binomial standard deviations, a
rate within 10 %::

    python -m bench.impair                    # udp and vxlan, ~4 min
    python -m bench.impair --backend vxlan --workers 2 --out impair
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.measure import iperf3_udp, percentile
from overlay.lab.testbed import Testbed
from overlay.observe.status_socket import query

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_REPLY = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")
_NORMAL_P99 = 2.3263  # the standard normal's 99th percentile
PAYLOAD = 1400  # iperf3 -l: inner packet = PAYLOAD + 28 (IPv4 + UDP headers)


@dataclass(frozen=True)
class Row:
    backend: str
    netem: str
    metric: str
    configured: str
    observed: str
    ok: bool


@dataclass(frozen=True)
class Pings:
    sent: int
    replies: dict[int, float]  # icmp_seq -> RTT in ms

    def rtts(self) -> list[float]:
        return list(self.replies.values())

    def lost_bursts(self) -> list[int]:
        """The lengths of the runs of consecutive echo requests without a reply."""
        bursts: list[int] = []
        run = 0
        for seq in range(1, self.sent + 1):
            if seq in self.replies:
                if run:
                    bursts.append(run)
                run = 0
            else:
                run += 1
        if run:
            bursts.append(run)
        return bursts


def pings(bed: Testbed, count: int, interval: float) -> Pings:
    result = bed.exec(
        "n1-p1",
        ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", bed.pod_ip("n2-p1")],
        capture_output=True,
        text=True,
        timeout=count * interval + 60,
    )
    sent = re.search(r"(\d+) packets transmitted", result.stdout)
    if sent is None:
        raise RuntimeError(f"ping n1-p1 -> n2-p1 failed: {result.stderr.strip()}")
    replies = {int(m[1]): float(m[2]) for m in _REPLY.finditer(result.stdout)}
    return Pings(int(sent[1]), replies)


def impair(bed: Testbed, *argv: str) -> None:
    """`overlay impair` on n1, as a user runs it."""
    command = [sys.executable, "-m", "overlay", "impair"]
    command += ["--status-socket", str(bed.status_socket(1)), *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"overlay impair {' '.join(argv)}: {result.stderr.strip()}")


def impair_drops(bed: Testbed) -> int:
    """n1's tx_impair_loss so far (workers report every second: wait for that)."""
    time.sleep(1.2)
    drops = query(bed.status_socket(1))["counters"]["drops"]
    return int(drops.get("tx_impair_loss", 0))


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def delay_rows(bed: Testbed, backend: str, count: int, base_p50: float) -> list[Row]:
    """Each delay (configured p50, p99 in ms) against the RTTs' added p50, p99."""
    cases = [
        (["delay", "20ms"], 20.0, 20.0),
        (["delay", "20ms", "5ms"], 20.0, 20.0 + 0.98 * 5),
        (["delay", "20ms", "5ms", "distribution", "normal"], 20.0, 20.0 + _NORMAL_P99 * 5),
        (["--direction", "in", "delay", "20ms"], 20.0, 20.0),
    ]
    rows = []
    for words, p50, p99 in cases:
        impair(bed, "--clear")  # one rule per direction: an "in" rule would add to "out"
        impair(bed, *words)
        rtts = pings(bed, count, 0.005).rtts()
        got50 = percentile(rtts, 50) - base_p50
        got99 = percentile(rtts, 99) - base_p50
        netem = " ".join(words).replace("--direction in ", "") + (
            " (in)" if "--direction" in words else " (out)"
        )
        ok = p50 - 0.5 <= got50 <= p50 + 3
        rows.append(Row(backend, netem, "added delay p50", _ms(p50), _ms(got50), ok))
        rows.append(Row(backend, netem, "added delay p99", _ms(p99), _ms(got99), True))
    impair(bed, "--clear")
    return rows


def loss_rows(bed: Testbed, backend: str, count: int) -> list[Row]:
    rows = []
    for words, mean, burst in (
        (["loss", "1%"], 0.01, None),
        (["loss", "gemodel", "1%", "30%"], 0.01 / (0.01 + 0.30), 1 / 0.30),
    ):
        impair(bed, *words)
        before = impair_drops(bed)
        seen = pings(bed, count, 0.002)
        counted = impair_drops(bed) - before
        lost = seen.sent - len(seen.replies)
        spread = 4 * math.sqrt(mean * (1 - mean) / seen.sent)
        if burst is not None:  # bursts: a loose bound, the losses are not independent
            spread *= 3
        ok = abs(lost / seen.sent - mean) <= spread
        observed = f"{lost / seen.sent:.2%} ({lost}/{seen.sent}; daemon counted {counted})"
        netem = " ".join(words)
        rows.append(Row(backend, netem, "loss", f"{mean:.2%}", observed, ok))
        if burst is not None:
            bursts = seen.lost_bursts()
            got = statistics.mean(bursts) if bursts else 0.0
            rows.append(Row(backend, netem, "mean burst", f"{burst:.2f}", f"{got:.2f}", True))
    impair(bed, "--clear")
    return rows


def rate_rows(bed: Testbed, backend: str, seconds: float) -> list[Row]:
    rows = []
    for rate in (20e6, 100e6):
        words = ["rate", f"{rate / 1e6:g}mbit", "limit", "100"]
        impair(bed, *words)
        trial = iperf3_udp(bed, "n2-p1", bed.pod_ip("n2-p1"), "n1-p1", PAYLOAD, 2 * rate, seconds)
        inner = trial.received_pps * (PAYLOAD + 28) * 8
        ok = abs(inner / rate - 1) <= 0.10
        observed = f"{inner / 1e6:.2f} Mbit/s ({trial.loss_pct:.0f}% of 2x dropped)"
        rows.append(
            Row(backend, " ".join(words), "inner rate", f"{rate / 1e6:.2f} Mbit/s", observed, ok)
        )
    impair(bed, "--clear")
    return rows


def measure(backend: str, workers: int, pings_per_row: int) -> list[Row]:
    args = ("--workers", str(workers)) if workers > 1 else ()
    bed = Testbed(
        "im" + uuid.uuid4().hex[:5],
        nodes=2,
        pods_per_node=1,
        backend=backend,
        registry="file",
        daemon_args=args,
    )
    label = backend + (f" --workers {workers}" if workers > 1 else "")
    with bed:
        bed.up()
        pings(bed, 200, 0.005)  # warm: ARP, caches, the daemons' code paths
        base = pings(bed, pings_per_row, 0.005).rtts()
        base_p50 = percentile(base, 50)
        rows = [
            Row(
                label,
                "none",
                "RTT p50 / p99",
                "-",
                f"{base_p50:.3f} / {percentile(base, 99):.3f} ms",
                True,
            )
        ]
        rows += delay_rows(bed, label, pings_per_row, base_p50)
        rows += loss_rows(bed, label, 3 * pings_per_row // 2)
        rows += rate_rows(bed, label, 5.0)
        impair(bed, "--clear")
        after = percentile(pings(bed, pings_per_row, 0.005).rtts(), 50)
        ok = after <= max(2 * base_p50, base_p50 + 0.5)
        rows.append(Row(label, "--clear", "RTT p50", _ms(base_p50), _ms(after), ok))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [
        "| datapath | netem | metric | configured | observed | within tolerance |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "yes" if r.ok else "**no**"
        lines.append(
            f"| {r.backend} | {r.netem} | {r.metric} | {r.configured} | {r.observed} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.impair", description=__doc__)
    p.add_argument("--backend", choices=("udp", "vxlan"), action="append")
    p.add_argument("--workers", type=int, default=1, help="forwarding processes per daemon")
    p.add_argument("--pings", type=int, default=2000, help="pings per delay row (5 ms apart)")
    p.add_argument("--out", help="also write bench/results/OUT.md")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("python -m bench.impair: error: needs root (namespaces, TUN)\n")
        return 1
    if not 1 <= args.workers <= 16 or args.pings < 100:
        sys.stderr.write("python -m bench.impair: error: --workers 1..16, --pings >= 100\n")
        return 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: list[Row] = []
    for backend in args.backend or ["udp", "vxlan"]:
        print(f"== {backend}: 2 nodes, pod n1-p1 -> pod n2-p1, impaired on n1", flush=True)
        rows += measure(backend, args.workers, args.pings)
        print(format_table([r for r in rows if r.backend.startswith(backend)]), flush=True)
    table = format_table(rows)
    print("\n" + table)
    if args.out:
        command = "python -m bench.impair " + " ".join(argv if argv is not None else sys.argv[1:])
        text = f"# Impairment accuracy ({started})\n\n`{command}`\n\n{table}\n"
        (RESULTS_DIR / f"{args.out}.md").write_text(text)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
