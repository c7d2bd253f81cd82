"""What an operator sees of IPv6 (issue 20) on a dual-stack bed of two nodes with a pod
each (tests/helpers/dual_stack.py): `overlay trace` of an IPv6 ping read back by tshark
(inner ICMPv6 at the TUN, VXLAN over the IPv6 underlay), a filter on an IPv6 address that
keeps only that address's packets; `overlay status` and /metrics with both families, on
userspace vxlan (the IPv6 half's counts and drops, the peers' IPv6 halves) and on kernel
vxlan (flannel-v6.1's link statistics beside flannel.1's)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from control.subnet_env import parse_subnet_env
from overlay.observe import status_socket as status
from tests.helpers.commands import overlay_cmd
from tests.helpers.dual_stack import DUAL, in_ns, pings, pod, start_nodes, tcp_transfer
from tests.helpers.observe import metric_samples
from tests.helpers.observe import start_trace as attached_trace
from tests.helpers.polling import poll

pytestmark = pytest.mark.netns


def bed(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> tuple[list[Any], list[tuple[str, str]], list[str], list[str]]:
    """Two userspace vxlan nodes, dual stack: (daemons, pod addresses (v4, v6), pod
    namespaces, the IPv6 gateway address of each node's pods)."""
    nodes, started, _ = start_nodes(
        netns, daemons, tmp_path, {**DUAL, "Backend": {"Type": "vxlan"}}
    )
    envs = [parse_subnet_env(d.subnet_file.read_text()) for d in started]
    pods = [netns("p1"), netns("p2")]
    addresses = [pod(node, p, env) for node, p, env in zip(nodes, pods, envs, strict=True)]
    assert poll(lambda: pings(pods[0], addresses[1][1]), timeout=10)
    gateways = [str(env.ipv6_subnet.ip) for env in envs if env.ipv6_subnet is not None]
    return started, addresses, pods, gateways


def start_trace(daemon: Any, *args: str) -> subprocess.Popen[bytes]:
    return attached_trace(daemon.socket, *args)


def tshark(path: Path, *fields: str) -> list[list[str]]:
    result = subprocess.run(
        ["tshark", "-r", str(path), "-d", "udp.port==8472,vxlan", "-T", "fields"]
        + [arg for f in fields for arg in ("-e", f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines() if line]


def ping6(pod_ns: str, address: str) -> None:
    result = in_ns(pod_ns, "ping", "-6", "-c", "1", "-W", "2", address, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_trace_of_an_ipv6_ping_decodes_in_tshark(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    started, addresses, pods, _ = bed(netns, daemons, tmp_path)
    capture = tmp_path / "ping6.pcapng"
    proc = start_trace(started[0], "-c", "8", "-w", str(capture), "icmp6")
    for _ in range(2):
        ping6(pods[0], addresses[1][1])
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert b"8 packets captured" in err
    fields = ["frame.interface_name", "ipv6.src", "ipv6.dst", "udp.dstport", "icmpv6.type"]
    rows = tshark(capture, *fields)
    pod1, pod2 = addresses[0][1], addresses[1][1]
    inner = [r for r in rows if r[0] != "eth0:udp/8472"]
    outer = [r for r in rows if r[0] == "eth0:udp/8472"]
    assert len(inner) == len(outer) == 4, rows
    assert [r[1:3] for r in inner] == [[pod1, pod2], [pod2, pod1]] * 2
    assert [r[4] for r in inner] == ["128", "129"] * 2  # echo request, echo reply
    # VXLAN over the IPv6 underlay: tshark lists the outer and the inner addresses.
    there = [f"2001:db8::1,{pod1}", f"2001:db8::2,{pod2}"]
    back = [f"2001:db8::2,{pod2}", f"2001:db8::1,{pod1}"]
    assert [r[1:3] for r in outer] == [there, back] * 2
    assert {r[3] for r in outer} == {"8472"} and [r[4] for r in outer] == ["128", "129"] * 2


def test_a_filter_on_an_ipv6_address_keeps_only_its_packets(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    started, addresses, pods, gateways = bed(netns, daemons, tmp_path)
    capture = tmp_path / "host.pcapng"
    pod2 = addresses[1][1]
    proc = start_trace(started[0], "-c", "4", "-w", str(capture), "host", pod2)
    # Traffic to the same node over IPv4 and to another IPv6 address of it comes first:
    # none of it may be kept, or the count of 4 would end the trace before the ping6.
    assert pings(pods[0], addresses[1][0])
    ping6(pods[0], gateways[1])
    ping6(pods[0], pod2)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    rows = tshark(capture, "frame.interface_name", "ipv6.src", "ipv6.dst", "ip.src")
    assert len(rows) == 4, rows
    assert all(pod2 in r[1].split(",") + r[2].split(",") and r[3] == "" for r in rows), rows
    assert sorted(r[0] for r in rows).count("eth0:udp/8472") == 2


def test_a_trace_during_an_ipv6_tcp_transfer_sees_every_segment(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    """A trace attached to node 1 while 4 MB cross over TCP/IPv6 with TSO6 and UDP
    GSO/GRO on: the IPv6 half goes one datagram at a time, the transfer arrives intact,
    the trace holds every datagram node 1 sent (the super-packets' segments) and every
    packet it wrote, and the IPv6 half's counts equal what the trace shows."""
    started, addresses, pods, _ = bed(netns, daemons, tmp_path)
    capture = tmp_path / "tcp6.pcapng"
    before = status.query(started[0].socket)["counters"]
    proc = start_trace(started[0], "-w", str(capture), "ip6")
    try:
        tcp_transfer(pods[0], pods[1], addresses[1][1], megabytes=4)
        time.sleep(1)  # the connection's last packets, before the counts are read
        after = status.query(started[0].socket)["counters"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"missed" not in err, err
    fields = ["frame.interface_name", "ipv6.src", "ipv6.dst", "tcp.len", "frame.comment"]
    rows = tshark(capture, *fields)
    pod1, pod2 = addresses[0][1], addresses[1][1]
    outer = [r for r in rows if r[0] == "eth0:udp/8472"]
    inner = [r for r in rows if r[0] != "eth0:udp/8472" and not r[4]]
    dropped = [r[4] for r in rows if r[4]]  # the first segments, cut before PMTU is known
    sent = [r for r in outer if r[1].startswith("2001:db8::1,")]
    inner_out = [r for r in inner if r[1] == pod1]
    inner_in = [r for r in inner if r[2] == pod1]
    assert after["tx_packets6"] - before["tx_packets6"] == len(sent) == len(inner_out)
    assert after["rx_packets6"] - before["rx_packets6"] == len(inner_in)
    drops6 = {r: n - before["drops6"].get(r, 0) for r, n in after["drops6"].items()}
    assert {r: n for r, n in drops6.items() if n} == (
        {"tx_too_big": len(dropped)} if dropped else {}
    )
    assert set(dropped) <= {"dropped: tx_too_big"}
    # every byte of the transfer, as segments no larger than the MTU allows
    assert sum(int(r[3]) for r in inner_out if r[3]) >= 4 << 20
    assert max(int(r[3]) for r in inner_out if r[3]) <= 1500 - 70 - 40 - 20
    assert all(r[1] == f"2001:db8::1,{pod1}" and r[2] == f"2001:db8::2,{pod2}" for r in sent)


# -- overlay status and /metrics ----------------------------------------------------------


def test_status_and_metrics_show_the_ipv6_half_of_userspace_vxlan(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    started, addresses, pods, _ = bed(netns, daemons, tmp_path)
    before = status.query(started[0].socket)
    for _ in range(3):
        ping6(pods[0], addresses[1][1])
    # inside IPv6Network, owned by no node: dropped (and answered) on the IPv6 half
    in_ns(pods[0], "ping", "-6", "-c", "1", "-W", "1", "fd00:10:0:ff::1", check=False)
    st = status.query(started[0].socket)
    counters, was = st["counters"], before["counters"]
    assert counters["tx_packets6"] >= was["tx_packets6"] + 3
    assert counters["rx_packets6"] >= was["rx_packets6"] + 3
    assert counters["drops6"]["tx_no_route"] >= 1
    (peer,) = st["peers"]
    assert peer["public_ipv6"] == "2001:db8::2"
    assert ip_address(addresses[1][1]) in ip_network(peer["ipv6_subnet"])
    got = metric_samples(st)
    v6 = (("family", "ipv6"),)
    assert got[("overlay_sent_packets_total", v6)] == counters["tx_packets6"]
    assert got[("overlay_sent_packets_total", (("family", "ipv4"),))] == (
        counters["tx_packets"] - counters["tx_packets6"]
    )
    dropped = ("overlay_dropped_packets_total", (("family", "ipv6"), ("reason", "tx_no_route")))
    assert got[dropped] == counters["drops6"]["tx_no_route"]
    table = status_cli(started[0])
    assert "of which IPv6: sent" in table and "via 2001:db8::2" in table


def test_kernel_counters_of_flannel_v6_beside_flannel_1(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    nodes, started, _ = start_nodes(
        netns, daemons, tmp_path, {**DUAL, "Backend": {"Type": "vxlan"}}, "--kernel-vxlan"
    )
    envs = [parse_subnet_env(d.subnet_file.read_text()) for d in started]
    pods = [netns("p1"), netns("p2")]
    addresses = [pod(node, p, env) for node, p, env in zip(nodes, pods, envs, strict=True)]
    assert poll(lambda: pings(pods[0], addresses[1][1]), timeout=10)
    before = status.query(started[0].socket)["kernel_counters6"]
    for _ in range(3):
        ping6(pods[0], addresses[1][1])
    st = status.query(started[0].socket)
    kernel, kernel6 = st["kernel_counters"], st["kernel_counters6"]
    assert (kernel["device"], kernel6["device"]) == ("flannel.1", "flannel-v6.1")
    assert kernel6["tx_packets"] >= before["tx_packets"] + 3
    assert kernel6["rx_packets"] >= before["rx_packets"] + 3
    got = metric_samples(st)
    link = "overlay_kernel_link_transmit_packets_total"
    assert got[(link, (("device", "flannel-v6.1"),))] == kernel6["tx_packets"]
    assert got[("overlay_sent_packets_total", (("family", "ipv6"),))] == kernel6["tx_packets"]
    assert got[("overlay_sent_packets_total", (("family", "ipv4"),))] == kernel["tx_packets"]
    assert "kernel     flannel-v6.1: sent" in status_cli(started[0])


def status_cli(daemon: Any) -> str:
    result = subprocess.run(
        overlay_cmd("status", "--status-socket", str(daemon.socket)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
