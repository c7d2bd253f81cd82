"""`overlay run --workers 2` on a dual-stack userspace vxlan testbed: every worker carries
the IPv6 half as it carries IPv4 (a TUN queue, and a SO_REUSEPORT socket on each underlay
address), TCP moves intact over both families both ways, and `overlay status` and
/metrics count the IPv6 traffic of every process."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.measure import iperf3_server, iperf3_tcp
from overlay.lab.testbed import Testbed
from overlay.lab.transfer import transfer
from tests.helpers.commands import overlay_cmd
from tests.helpers.observe import metric_samples
from tests.helpers.polling import poll
from tests.helpers.testbed import node_status

pytestmark = pytest.mark.netns

TRANSFER_BYTES = 30 * 1024 * 1024


@pytest.fixture(scope="module", params=["dual", "ipv6"])
def bed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    tb = Testbed(
        "w6" + uuid.uuid4().hex[:6],
        nodes=2,
        pods_per_node=1,
        backend="vxlan",
        daemon_args=("--workers", "2"),
        ip_family=request.param,
    )
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def fresh(bed: Testbed, node: str) -> dict[str, Any]:
    """The node's status once every worker has reported since the last traffic."""
    time.sleep(1.1)  # one report interval

    def reported() -> dict[str, Any] | None:
        st = node_status(bed, node)
        ages = [w.get("report_age_s") for w in st["workers"]]
        return st if all(a is None or a < 0.5 for a in ages) else None

    st = poll(reported, timeout=5)
    assert st, f"no fresh report from {node}'s worker"
    return st


def test_each_worker_has_an_ipv6_socket_beside_its_ipv4_one(bed: Testbed) -> None:
    for node in ("n1", "n2"):
        st = node_status(bed, node)
        assert [w["index"] for w in st["workers"]] == [0, 1]
        assert all(w["alive"] for w in st["workers"])
        assert st["vtep_mac6"]  # the IPv6 half runs
        plan = bed.plan.node(int(node[1]))
        families = [("-6", plan.address6)]
        if bed.topology.ip_family == "dual":  # IPv6 only: the IPv4 sockets are bound nowhere
            families.append(("-4", plan.address))
        for family, address in families:
            out = bed.exec(node, ["ss", "-Hunl", family, "sport = :8472"], capture_output=True)
            sockets = out.stdout.decode().splitlines()
            assert len(sockets) == 2, (family, sockets)  # main process + worker, same port
            assert all(str(address) in line for line in sockets), sockets


def test_tcp_intact_over_both_families_both_ways(bed: Testbed) -> None:
    """Over IPv6, and over IPv4 where the bed has it (an IPv6-only bed has none)."""
    versions = (6, 4) if bed.topology.ip_family == "dual" else (6,)
    for version in versions:
        port = 5301 if version == 6 else 5311
        transfer(bed, "n1-p1", "n2-p1", TRANSFER_BYTES, port=port, version=version)
        transfer(bed, "n2-p1", "n1-p1", TRANSFER_BYTES, port=port + 1, version=version)


def test_both_workers_send_ipv6_and_the_counts_add_up(bed: Testbed) -> None:
    before = [w["counters"]["tx_packets6"] for w in node_status(bed, "n1")["workers"]]
    drops_before = node_status(bed, "n2")["counters"]["drops6"]
    # 16 TCP connections over IPv6: each gets its own flow hash, so both TUN queues of n1
    # carry some (all 16 on one queue: 2 in 65536).
    server_ip = bed.pod_ip("n2-p1", 6)
    with iperf3_server(bed, "n2-p1", server_ip, port=5303):
        gbits = iperf3_tcp(bed, "n2-p1", server_ip, "n1-p1", seconds=2, streams=16, port=5303)
    assert gbits > 0.05
    st = fresh(bed, "n1")
    workers = st["workers"]
    sent = [w["counters"]["tx_packets6"] - b for w, b in zip(workers, before, strict=True)]
    assert all(n > 100 for n in sent), f"IPv6 packets sent per worker during the run: {sent}"
    total = st["counters"]
    for name in ("tx_packets6", "tx_bytes6", "rx_packets6", "rx_bytes6"):
        assert total[name] == sum(w["counters"][name] for w in workers), name
    assert total["tx_packets"] >= total["tx_packets6"] >= sum(sent)
    # The IPv6 half's own counts (offloads, NDP replies): summed over the processes.
    for key in workers[0]["ipv6"]:
        assert st[key] == sum(w["ipv6"][key] for w in workers), key
    assert all(w["ipv6"]["ipv6_tx_tun_super_packets"] > 0 for w in workers), workers
    # What worker 1 framed was as good as worker 0's: n2 dropped none of it.
    assert node_status(bed, "n2")["counters"]["drops6"] == drops_before
    got = metric_samples(st)
    v6 = (("family", "ipv6"),)
    assert got[("overlay_sent_packets_total", v6)] == total["tx_packets6"]
    assert got[("overlay_received_packets_total", v6)] == total["rx_packets6"]
    assert got[("overlay_sent_packets_total", (("family", "ipv4"),))] == (
        total["tx_packets"] - total["tx_packets6"]
    )


def test_trace_merges_the_ipv6_captures_of_every_worker(bed: Testbed, tmp_path: Path) -> None:
    """Captured IPv6 datagrams sent by n1 during a 16-flow run outnumber what its main
    process sent itself: the worker's IPv6 half traces into the same stream."""
    capture = tmp_path / "w6.pcapng"
    sock = str(bed.node_dir(1) / "status.sock")
    tracer = subprocess.Popen(
        overlay_cmd("trace", "--status-socket", sock, "-s", "64", "-w", str(capture),
                    "outer out and ip6"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert tracer.stderr is not None
    assert b"capturing on" in tracer.stderr.readline()
    before = [w["counters"]["tx_packets6"] for w in node_status(bed, "n1")["workers"]]
    server_ip = bed.pod_ip("n2-p1", 6)
    try:
        with iperf3_server(bed, "n2-p1", server_ip, port=5304):
            iperf3_tcp(bed, "n2-p1", server_ip, "n1-p1", seconds=2, streams=16, port=5304)
        after = [w["counters"]["tx_packets6"] for w in fresh(bed, "n1")["workers"]]
    finally:
        tracer.send_signal(signal.SIGINT)
        _, err = tracer.communicate(timeout=20)
    assert tracer.returncode == 0, err
    captured = int(re.search(rb"(\d+) packets captured", err)[1])  # type: ignore[index]
    sent = [a - b for a, b in zip(after, before, strict=True)]
    assert sent[1] > 100, sent  # the worker forwarded part of the run ...
    assert captured > sent[0], (captured, sent)  # ... and its IPv6 datagrams were captured
    assert captured <= sum(sent) + 10, (captured, sent)


def test_impairment_reaches_every_workers_ipv6_half(bed: Testbed) -> None:
    """`overlay impair delay` on n1: during a 16-flow IPv6 run both processes delay the
    IPv6 datagrams they send (each holds its own links); --clear ends it everywhere."""

    def impair(*argv: str) -> None:
        socket = str(bed.status_socket(1))
        result = subprocess.run(overlay_cmd("impair", "--status-socket", socket, *argv),
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        assert result.returncode == 0, result.stderr

    def delayed() -> list[int]:
        return [w["counters"]["impaired"].get("tx_delayed", 0) for w in fresh(bed, "n1")["workers"]]

    before = delayed()
    impair("delay", "1ms")
    server_ip = bed.pod_ip("n2-p1", 6)
    try:
        with iperf3_server(bed, "n2-p1", server_ip, port=5305):
            iperf3_tcp(bed, "n2-p1", server_ip, "n1-p1", seconds=2, streams=16, port=5305)
        during = delayed()
    finally:
        impair("--clear")
    assert all(d - b > 100 for d, b in zip(during, before, strict=True)), (before, during)
    transfer(bed, "n1-p1", "n2-p1", 1024 * 1024, port=5306, version=6)
    assert delayed() == during  # cleared in every process
