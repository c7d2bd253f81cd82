"""What an operator sees of IPv6 (issue 20) on a dual-stack userspace vxlan bed of two
nodes with a pod each (tests/helpers/dual_stack.py): `overlay trace` of an IPv6 ping read
back by tshark (inner ICMPv6 at the TUN, VXLAN over the IPv6 underlay), and a filter on
an IPv6 address that keeps only that address's packets."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from control.subnet_env import parse_subnet_env
from tests.helpers.commands import overlay_cmd
from tests.helpers.dual_stack import DUAL, in_ns, pings, pod, start_nodes
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
    proc = subprocess.Popen(
        overlay_cmd("trace", "--status-socket", str(daemon.socket), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    assert "capturing on" in line, line
    return proc


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
