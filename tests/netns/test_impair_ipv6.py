"""Impairment of IPv6 on the userspace vxlan datapath (issue 20), on a dual-stack bed of
two nodes with a pod each (tests/helpers/dual_stack.py): delay and loss over IPv6 within
the tolerances of tests/netns/test_impair.py (its docstring says why those), a rule named
by a peer's IPv4 subnet covering its IPv6 traffic, one named by its IPv6 subnet covering
both, the drops counted per family, and `--clear` giving back the round trip."""

from __future__ import annotations

import math
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from control.subnet_env import parse_subnet_env
from overlay.observe import status_socket as status
from tests.helpers.commands import overlay_cmd
from tests.helpers.dual_stack import DUAL, pings, pod, start_nodes
from tests.helpers.polling import poll
from tests.helpers.testbed import ping_rtts

pytestmark = pytest.mark.netns


class Namespaces:
    """What ``ping_rtts`` runs commands through: ``ip netns exec``."""

    def exec(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kwargs)


def median_rtt(pod_ns: str, address: str, count: int = 150) -> float:
    sent, rtts = ping_rtts(Namespaces(), pod_ns, address, count)
    assert len(rtts) >= sent * 0.95, (sent, len(rtts))
    return statistics.median(rtts)


def impaired(daemon: Any, *argv: str) -> None:
    result = subprocess.run(
        overlay_cmd("impair", "--status-socket", str(daemon.socket), *argv),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_delay_and_loss_over_ipv6_within_tolerance_by_either_subnet(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    nodes, started, _ = start_nodes(
        netns, daemons, tmp_path, {**DUAL, "Backend": {"Type": "vxlan"}}
    )
    envs = [parse_subnet_env(d.subnet_file.read_text()) for d in started]
    pods = [netns("p1"), netns("p2")]
    (_, _), (v4, v6) = [pod(node, p, env) for node, p, env in zip(nodes, pods, envs, strict=True)]
    assert poll(lambda: pings(pods[0], v6), timeout=10)
    n1, n2 = started[0], envs[1]
    assert n2.ipv6_subnet is not None
    median_rtt(pods[0], v6, 20)  # warm the path
    base6, base4 = median_rtt(pods[0], v6), median_rtt(pods[0], v4)
    assert base6 < 3 and base4 < 3, (base6, base4)

    # n2 named by its (IPv4) lease subnet: the link to it, IPv6 too
    impaired(n1, "--peer", str(n2.subnet.network), "delay", "20ms")
    added = median_rtt(pods[0], v6) - base6
    assert 19.5 <= added <= 23, added

    # named by its IPv6 subnet, on what n1 receives: both families gain it once a round trip
    impaired(n1, "--clear")
    impaired(n1, "--peer", str(n2.ipv6_subnet.network), "--direction", "in", "delay", "15ms")
    added6, added4 = median_rtt(pods[0], v6) - base6, median_rtt(pods[0], v4) - base4
    assert 14.5 <= added6 <= 18 and 14.5 <= added4 <= 18, (added6, added4)

    impaired(n1, "--clear")
    impaired(n1, "loss", "10%")
    before = status.query(n1.socket)["counters"]
    sent, rtts = ping_rtts(Namespaces(), pods[0], v6, 1000, 0.005)
    lost = sent - len(rtts)
    spread = 4 * math.sqrt(0.1 * 0.9 / sent)
    assert 0.1 - spread <= lost / sent <= 0.1 + spread, (lost, sent)
    after = status.query(n1.socket)["counters"]
    for table in ("drops", "drops6"):  # every lost echo request, and only those, as IPv6's
        counted = after[table].get("tx_impair_loss", 0) - before[table].get("tx_impair_loss", 0)
        assert counted == lost, (table, counted, lost)

    impaired(n1, "--clear")
    again = median_rtt(pods[0], v6)
    assert again <= max(2 * base6, base6 + 0.5), (again, base6)
