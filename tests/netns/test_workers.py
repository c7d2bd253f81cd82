"""`overlay run --workers 2` on a real namespace testbed (etcd, CNI pods): forwarding over
a multi-queue TUN and SO_REUSEPORT sockets, counters summed over the workers, workers that
die with their daemon and a worker death that is reported."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.measure import iperf3_server, iperf3_tcp
from overlay.lab.testbed import Testbed
from overlay.lab.transfer import transfer
from overlay.observe import status_socket as status
from tests.helpers.commands import overlay_cmd
from tests.helpers.testbed import node_status, pings_answered

pytestmark = pytest.mark.netns

WORKERS = ("--workers", "2")


@pytest.fixture(scope="module", params=["udp", "vxlan"])
def bed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    tb = Testbed(
        "w" + uuid.uuid4().hex[:7],
        nodes=2,
        pods_per_node=1,
        backend=request.param,
        daemon_args=WORKERS,
    )
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)", status, re.M)[1])  # type: ignore[index]


def worker_pids(bed: Testbed, node: str) -> list[int]:
    """The pids of the worker processes (not the main one) ``node`` reports."""
    return [w["pid"] for w in node_status(bed, node)["workers"] if w["index"] > 0]


def tun_queues(bed: Testbed, node: str) -> int:
    """How many queues the node's TUN has attached (`ip -d link`: numqueues)."""
    out = bed.exec(node, ["ip", "-d", "link", "show", "flannel0"], capture_output=True, text=True)
    return int(re.search(r"numqueues (\d+)", out.stdout)[1])  # type: ignore[index]


def log_events(bed: Testbed, i: int) -> list[dict[str, Any]]:
    events = []
    for line in bed.log_file(i).read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def test_two_forwarding_processes_per_node(bed: Testbed) -> None:
    for node in bed.status()["nodes"]:
        st = node_status(bed, node["name"])
        workers = st["workers"]
        assert [w["index"] for w in workers] == [0, 1], workers
        assert workers[0]["pid"] == node["pid"]  # the daemon forwards queue 0 itself
        assert all(w["alive"] for w in workers)
        child = workers[1]["pid"]
        assert running(child) and "overlay.dataplane.worker" in cmdline(child)
        assert parent(child) == node["pid"]
        assert tun_queues(bed, node["name"]) == 2
        # Outgoing flows are spread by their own hash, not pinned to the receiving worker.
        assert st["tun_steering"] == "flow_hash"
        assert workers[1]["features"] == workers[0]["features"] == st["features"]


def test_pods_ping_and_transfer_byte_identical(bed: Testbed) -> None:
    pings_answered(bed, "n1-p1", "n2-p1")
    pings_answered(bed, "n2-p1", "n1-p1")
    transfer(bed, "n1-p1", "n2-p1", 30 * 1024 * 1024)
    transfer(bed, "n2-p1", "n1-p1", 30 * 1024 * 1024, port=5202)


def test_both_workers_forward_and_counters_add_up(bed: Testbed) -> None:
    before = [w["counters"]["tx_packets"] for w in node_status(bed, "n1")["workers"]]
    drops_before = node_status(bed, "n2")["counters"]["drops"]
    # 16 TCP connections: each gets a random flow hash, so both TUN queues of n1 carry
    # some (all 16 on one queue: 2 in 65536).
    server_ip = bed.pod_ip("n2-p1")
    with iperf3_server(bed, "n2-p1", server_ip, port=5203):
        gbits = iperf3_tcp(bed, "n2-p1", server_ip, "n1-p1", seconds=2, streams=16, port=5203)
    assert gbits > 0.05

    def reported() -> dict[str, Any] | None:
        st = node_status(bed, "n1")
        fresh = all(w.get("report_age_s") is None or w["report_age_s"] < 0.5 for w in st["workers"])
        return st if fresh else None

    time.sleep(1.1)  # one report interval: the worker's counters include the run
    st = wait_for(reported, 5, "a fresh report from n1's worker")
    workers = st["workers"]
    sent = [w["counters"]["tx_packets"] - b for w, b in zip(workers, before, strict=True)]
    assert all(n > 100 for n in sent), f"packets sent per worker during the run: {sent}"
    total = st["counters"]
    for name, value in total.items():
        if isinstance(value, dict):  # drops and impaired: by reason, added reason by reason
            reasons = {r for w in workers for r in w["counters"][name]}
            assert value == {
                r: sum(w["counters"][name].get(r, 0) for w in workers) for r in sorted(reasons)
            }, name
        elif isinstance(value, list):  # batch-size histograms add bucket by bucket
            buckets = zip(*(w["counters"][name] for w in workers), strict=True)
            assert value == [sum(b) for b in buckets], name
        else:
            assert value == sum(w["counters"][name] for w in workers), name
    assert total["tx_packets"] >= sum(sent)
    # What worker 1 framed was as good as worker 0's (vxlan: the same per-peer prefix).
    assert node_status(bed, "n2")["counters"]["drops"] == drops_before


def test_per_peer_traffic_and_metrics_add_up_over_the_workers(bed: Testbed) -> None:
    """After the run above: n1's only peer carries exactly the node's traffic, summed over
    both processes, and /metrics has the sum and each worker."""
    from prometheus_client.parser import text_string_to_metric_families

    from overlay.observe import metrics

    time.sleep(1.1)  # a fresh report from the worker
    st = node_status(bed, "n1")
    (peer,) = st["peers"]
    for key in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes"):
        assert peer[key] == st["counters"][key], key
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render(st).decode())
        for sample in family.samples
    }
    per_worker = [samples[("overlay_worker_sent_packets_total", (("worker", w),))] for w in "01"]
    assert all(n > 100 for n in per_worker), per_worker
    assert samples[("overlay_sent_packets_total", (("family", "ipv4"),))] == sum(per_worker)
    assert samples[("overlay_peer_sent_packets_total", (("peer", peer["subnet"]),))] == sum(
        per_worker
    )
    assert samples[("overlay_worker_up", (("worker", "1"),))] == 1


def test_trace_merges_the_captures_of_every_worker(bed: Testbed, tmp_path: Path) -> None:
    """Captured datagrams sent by n1 during a 16-flow run outnumber what its main process
    sent itself: the worker's captures are in the same stream."""
    capture = tmp_path / "w.pcapng"
    sock = str(bed.node_dir(1) / "status.sock")
    tracer = subprocess.Popen(
        overlay_cmd("trace", "--status-socket", sock, "-s", "64", "-w", str(capture), "outer out"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert tracer.stderr is not None
    assert b"capturing on" in tracer.stderr.readline()
    before = [w["counters"]["tx_packets"] for w in node_status(bed, "n1")["workers"]]
    server_ip = bed.pod_ip("n2-p1")
    try:
        with iperf3_server(bed, "n2-p1", server_ip, port=5204):
            iperf3_tcp(bed, "n2-p1", server_ip, "n1-p1", seconds=2, streams=16, port=5204)
        time.sleep(1.1)
        after = [w["counters"]["tx_packets"] for w in node_status(bed, "n1")["workers"]]
    finally:
        tracer.send_signal(signal.SIGINT)
        _, err = tracer.communicate(timeout=20)
    assert tracer.returncode == 0, err
    captured = int(re.search(rb"(\d+) packets captured", err)[1])  # type: ignore[index]
    sent = [a - b for a, b in zip(after, before, strict=True)]
    assert sent[1] > 100, sent  # the worker forwarded part of the run ...
    assert captured > sent[0], (captured, sent)  # ... and its packets were captured
    assert captured <= sum(sent) + 10, (captured, sent)


def test_every_worker_follows_the_underlay_mtu(bed: Testbed) -> None:
    """n1's eth0 lowered to 1400 and raised back: every process's dataplane reports the
    new MTU (the main process tells its workers), and a pod's DF packet between the two
    limits is answered with frag-needed."""
    overhead = 28 if bed.backend == "udp" else 50

    def mtus() -> list[Any]:
        return [w["mtu"] for w in node_status(bed, "n1")["workers"]]

    try:
        bed.exec("n1", ["ip", "link", "set", "eth0", "mtu", "1400"], check=True)
        wait_for(lambda: mtus() == [1400 - overhead] * 2, 5, f"both at {1400 - overhead}")
        ping = ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1400", bed.pod_ip("n2-p1")]
        out = bed.exec("n1-p1", ping, capture_output=True, text=True).stdout
        assert f"Frag needed and DF set (mtu = {1400 - overhead})" in out, out
    finally:
        bed.exec("n1", ["ip", "link", "set", "eth0", "mtu", "1500"], check=True)
    wait_for(lambda: mtus() == [1500 - overhead] * 2, 5, f"both back at {1500 - overhead}")


def test_killed_worker_is_reported_and_the_rest_forwards(bed: Testbed) -> None:
    child = worker_pids(bed, "n2")[0]
    os.kill(child, signal.SIGKILL)

    def dead() -> dict[str, Any] | None:
        w = node_status(bed, "n2")["workers"][1]
        return w if not w["alive"] else None

    assert wait_for(dead, 10, "n2 noticing its worker died")["exit_code"] == -signal.SIGKILL
    exited = [e for e in log_events(bed, 2) if e["event"] == "worker_exited"]
    assert len(exited) == 1 and exited[0]["level"] == "warning", exited
    assert exited[0]["pid"] == child
    assert tun_queues(bed, "n2") == 1  # its queue went with it: nothing is steered there
    pings_answered(bed, "n1-p1", "n2-p1")
    pings_answered(bed, "n2-p1", "n1-p1")
    transfer(bed, "n1-p1", "n2-p1", 10 * 1024 * 1024, port=5204)
    transfer(bed, "n2-p1", "n1-p1", 10 * 1024 * 1024, port=5205)
    assert node_status(bed, "n2")["counters"]["tx_packets"] > 0


def test_sigterm_stops_the_workers_too(bed: Testbed) -> None:
    k = bed.add_node()
    main = bed.status()["nodes"][k - 1]["pid"]
    children = worker_pids(bed, f"n{k}")
    assert children and all(running(p) for p in children)
    os.kill(main, signal.SIGTERM)
    assert bed._procs[k].wait(timeout=10) == 0  # the testbed started it: it has the status
    assert not any(running(p) for p in children)  # reaped by the daemon before it exited
    events = [e["event"] for e in log_events(bed, k)]
    assert "stopping" in events and "worker_exited" not in events


def test_killed_daemon_leaves_no_orphan_worker(bed: Testbed) -> None:
    k = bed.add_node()
    main = bed.status()["nodes"][k - 1]["pid"]
    children = worker_pids(bed, f"n{k}")
    assert children
    os.kill(main, signal.SIGKILL)
    bed._procs[k].wait(timeout=10)
    # EOF on the control socket ends each worker; its TUN queue goes with it.
    wait_for(lambda: not any(running(p) for p in children), 5, "the orphaned workers to exit")
    links = bed.exec(f"n{k}", ["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "flannel0" not in links


def test_down_leaves_nothing_behind(bed: Testbed) -> None:
    children = [p for n in ("n1", "n2") for p in worker_pids(bed, n)]
    mains = [n["pid"] for n in bed.status()["nodes"] if n["pid"]]
    removed = bed.down()
    # The daemons took their workers with them: none was left for down's sweep of stray
    # processes in the namespaces.
    assert not {str(p) for p in children} & set(removed["processes"]), removed["processes"]
    assert not any(running(p) and "overlay" in cmdline(p) for p in children + mains)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(rf"\b{bed.prefix}-", netns), netns
    assert not bed.state_dir.exists()


def test_without_bpf_the_workers_run_on_kernel_steering(netns, tmp_path: Path) -> None:
    """No CAP_BPF/CAP_SYS_ADMIN: the steering program cannot load; one warning, and the
    workers still start and stop (the kernel's automq picks the queues)."""
    ns = netns("nobpf")
    drop = ["setpriv", "--bounding-set", "-bpf,-sys_admin", "--inh-caps", "-bpf,-sys_admin"]
    log = tmp_path / "log"
    argv = [
        *["ip", "netns", "exec", ns, *drop, *overlay_cmd("run")],
        *["--registry-file", str(tmp_path / "r.json"), "--network", "198.18.0.0/16"],
        *["--iface", "lo", "--subnet-file", str(tmp_path / "subnet.env")],
        *["--status-socket", str(tmp_path / "s.sock"), "--log-format", "json", *WORKERS],
    ]
    with open(log, "wb") as out:
        daemon = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for((tmp_path / "subnet.env").exists, 20, "subnet.env")
        st = status.query(tmp_path / "s.sock")
        assert st["tun_steering"] == "automq"
        assert [w["alive"] for w in st["workers"]] == [True, True]
        children = [w["pid"] for w in st["workers"][1:]]
    finally:
        daemon.terminate()
        code = daemon.wait(timeout=10)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    warned = [e for e in events if e["event"] == "tun_steering_unavailable"]
    assert len(warned) == 1 and warned[0]["level"] == "warning", events
    assert code == 0 and not any(running(p) for p in children)
