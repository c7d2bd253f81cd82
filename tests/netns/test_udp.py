"""The udp backend end to end on a real 3-node namespace testbed with CNI pods."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.lab.testbed import Testbed
from overlay.lab.transfer import transfer
from tests.helpers.polling import poll
from tests.helpers.segments import snmp, tcp_segment
from tests.helpers.testbed import node_status

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    import uuid

    tb = Testbed("u" + uuid.uuid4().hex[:7], nodes=3, pods_per_node=2, backend="udp")
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def _pod(bed: Testbed, name: str) -> dict:
    return next(p for p in bed.status()["pods"] if p["name"] == name)


def test_status_lists_nodes_and_pods(bed: Testbed) -> None:
    st = bed.status()
    assert [n["name"] for n in st["nodes"]] == ["n1", "n2", "n3"]
    subnets = {n["subnet"] for n in st["nodes"]}
    assert len(subnets) == 3
    assert all(n["pid"] and n["backend"] == "udp" for n in st["nodes"])
    assert len(st["pods"]) == 6
    for pod in st["pods"]:
        node = next(n for n in st["nodes"] if n["name"] == pod["node"])
        assert pod["ip"].startswith(node["subnet"].rsplit(".", 2)[0])


def test_pods_ping_across_nodes(bed: Testbed) -> None:
    a, b = _pod(bed, "n1-p1"), _pod(bed, "n3-p1")
    for src, dst in ((a, b), (b, a)):
        result = bed.exec(
            src["name"],
            ["ping", "-c", "3", "-i", "0.2", "-W", "2", dst["ip"]],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert " 0% packet loss" in result.stdout


def test_100mb_tcp_transfer_is_byte_identical(bed: Testbed) -> None:
    transfer(bed, "n1-p1", "n3-p2", 100 * 1024 * 1024, timeout=240)


def test_unowned_overlay_address_gets_net_unreachable(bed: Testbed) -> None:
    pod = _pod(bed, "n2-p1")
    owned = {n["subnet"] for n in bed.status()["nodes"]}
    target = next(f"198.18.{i}.7" for i in range(250, 0, -1) if f"198.18.{i}.0/24" not in owned)
    before = node_status(bed, "n2")["counters"]["icmp_unreachable_sent"]
    result = bed.exec(
        pod["name"],
        ["ping", "-c", "2", "-i", "0.2", "-W", "1", target],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Destination Net Unreachable" in result.stdout, result.stdout
    assert node_status(bed, "n2")["counters"]["icmp_unreachable_sent"] >= before + 2


def _send_udp(bed: Testbed, where: str, dst: str, payload: bytes, source: str = "") -> None:
    code = (
        "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"s.bind(('{source}',0));s.sendto(bytes.fromhex('{payload.hex()}'),('{dst}',8285))"
    )
    bed.exec(where, [sys.executable, "-c", code], check=True)


def _wait_drop(bed: Testbed, node: str, reason: str, before: int) -> int:
    for _ in range(50):
        now = node_status(bed, node)["counters"]["drops"].get(reason, 0)
        if now > before:
            return now
        time.sleep(0.05)
    return before


def test_bad_datagrams_are_counted_and_forwarding_goes_on(bed: Testbed) -> None:
    from encap.ipv4 import build_header

    nodes = {n["name"]: n for n in bed.status()["nodes"]}
    n1_ip = nodes["n1"]["underlay_ip"]
    n1_net = nodes["n1"]["subnet"].split("/")[0]
    inside_n1 = bytes(int(x) for x in n1_net.split(".")[:3]) + b"\x05"
    drops = node_status(bed, "n1")["counters"]["drops"]

    # From n2 (a known peer) with an inner source outside n2's subnet: spoofed.
    spoofed = build_header(
        src=bytes([198, 18, 254, 9]), dst=inside_n1, protocol=17, payload_length=8
    ) + bytes(8)
    _send_udp(bed, "n2", n1_ip, spoofed)
    assert _wait_drop(bed, "n1", "rx_foreign_source", drops.get("rx_foreign_source", 0)) > 0
    # From an underlay address no lease carries: not a peer at all.
    stranger = "192.0.2.200"
    bed.exec("n2", ["ip", "addr", "add", f"{stranger}/24", "dev", "eth0"], check=True)
    try:
        _send_udp(bed, "n2", n1_ip, spoofed, source=stranger)
    finally:
        bed.exec("n2", ["ip", "addr", "del", f"{stranger}/24", "dev", "eth0"], check=True)
    assert _wait_drop(bed, "n1", "rx_unknown_peer", drops.get("rx_unknown_peer", 0)) > 0
    # Garbage and a truncated header from a real peer.
    _send_udp(bed, "n2", n1_ip, b"\x60" + bytes(39))
    assert _wait_drop(bed, "n1", "rx_not_ipv4", drops.get("rx_not_ipv4", 0)) > 0
    _send_udp(bed, "n2", n1_ip, spoofed[:24])  # header says 28 bytes
    assert _wait_drop(bed, "n1", "rx_bad_length", drops.get("rx_bad_length", 0)) > 0
    # The daemon is still forwarding.
    test_pods_ping_across_nodes(bed)


def test_inner_checksums_from_a_peer_partial_complete_and_corrupt(bed: Testbed) -> None:
    """Whatever a udp peer sends (flanneld's C proxy forwards packets as they are): a
    complete and a partial checksum are delivered (the pod answers each with a RST), a
    corrupt one is counted and never reaches the pod."""
    nodes = {n["name"]: n for n in bed.status()["nodes"]}
    src, dst = bed.pod_ip("n2-p1"), bed.pod_ip("n1-p1")
    pod_before = snmp(bed, "n1-p1")
    drops = node_status(bed, "n1")["counters"]["drops"].get("rx_bad_l4_checksum", 0)
    for kind in ("complete", "partial", "corrupt"):
        _send_udp(bed, "n2", nodes["n1"]["underlay_ip"], tcp_segment(src, dst, kind))
    assert _wait_drop(bed, "n1", "rx_bad_l4_checksum", drops) == drops + 1
    assert poll(lambda: snmp(bed, "n1-p1")["Tcp.OutRsts"] - pod_before["Tcp.OutRsts"] >= 2)
    pod_after = snmp(bed, "n1-p1")
    assert pod_after["Tcp.OutRsts"] - pod_before["Tcp.OutRsts"] == 2
    assert pod_after["Tcp.InCsumErrors"] == pod_before["Tcp.InCsumErrors"]


def test_down_leaves_nothing_behind(bed: Testbed) -> None:
    pids = [n["pid"] for n in bed.status()["nodes"]]
    bed.down()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not re.search(rf"\b{bed.prefix}-", netns), netns
    assert bed.prefix not in links
    assert not bed.state_dir.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "overlay" not in Path(
            f"/proc/{pid}/cmdline"
        ).read_text(errors="replace")
    bed.down()  # idempotent
