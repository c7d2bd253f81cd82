"""Seeing inside a running overlay (issue 11) on a real 3-node udp testbed with etcd:
/healthz, /readyz and /metrics as an operator's prober and Prometheus see them, `overlay
status` as a person reads it, `overlay trace` decoded by tshark, and drops in the log."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from encap.ipv4 import build_header
from overlay.lab.testbed import Testbed
from overlay.node.view import METRICS_MIN_AGE
from tests.helpers.commands import PYTHON, overlay_cmd
from tests.helpers.observe import start_trace as attached_trace
from tests.helpers.polling import poll
from tests.helpers.testbed import HEALTH_PORT, node_status, scrape
from tests.helpers.testbed import HTTP_GET as GET
from tests.helpers.testbed import health_get as get

pytestmark = pytest.mark.netns

REGISTRY_TIMEOUT = 6  # the readiness grace for an unreachable registry, in seconds


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    tb = Testbed(
        "o" + uuid.uuid4().hex[:7],
        nodes=3,
        pods_per_node=1,
        backend="udp",
        daemon_args=(
            "--healthz-port",
            str(HEALTH_PORT),
            "--registry-timeout",
            str(REGISTRY_TIMEOUT),
        ),
    )
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def ping(bed: Testbed, src: str, dst: str, count: int = 3) -> None:
    result = bed.exec(
        src,
        ["ping", "-c", str(count), "-i", "0.2", "-W", "2", bed.pod_ip(dst)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def subnet(bed: Testbed, node: str) -> str:
    return str(next(n for n in bed.status()["nodes"] if n["name"] == node)["subnet"])


def status_cli(bed: Testbed, node: str, *flags: str) -> subprocess.CompletedProcess[str]:
    sock = str(bed.node_dir(int(node[1:])) / "status.sock")
    return subprocess.run(
        overlay_cmd("status", "--status-socket", sock, *flags),
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- health --------------------------------------------------------------------------------


def test_healthz_and_readyz_answer_once_up(bed: Testbed) -> None:
    for node in ("n1", "n2", "n3"):
        assert get(bed, node, "/healthz") == (200, "overlay is running\n")
        assert get(bed, node, "/readyz") == (200, "ready\n")
    code, body = get(bed, "n1", "/nothing")
    assert code == 404 and "/metrics" in body


def test_metrics_parse_and_peer_counters_move_with_traffic(bed: Testbed) -> None:
    n2, n3 = subnet(bed, "n2"), subnet(bed, "n3")
    before = scrape(bed, "n1")
    ping(bed, "n1-p1", "n2-p1", count=5)
    after = scrape(bed, "n1")

    def peer(samples: dict[str, Any], name: str, net: str) -> float:
        return float(samples[name].get((("peer", net),), 0.0))

    for name in ("overlay_peer_sent_packets_total", "overlay_peer_received_packets_total"):
        assert peer(after, name, n2) >= peer(before, name, n2) + 5, name
        assert peer(after, name, n3) == peer(before, name, n3), name  # no traffic to n3
    sent_bytes = peer(after, "overlay_peer_sent_bytes_total", n2)
    assert sent_bytes - peer(before, "overlay_peer_sent_bytes_total", n2) >= 5 * 84
    last = after["overlay_peer_last_received_timestamp_seconds"][(("peer", n2),)]
    assert abs(time.time() - last) < 30
    # The node totals, the batch histograms, and the lease, registry and build facts.
    v4 = (("family", "ipv4"),)
    assert after["overlay_sent_packets_total"][v4] >= before["overlay_sent_packets_total"][v4] + 5
    sends = after["overlay_send_batch_datagrams_count"][()]
    assert sends > before["overlay_send_batch_datagrams_count"][()]
    assert after["overlay_send_batch_datagrams_bucket"][(("le", "+Inf"),)] == sends
    assert after["overlay_lease_expiry_timestamp_seconds"][()] > time.time() + 23 * 3600
    assert after["overlay_registry_connected"][()] == 1
    assert after["overlay_registry_resyncs_total"][()] >= 1
    assert after["overlay_peers"][()] == 2
    (labels,) = after["overlay_build_info"]
    assert dict(labels)["codecs"] in ("pure", "native") and dict(labels)["version"]
    features = {dict(k)["feature"]: v for k, v in after["overlay_feature_enabled"].items()}
    assert features == {k: float(v) for k, v in node_status(bed, "n1")["features"].items()}


def test_every_drop_reason_is_a_metric(bed: Testbed) -> None:
    """Whatever reasons the dataplane counted, /metrics has each one with its count."""
    n1_ip = str(bed.node_ip(1))
    send(bed, "n2", n1_ip, b"\x60" + bytes(39))  # not IPv4
    send(bed, "n2", n1_ip, b"")  # empty
    bed.exec("n1-p1", ["ping", "-c", "1", "-W", "1", "198.18.255.7"], capture_output=True)
    want = poll(lambda: len(node_status(bed, "n1")["counters"]["drops"]) >= 2, 5)
    assert want
    drops = node_status(bed, "n1")["counters"]["drops"]

    def exported() -> dict[str, float]:
        families = scrape(bed, "n1")
        return {
            dict(labels)["reason"]: value
            for labels, value in families.get("overlay_dropped_packets_total", {}).items()
        }

    # /metrics may show a page made up to METRICS_MIN_AGE before the drops were counted
    got = poll(lambda: (e := exported()).keys() == drops.keys() and e, 2 * METRICS_MIN_AGE + 1)
    assert got and set(got) == set(drops), (got, drops)
    assert all(got[r] >= n for r, n in drops.items())


# -- overlay status -----------------------------------------------------------------------


def test_status_table_lists_every_peer_with_last_heard(bed: Testbed) -> None:
    ping(bed, "n1-p1", "n2-p1", count=2)
    ping(bed, "n1-p1", "n3-p1", count=2)
    result = status_cli(bed, "n1")
    assert result.returncode == 0, result.stderr
    table = result.stdout
    lines = table.splitlines()
    assert lines[0].startswith(f"node {bed.node_ip(1)} (eth0), udp") and "ready" in lines[0]
    assert f"lease      {subnet(bed, 'n1')}" in table
    assert re.search(r"expires \d{4}-\d\d-\d\d .* next renewal", table), table
    assert re.search(r"registry   etcd http://\S+: connected; watch revision \d+", table), table
    for node in ("n2", "n3"):
        row = next((line for line in lines if line.startswith(subnet(bed, node))), None)
        assert row is not None, table
        assert str(bed.node_ip(int(node[1:]))) in row
        assert len(re.findall(r"\d+(?:\.\d)?s ago", row)) == 2, row  # last sent, last heard
    as_json = json.loads(status_cli(bed, "n1", "--json").stdout)
    assert {p["subnet"] for p in as_json["peers"]} == {subnet(bed, "n2"), subnet(bed, "n3")}
    assert all(p["last_rx_s"] is not None for p in as_json["peers"])
    # The same for one testbed node.
    via_testbed = subprocess.run(
        overlay_cmd("testbed", "status", "--prefix", bed.prefix, "--node", "n1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert via_testbed.returncode == 0, via_testbed.stderr
    assert subnet(bed, "n2") in via_testbed.stdout and "LAST HEARD" in via_testbed.stdout
    bad = subprocess.run(
        overlay_cmd("testbed", "status", "--prefix", bed.prefix, "--node", "n9"),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "is not a node of testbed" in bad.stderr


def test_status_watch_refreshes_with_rates(bed: Testbed) -> None:
    sock = str(bed.node_dir(1) / "status.sock")
    watcher = subprocess.Popen(
        overlay_cmd("status", "--status-socket", sock, "--watch", "0.3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ping(bed, "n1-p1", "n2-p1", count=4)
        time.sleep(1.5)
    finally:
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=10)
    assert watcher.returncode == 0, err
    tables = out.count("LAST HEARD")
    assert tables >= 3, out
    assert "OUT/S" in out and re.search(r"\d+ B/s", out)


def test_one_way_block_shows_in_last_heard(bed: Testbed) -> None:
    """n3 drops everything n1 sends it: n1 keeps sending to n3 but hears nothing back,
    while n2 keeps answering."""
    rule = ["INPUT", "-s", str(bed.node_ip(1)), "-p", "udp", "--dport", "8285", "-j", "DROP"]
    bed.exec("n3", ["iptables", "-I", *rule], check=True)
    pingers = []
    try:
        for dst in ("n2-p1", "n3-p1"):
            argv = ["ping", "-i", "0.2", "-w", "4", bed.pod_ip(dst)]
            pingers.append(bed.popen("n1-p1", argv, stdout=subprocess.DEVNULL))
        time.sleep(3.5)
        peers = {p["subnet"]: p for p in node_status(bed, "n1")["peers"]}
    finally:
        for proc in pingers:
            proc.kill()
            proc.wait()
        bed.exec("n3", ["iptables", "-D", *rule], check=True)
    blocked, open_ = peers[subnet(bed, "n3")], peers[subnet(bed, "n2")]
    assert blocked["last_tx_s"] < 1.0, blocked  # we keep sending to n3 ...
    assert blocked["last_rx_s"] is None or blocked["last_rx_s"] > 2.5, blocked  # ... unheard
    assert open_["last_tx_s"] < 1.0 and open_["last_rx_s"] < 1.0, open_
    table = status_cli(bed, "n1").stdout
    assert subnet(bed, "n3") in table


# -- overlay trace ---------------------------------------------------------------------------


def send(bed: Testbed, where: str, dst: str, payload: bytes) -> None:
    code = (
        "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"s.sendto(bytes.fromhex('{payload.hex()}'),('{dst}',8285))"
    )
    bed.exec(where, [sys.executable, "-c", code], check=True)


def start_trace(bed: Testbed, node: str, *args: str) -> subprocess.Popen[bytes]:
    return attached_trace(bed.node_dir(int(node[1:])) / "status.sock", *args)


def tshark(path: Path, *args: str) -> list[list[str]]:
    result = subprocess.run(
        ["tshark", "-r", str(path), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.strip().splitlines() if line]


def test_trace_of_a_ping_decodes_in_tshark(bed: Testbed, tmp_path: Path) -> None:
    capture = tmp_path / "ping.pcapng"
    proc = start_trace(bed, "n1", "-c", "8", "-w", str(capture), "icmp")
    ping(bed, "n1-p1", "n2-p1", count=2)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert b"8 packets captured" in err
    assert capture.stat().st_mode & 0o777 == 0o600
    fields = ["frame.interface_name", "ip.src", "ip.dst", "udp.dstport", "icmp.type"]
    rows = tshark(
        capture,
        "-d",
        "udp.port==8285,ip",
        "-T",
        "fields",
        *[arg for f in fields for arg in ("-e", f)],
    )
    pod1, pod2 = bed.pod_ip("n1-p1"), bed.pod_ip("n2-p1")
    n1, n2 = str(bed.node_ip(1)), str(bed.node_ip(2))
    inner = [r for r in rows if r[0] == "flannel0"]
    outer = [r for r in rows if r[0] == "eth0:udp/8285"]
    assert len(inner) == len(outer) == 4, rows
    assert [r[1:3] for r in inner] == [[pod1, pod2], [pod2, pod1]] * 2
    assert [r[4] for r in inner] == ["8", "0"] * 2  # echo request, echo reply
    # The ICMP inside the UDP datagram: outer and inner addresses, tshark lists both.
    assert [r[1:3] for r in outer] == [[f"{n1},{pod1}", f"{n2},{pod2}"]] + [
        [f"{n2},{pod2}", f"{n1},{pod1}"]
    ] + [[f"{n1},{pod1}", f"{n2},{pod2}"], [f"{n2},{pod2}", f"{n1},{pod1}"]]
    assert {r[3] for r in outer} == {"8285"} and [r[4] for r in outer] == ["8", "0"] * 2


def test_trace_to_stdout_pipes_into_tshark(bed: Testbed) -> None:
    sock = str(bed.node_dir(1) / "status.sock")
    trace = subprocess.Popen(
        overlay_cmd("trace", "--status-socket", sock, "-c", "2", "-w", "-", "inner and icmp"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reader = subprocess.Popen(
        ["tshark", "-r", "-", "-T", "fields", "-e", "icmp.type"],
        stdin=trace.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert trace.stdout is not None and trace.stderr is not None
    trace.stdout.close()
    assert b"capturing on" in trace.stderr.readline()  # attached: nothing is missed now
    ping(bed, "n1-p1", "n3-p1", count=1)
    out, _ = reader.communicate(timeout=20)
    assert trace.wait(timeout=10) == 0
    assert out.split() == ["8", "0"]


def test_dropped_spoofed_datagram_is_in_the_trace_with_its_reason(
    bed: Testbed, tmp_path: Path
) -> None:
    capture = tmp_path / "drop.pcapng"
    n1_net = subnet(bed, "n1").split("/")[0]
    inside_n1 = bytes(int(x) for x in n1_net.split(".")[:3]) + b"\x05"
    spoofed = build_header(
        src=bytes([198, 18, 254, 9]), dst=inside_n1, protocol=17, payload_length=8
    ) + bytes(8)
    proc = start_trace(
        bed, "n1", "-c", "1", "-w", str(capture), "drop", "and", "peer", str(bed.node_ip(2))
    )
    send(bed, "n2", str(bed.node_ip(1)), spoofed)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    fields = ["frame.comment", "frame.interface_name", "ip.src", "ip.dst", "udp.srcport"]
    rows = tshark(
        capture, "-d", "udp.port==8285,ip", "-T", "fields", *[a for f in fields for a in ("-e", f)]
    )
    assert len(rows) == 1, rows
    comment, interface, sources, destinations, _ = rows[0]
    assert comment == "dropped: rx_foreign_source"
    assert interface == "eth0:udp/8285"
    assert sources == f"{bed.node_ip(2)},198.18.254.9"
    assert destinations.startswith(f"{bed.node_ip(1)},")


def test_bad_trace_requests_are_one_line(bed: Testbed) -> None:
    sock = str(bed.node_dir(1) / "status.sock")
    for words, expected, code in (
        (["peer", "n2"], "'n2' is not an IPv4 or IPv6 address", 2),
        (["-c", "0"], "is not a packet count", 2),
    ):
        result = subprocess.run(
            overlay_cmd("trace", "--status-socket", sock, *words), capture_output=True, text=True
        )
        assert result.returncode == code and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    missing = subprocess.run(
        overlay_cmd("trace", "--status-socket", str(bed.state_dir / "nope.sock")),
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "no daemon answers on" in missing.stderr


def test_first_drop_of_a_reason_is_logged_once_with_a_summary(bed: Testbed) -> None:
    """n3 has dropped nothing for this reason yet: two datagrams with a bad length, and
    the log says so once, describing one of them (never its payload)."""
    n3_net = subnet(bed, "n3").split("/")[0]
    inside = bytes(int(x) for x in n3_net.split(".")[:3]) + b"\x09"
    src = bytes(int(x) for x in subnet(bed, "n2").split("/")[0].split(".")[:3]) + b"\x09"
    bad_length = build_header(src=src, dst=inside, protocol=17, payload_length=40)
    marker = b"SECRET-PAYLOAD"
    for _ in range(3):
        send(bed, "n2", str(bed.node_ip(3)), bad_length + marker)  # header says 60 bytes
        time.sleep(0.3)

    def logged() -> list[dict[str, Any]]:
        return [
            e
            for e in events(bed, 3)
            if e.get("event") == "packet_dropped" and e.get("reason") == "rx_bad_length"
        ]

    lines = poll(logged, 8)
    time.sleep(1.5)
    assert len(logged()) == 1, lines
    line = lines[0]
    assert line["level"] == "warning" and line["first"] is True
    assert line["peer"].startswith(f"{bed.node_ip(2)}:")
    assert line["packet"].startswith("IP ") and "UDP" in line["packet"]
    assert line["length"] == 20 + len(marker)
    assert marker.decode() not in bed.log_file(3).read_text()


def events(bed: Testbed, i: int) -> list[dict[str, Any]]:
    out = []
    for line in bed.log_file(i).read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_icmp_unreachable_comes_from_the_nodes_tun_address(bed: Testbed) -> None:
    owned = {n["subnet"] for n in bed.status()["nodes"]}
    target = next(f"198.18.{i}.7" for i in range(250, 0, -1) if f"198.18.{i}.0/24" not in owned)
    result = bed.exec(
        "n2-p1", ["ping", "-c", "1", "-W", "1", target], capture_output=True, text=True
    )
    tun_address = subnet(bed, "n2").split("/")[0]
    assert f"From {tun_address} icmp_seq=1 Destination Net Unreachable" in result.stdout, (
        result.stdout
    )


# -- readiness follows the registry --------------------------------------------------------


def test_readyz_is_503_while_starting_and_while_the_registry_is_gone(bed: Testbed) -> None:
    # Start: n3's daemon restarted while etcd is down answers /healthz at once, and
    # /readyz only once it holds its lease again.
    bed.etcd.stop()
    try:
        bed._procs[3].terminate()
        bed._procs[3].wait(timeout=10)
        bed.start_daemon(3)
        assert poll(lambda: healthz(bed, "n3") == 200, 10)
        code, body = get(bed, "n3", "/readyz")
        assert code == 503 and "waiting for a lease" in body, body
        st = node_status(bed, "n3")
        assert st["state"] == "starting" and st["registry"]["state"] != "connected"
    finally:
        bed.etcd.start()
    assert poll(lambda: get(bed, "n3", "/readyz")[0] == 200, 15)

    # Running: n1 stays ready through a short outage, not through a long one.
    bed.etcd.stop()
    try:
        assert poll(lambda: node_status(bed, "n1")["registry"]["state"] == "unreachable", 15)
        assert get(bed, "n1", "/readyz")[0] == 200  # within the grace
        assert scrape(bed, "n1")["overlay_registry_connected"][()] == 0
        assert poll(lambda: get(bed, "n1", "/readyz")[0] == 503, REGISTRY_TIMEOUT + 10)
        code, body = get(bed, "n1", "/readyz")
        assert code == 503 and "registry unreachable for" in body
        assert get(bed, "n1", "/healthz")[0] == 200  # alive all along
        ping(bed, "n1-p1", "n2-p1", count=1)  # and forwarding with the peers it knows
    finally:
        bed.etcd.start()
    assert poll(lambda: get(bed, "n1", "/readyz")[0] == 200, 15)
    assert node_status(bed, "n1")["registry"]["state"] == "connected"


def healthz(bed: Testbed, node: str) -> int:
    url = f"http://127.0.0.1:{HEALTH_PORT}/healthz"
    result = bed.exec(node, [PYTHON, "-c", GET, url], capture_output=True, text=True, timeout=20)
    return int(result.stdout.split("\n", 1)[0]) if result.returncode == 0 else 0
