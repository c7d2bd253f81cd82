"""`make demo`: a 3-node udp-backend testbed, pods pinging across nodes, a short iperf3,
a small table, and a teardown that runs whatever happens."""

from __future__ import annotations

import sys
import uuid

from bench.measure import iperf3_tcp, ping
from overlay.lab.testbed import Testbed


def main() -> int:
    bed = Testbed("demo" + uuid.uuid4().hex[:4], nodes=3, pods_per_node=2, backend="udp")
    print(f"== building testbed {bed.prefix}: 3 nodes x 2 pods, udp backend, etcd registry")
    with bed:
        bed.up()
        st = bed.status()
        for node in st["nodes"]:
            print(
                f"   node {node['name']}  underlay {node['underlay_ip']:<12} "
                f"lease {node['subnet']:<16} daemon pid {node['pid']}"
            )
        for pod in st["pods"]:
            print(f"   pod  {pod['name']:<6} {pod['ip']:<14} on {pod['node']}")
        pods = {p["name"]: p for p in st["pods"]}
        nodes = {n["name"]: n for n in st["nodes"]}
        a, b = pods["n1-p1"], pods["n3-p1"]
        rows = []
        print(f"== ping {a['name']} ({a['ip']}) -> {b['name']} ({b['ip']}) and back")
        there = ping(bed, a["name"], b["ip"], count=5)
        back = ping(bed, b["name"], a["ip"], count=5)
        if there.received == 0 or back.received == 0:
            print("   pods cannot reach each other: see the daemon logs in", bed.state_dir)
            return 1
        print(f"   {there.received}/{there.sent} there, {back.received}/{back.sent} back")
        print("== iperf3 TCP, 5 s, 1 stream")
        overlay_gbps = iperf3_tcp(bed, b["name"], b["ip"], a["name"], seconds=5)
        rows.append(("pod n1-p1 -> pod n3-p1 (udp backend)", there.avg_ms, overlay_gbps))
        n3 = nodes["n3"]
        under_rtt = ping(bed, "n1", n3["underlay_ip"], count=5)
        under_gbps = iperf3_tcp(bed, "n3", n3["underlay_ip"], "n1", seconds=5)
        rows.append(("node n1 -> node n3 (plain underlay)", under_rtt.avg_ms, under_gbps))
        print()
        print(f"| {'path':<40} | {'RTT avg':>9} | {'TCP':>12} |")
        print(f"|{'-' * 42}|{'-' * 11}|{'-' * 14}|")
        for path, rtt, gbps in rows:
            print(f"| {path:<40} | {rtt * 1000:>6.0f} us | {gbps:>6.2f} Gbit/s |")
        print(f"\nudp backend reaches {overlay_gbps / under_gbps:.1%} of the plain underlay")
        print(f"== tearing down {bed.prefix}")
    print("== done: nothing left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
