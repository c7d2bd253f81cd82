"""Impairment end to end (issue 21, item 2) on real 3-node namespace testbeds, udp (with
--workers 2, so the rules reach a worker too) and userspace vxlan (beside a kernel vxlan
node, n3, which refuses impairment): `overlay impair` sets
delay, loss and a rate that pings and iperf3 between pods measure within the tolerances
below, per peer and per direction, seen in `overlay status`, /metrics and the trace, and
`--clear` gives back the unimpaired round trip.

Tolerances (a busy 2-core machine, both nodes and pods sharing it): an added delay's
median within -0.5 / +3 ms of what is set (the timer fires within a fraction of a ms; a
descheduled daemon is late, never early); a loss rate within 4 binomial standard
deviations; a rate within 10 % (the queue in front of it is netem's FIFO).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay.lab.testbed import Testbed
from tests.helpers.commands import PYTHON, overlay_cmd
from tests.helpers.testbed import node_status, ping_rtts

pytestmark = pytest.mark.netns

HEALTH_PORT = 9101
IPERF_PORT = 5211


@pytest.fixture(scope="module", params=["udp", "vxlan"])
def bed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    backend = str(request.param)
    args = ["--healthz-port", str(HEALTH_PORT), "--healthz-ip", "127.0.0.1"]
    tb = Testbed(
        "i" + uuid.uuid4().hex[:7],
        nodes=3,
        pods_per_node=1,
        backend=backend,
        registry="file",
        kernel_nodes=(3,) if backend == "vxlan" else (),
        # --workers applies to every node, and a kernel datapath refuses it: udp only.
        daemon_args=tuple(args + (["--workers", "2"] if backend == "udp" else [])),
    )
    try:
        tb.up()
        # Warm every path (ARP, caches) before anything is measured.
        for target in ("n2-p1", "n3-p1"):
            ping_rtts(tb, "n1-p1", tb.pod_ip(target), 20)
        yield tb
    finally:
        tb.down()


def impair(bed: Testbed, node: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        overlay_cmd("impair", "--status-socket", str(bed.status_socket(node)), *argv),
        capture_output=True,
        text=True,
        timeout=30,
    )


def impaired(bed: Testbed, *argv: str) -> None:
    result = impair(bed, 1, *argv)
    assert result.returncode == 0, result.stderr


def median_rtt(bed: Testbed, target: str, count: int = 150) -> float:
    sent, rtts = ping_rtts(bed, "n1-p1", bed.pod_ip(target), count)
    assert len(rtts) >= sent * 0.95, (sent, len(rtts))
    return statistics.median(rtts)


def subnet_of(bed: Testbed, node: str) -> str:
    return str(next(n for n in bed.status()["nodes"] if n["name"] == node)["subnet"])


def udp_rate(bed: Testbed, offered: str, seconds: float = 3) -> float:
    """iperf3 UDP from n1-p1 to n2-p1 at ``offered`` (1400-byte payloads): bits of
    payload per second that arrived."""
    server = bed.popen(
        "n2-p1",
        ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            listening = bed.exec(
                "n2-p1", ["ss", "-Htln", f"sport = :{IPERF_PORT}"], capture_output=True, text=True
            )
            if listening.stdout.strip():
                break
            time.sleep(0.1)
        argv = ["iperf3", "-c", bed.pod_ip("n2-p1"), "-p", str(IPERF_PORT), "-u", "-l", "1400"]
        argv += ["-b", offered, "-t", str(seconds), "-J"]
        result = bed.exec("n1-p1", argv, capture_output=True, text=True, timeout=seconds + 30)
    finally:
        server.kill()
        server.wait()
    assert result.returncode == 0, result.stdout[-500:]
    end = json.loads(result.stdout)["end"]
    got = end.get("sum_received", end["sum"])
    sent = end.get("sum_sent", end["sum"])
    arrived = int(got["packets"]) - int(got["lost_packets"])
    return arrived * 1400 * 8 / float(sent["seconds"])


def test_delay_loss_and_rate_within_tolerance_then_clear_restores_the_rtt(bed: Testbed) -> None:
    base = median_rtt(bed, "n2-p1")
    assert base < 3, base

    impaired(bed, "delay", "20ms")
    added = median_rtt(bed, "n2-p1") - base
    assert 19.5 <= added <= 23, added

    impaired(bed, "loss", "10%")  # replaces the delay (one rule per peer and direction)
    before = node_status(bed, "n1")["counters"]["drops"].get("tx_impair_loss", 0)
    sent, rtts = ping_rtts(bed, "n1-p1", bed.pod_ip("n2-p1"), 1000, 0.005)
    lost = sent - len(rtts)
    spread = 4 * math.sqrt(0.1 * 0.9 / sent)
    assert 0.1 - spread <= lost / sent <= 0.1 + spread, (lost, sent)
    time.sleep(1.2)  # the workers' counters come every second
    counted = node_status(bed, "n1")["counters"]["drops"].get("tx_impair_loss", 0) - before
    assert counted == lost, (counted, lost)  # every lost echo request, and only those

    # A short queue: what it holds when the sender stops still arrives (a full netem
    # default of 1000 packets would add 0.6 s of 20 Mbit/s to a 3 s run).
    impaired(bed, "rate", "20mbit", "limit", "100")
    expected = 20e6 * 1400 / (1400 + 28)  # the rate counts inner packets, IP and UDP headers
    got = udp_rate(bed, "40M")
    assert expected * 0.9 <= got <= expected * 1.1, (got, expected)

    impaired(bed, "--clear")
    assert impair(bed, 1).stdout.strip() == "no impairment"
    after = median_rtt(bed, "n2-p1")
    assert after <= max(2 * base, base + 0.5), (after, base)


def test_one_peer_incoming_and_where_it_shows(bed: Testbed) -> None:
    """A rule for n2's subnet on what n1 receives: n1 <-> n2 gains it once per round trip,
    n1 <-> n3 not at all; status, /metrics and the rules list say so."""
    n2 = subnet_of(bed, "n2")
    base = {target: median_rtt(bed, target, 100) for target in ("n2-p1", "n3-p1")}
    impaired(bed, "--peer", n2, "--direction", "in", "delay", "15ms")
    try:
        added = median_rtt(bed, "n2-p1", 100) - base["n2-p1"]
        assert 14.5 <= added <= 18, added
        assert median_rtt(bed, "n3-p1", 100) <= max(2 * base["n3-p1"], base["n3-p1"] + 0.5)
        listed = impair(bed, 1, "--json")
        assert json.loads(listed.stdout) == [{"peer": n2, "direction": "in", "netem": "delay 15ms"}]
        table = subprocess.run(
            overlay_cmd("status", "--status-socket", str(bed.status_socket(1))),
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert f"impaired   {n2} in: delay 15ms" in table, table
        time.sleep(1.2)
        metrics = scrape(bed, "n1")
        assert metrics['overlay_impair_delayed_packets_total{direction="in"}'] >= 100
        assert metrics["overlay_impair_queued_packets"] == 0
        assert f'overlay_impairment_rule{{direction="in",netem="delay 15ms",peer="{n2}"}}' in (
            metrics
        )
    finally:
        impaired(bed, "--clear")


def test_a_drop_by_impairment_is_in_the_trace_with_its_reason(bed: Testbed) -> None:
    impaired(bed, "loss", "100%")
    try:
        trace = subprocess.Popen(
            overlay_cmd("trace", "--status-socket", str(bed.status_socket(1)), "-c", "1", "drop"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # attached
        ping_rtts(bed, "n1-p1", bed.pod_ip("n2-p1"), 3, 0.2)
        out, err = trace.communicate(timeout=20)
    finally:
        impaired(bed, "--clear")
    assert trace.returncode == 0, err
    assert "flannel0 Out IP" in out and "ICMP echo request" in out, out
    assert out.rstrip().endswith("[dropped: tx_impair_loss]"), out


def test_bad_requests_are_one_line(bed: Testbed) -> None:
    unknown = impair(bed, 1, "--peer", "198.18.250.0/24", "delay", "1ms")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("overlay impair: error: no peer 198.18.250.0/24 (peers: ")
    assert unknown.stderr.count("\n") == 1
    if bed.backend == "vxlan":  # n3 forwards in the kernel
        kernel = impair(bed, 3, "delay", "1ms")
        assert kernel.returncode == 1
        assert "impairment needs a datapath in this process" in kernel.stderr
        assert kernel.stderr.count("\n") == 1
    assert impair(bed, 1).stdout.strip() == "no impairment"  # nothing was changed


def scrape(bed: Testbed, node: str) -> dict[str, float]:
    """/metrics of a node: each sample line as written (name{labels}) -> value."""
    get = (
        "import sys, urllib.request\n"
        "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
    )
    url = f"http://127.0.0.1:{HEALTH_PORT}/metrics"
    result = bed.exec(node, [PYTHON, "-c", get, url], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    samples: dict[str, float] = {}
    for line in result.stdout.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# -- at start ----------------------------------------------------------------------------------


def test_impair_at_start_is_in_force_and_a_kernel_datapath_refuses_it(
    netns: Any, daemons: Any, tmp_path: Path
) -> None:
    ns = netns("start")
    common = ["--registry-file", str(tmp_path / "registry.json"), "--network", "198.18.0.0/16"]
    daemon = daemons(ns, tmp_path, *common, "--impair", "direction both delay 5ms 1ms")
    daemon.wait_event("started")
    status = json.loads(
        subprocess.run(
            overlay_cmd("status", "--json", "--status-socket", str(daemon.socket)),
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    )
    assert status["impairment"] == [
        {"peer": None, "direction": "out", "netem": "delay 5ms 1ms"},
        {"peer": None, "direction": "in", "netem": "delay 5ms 1ms"},
    ]
    code, _ = daemon.stop()
    assert code == 0
    kernel = subprocess.run(
        ["ip", "netns", "exec", ns, *overlay_cmd("run", "--iface", "lo")]
        + ["--registry-file", str(tmp_path / "k-registry.json"), "--network", "198.19.0.0/16"]
        + ["--backend", "vxlan", "--kernel-vxlan"]
        + ["--subnet-file", str(tmp_path / "k.env"), "--status-socket", str(tmp_path / "k.sock")]
        + ["--impair", "loss 1%"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert kernel.returncode == 1
    errors = [line for line in kernel.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "impairment needs a datapath in this process" in errors[0]
    assert "kernel" in errors[0]
