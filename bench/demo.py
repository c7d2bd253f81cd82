"""`make demo`: a 4-node vxlan testbed (n1, n2 on our userspace datapath, n3, n4 on the
kernel's vxlan device), pod-to-pod round trips beside the plain underlay and kernel vxlan,
then `overlay impair` at work (20 ms added to a ping, a transfer over 1 % loss), in
about a minute, with a teardown that runs whatever happens.

Honest numbers: every path is warmed first (ARP, the kernel's caches, the daemons' code)
and measured with enough pings at a short interval to give a p50 and a p99; a handful of
pings 0.2 s apart mostly measures a cold, idle machine waking up.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass

from bench.measure import iperf3_json, percentile, ping_samples
from overlay.lab.testbed import Testbed
from overlay.lab.transfer import TransferMismatch, transfer

WARM_PINGS = 200
PINGS = 500
INTERVAL = 0.005  # s between pings
TCP_SECONDS = 3
CHECKED_BYTES = 20 * 10**6


@dataclass(frozen=True)
class MeasuredPath:
    label: str
    source: str
    target: str  # a node or pod name of the bed
    server: str  # where iperf3 listens (the target's namespace)


def _ip(bed: Testbed, name: str) -> str:
    return bed.pod_ip(name) if "-p" in name else str(bed.node_ip(int(name[1:])))


def _rtts(bed: Testbed, path: MeasuredPath, count: int) -> list[float]:
    """Round trip times in microseconds."""
    return ping_samples(bed, path.source, _ip(bed, path.target), count, INTERVAL)[1]


def _tcp(bed: Testbed, path: MeasuredPath) -> tuple[float, int]:
    """(Gbit/s the receiver got, TCP retransmits) of one iperf3 stream."""
    report = iperf3_json(bed, path.server, _ip(bed, path.target), path.source, [], TCP_SECONDS)
    end = report["end"]
    gbps = float(end["sum_received"]["bits_per_second"]) / 1e9
    return gbps, int(end["sum_sent"].get("retransmits", 0))


def _impair(bed: Testbed, node: int, *words: str) -> None:
    command = [sys.executable, "-m", "overlay", "impair"]
    command += ["--status-socket", str(bed.status_socket(node)), *words]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if shown.returncode != 0:
        raise RuntimeError(shown.stderr.strip())
    print(f"   $ overlay impair {' '.join(words)}    (on n{node})")


def _baseline(bed: Testbed, paths: list[MeasuredPath]) -> None:
    print(
        f"== warming each path ({WARM_PINGS} pings), then {PINGS} pings {INTERVAL * 1e3:g} ms apart"
    )
    for path in paths:
        _rtts(bed, path, WARM_PINGS)
    print(f"   {'path':<44} {'RTT p50':>9} {'p99':>9} {'TCP 1 stream':>14}")
    for path in paths:
        rtts = _rtts(bed, path, PINGS)
        gbps, _ = _tcp(bed, path)
        print(
            f"   {path.label:<44} {percentile(rtts, 50):>6.0f} us {percentile(rtts, 99):>6.0f} us"
            f" {gbps:>8.2f} Gbit/s"
        )


def _impairment(bed: Testbed, ours: MeasuredPath) -> None:
    print("== impairment in our dataplane (`overlay impair`, no kernel netem needed)")
    before = percentile(_rtts(bed, ours, 200), 50)
    _impair(bed, 1, "delay", "20ms")
    after = percentile(_rtts(bed, ours, 200), 50)
    print(f"   ping {ours.label}: p50 {before / 1e3:.2f} ms -> {after / 1e3:.2f} ms")
    _impair(bed, 1, "--clear")
    clean, clean_retx = _tcp(bed, ours)
    _impair(bed, 1, "loss", "1%")
    lossy, lossy_retx = _tcp(bed, ours)
    print(
        f"   TCP {ours.label}: {clean:.2f} Gbit/s ({clean_retx} retransmits) -> "
        f"{lossy:.2f} Gbit/s ({lossy_retx} retransmits) with 1% loss"
    )
    transfer(bed, ours.source, ours.server, CHECKED_BYTES, port=5301)
    print(f"   {CHECKED_BYTES // 10**6} MB over 1% loss arrived intact (sha256 checked)")
    _impair(bed, 1, "--clear")


def main() -> int:
    bed = Testbed(
        "demo" + uuid.uuid4().hex[:4],
        nodes=4,
        pods_per_node=1,
        backend="vxlan",
        kernel_nodes=(3, 4),
    )
    print(f"== building testbed {bed.prefix}: 4 nodes x 1 pod, vxlan, etcd registry")
    print("   n1, n2: our userspace datapath; n3, n4: the kernel's vxlan device")
    with bed:
        bed.up()
        st = bed.status()
        for node in st["nodes"]:
            print(
                f"   node {node['name']}  underlay {node['underlay_ip']:<12} "
                f"lease {node['subnet']:<16} pod {bed.pod_ip(node['name'] + '-p1')}"
            )
        ours = MeasuredPath(
            "pod n1-p1 -> pod n2-p1 (our userspace vxlan)", "n1-p1", "n2-p1", "n2-p1"
        )
        paths = [
            MeasuredPath("node n1 -> node n2 (plain underlay)", "n1", "n2", "n2"),
            MeasuredPath("pod n3-p1 -> pod n4-p1 (kernel vxlan)", "n3-p1", "n4-p1", "n4-p1"),
            ours,
        ]
        try:
            _baseline(bed, paths)
            _impairment(bed, ours)
        except (RuntimeError, TransferMismatch) as e:
            print(f"   failed: {e}; daemon logs in {bed.state_dir}")
            return 1
        print(f"== tearing down {bed.prefix}")
    print("== done: nothing left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
