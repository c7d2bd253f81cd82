"""Following the underlay's MTU (issue 18, item 3) on real namespace testbeds: a node's
eth0 (a veth) lowered from 1500 to 1400 and raised back with real netlink (`ip link
set`), on the udp backend, the userspace vxlan datapath and the kernel's flannel.1.
Within a few seconds the overlay device has the MTU the backend needs, subnet.env says
so, the change is logged once and counted (`overlay status`, /metrics), and a pod's DF
packet between the new and the old limit is answered with frag-needed instead of lost
in silence; raised, a packet that size crosses again. A TCP stream through the node
goes on, byte for byte, while its underlay's MTU goes down and up."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any

import pytest

from control.subnet_env import parse_subnet_env
from overlay.lab.testbed import Testbed
from tests.helpers.commands import PYTHON
from tests.helpers.paths import ROOT
from tests.helpers.polling import poll
from tests.helpers.testbed import HEALTH_PORT, node_status, scrape, two_nodes

pytestmark = pytest.mark.netns

FOLLOW_WITHIN = 3.0  # seconds from `ip link set eth0 mtu` to the device's new MTU
LOWERED = 1400
DF_PING = 1400  # ICMP payload: a 1428-byte packet, between the new and the old MTU
STREAM = str(ROOT / "tests" / "helpers" / "stream.py")
SECONDS, RATE = 6.0, 16 * 1024 * 1024  # a paced stream, running while the MTU changes


def _bed(name: str, **kwargs: Any) -> Iterator[Testbed]:
    yield from two_nodes(
        name, pods_per_node=1, daemon_args=("--healthz-port", str(HEALTH_PORT)), **kwargs
    )


@pytest.fixture(scope="module")
def udp() -> Iterator[Testbed]:
    yield from _bed("mu", backend="udp")


@pytest.fixture(scope="module")
def vxlan() -> Iterator[Testbed]:
    """n1 forwards in userspace (flannel0), n2 in the kernel (flannel.1)."""
    yield from _bed("mv", backend="vxlan", kernel_nodes=(2,))


def sh(bed: Testbed, name: str, command: str) -> str:
    result = bed.exec(name, ["sh", "-c", command], capture_output=True, text=True)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def link_mtu(bed: Testbed, node: str, dev: str) -> int:
    return int(json.loads(sh(bed, node, f"ip -j link show {dev}"))[0]["mtu"])


def env_mtu(bed: Testbed, i: int) -> int:
    return parse_subnet_env(bed.subnet_file(i).read_text()).mtu


def mtu_events(bed: Testbed, i: int) -> list[dict[str, Any]]:
    lines = bed.log_file(i).read_text(errors="replace").splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in events if e.get("event") == "underlay_mtu_changed"]


def set_underlay_mtu(bed: Testbed, i: int, dev: str, mtu: int, expected: int) -> float:
    """`ip link set eth0 mtu` in node i; the seconds until ``dev`` has ``expected``."""
    started = time.monotonic()
    sh(bed, f"n{i}", f"ip link set eth0 mtu {mtu}")
    followed = poll(lambda: link_mtu(bed, f"n{i}", dev) == expected, 10.0, every=0.02)
    elapsed = time.monotonic() - started
    assert followed, (
        f"eth0 set to {mtu}: {dev} still has MTU {link_mtu(bed, f'n{i}', dev)} after "
        f"{elapsed:.1f} s, not {expected}; subnet.env says {env_mtu(bed, i)}"
    )
    return elapsed


def df_ping(bed: Testbed, source: str, target: str, size: int) -> str:
    """One ping with DF (-M do) of ``size`` bytes of payload: what ping printed."""
    argv = ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(size), target]
    result = bed.exec(source, argv, capture_output=True, text=True)
    return result.stdout + result.stderr


def gateway_of(bed: Testbed, i: int) -> str:
    """Node i's address on its pods' bridge (the first of its lease)."""
    subnet = next(n["subnet"] for n in bed.status()["nodes"] if n["name"] == f"n{i}")
    return str(IPv4Network(subnet).network_address + 1)


@pytest.mark.parametrize(
    ("backend", "i", "dev", "overhead"),
    [("udp", 1, "flannel0", 28), ("vxlan", 1, "flannel0", 50), ("vxlan", 2, "flannel.1", 50)],
    ids=["udp", "userspace-vxlan", "kernel-vxlan"],
)
def test_the_overlay_follows_its_underlays_mtu(
    request: pytest.FixtureRequest, backend: str, i: int, dev: str, overhead: int
) -> None:
    bed: Testbed = request.getfixturevalue(backend)
    other = 3 - i
    before, lowered = 1500 - overhead, LOWERED - overhead
    pod, far_pod = f"n{i}-p1", bed.pod_ip(f"n{other}-p1")
    assert (link_mtu(bed, f"n{i}", dev), env_mtu(bed, i)) == (before, before)
    try:
        took_down = set_underlay_mtu(bed, i, dev, LOWERED, lowered)
        assert took_down < FOLLOW_WITHIN, f"{dev} followed eth0 after {took_down:.2f} s"
        assert poll(lambda: env_mtu(bed, i) == lowered, 2.0), "FLANNEL_MTU was not rewritten"
        st = node_status(bed, i)
        assert (st["mtu"], st["underlay_mtu"], st["mtu_changes"]) == (lowered, LOWERED, 1)
        metrics = scrape(bed, f"n{i}")
        assert metrics["overlay_mtu"][()] == lowered
        assert metrics["overlay_underlay_mtu"][()] == LOWERED
        assert metrics["overlay_underlay_mtu_changes_total"][()] == 1
        [event] = mtu_events(bed, i)
        assert (event["underlay_mtu"], event["underlay_mtu_was"]) == (LOWERED, 1500)
        assert (event["mtu"], event["mtu_was"], event["iface"]) == (lowered, before, "eth0")
        # A pod's DF packet of 1428 bytes (it still has MTU `before`) is answered with
        # frag-needed and the new MTU, where it was lost without a word...
        answer = df_ping(bed, pod, far_pod, DF_PING)
        assert f"Frag needed and DF set (mtu = {lowered})" in answer, answer
        # ...and the largest packet that fits still crosses, both ways.
        answer = df_ping(bed, pod, far_pod, lowered - 28)
        assert " 0% packet loss" in answer, answer

        took_up = set_underlay_mtu(bed, i, dev, 1500, before)
        assert took_up < FOLLOW_WITHIN, f"{dev} followed eth0 back after {took_up:.2f} s"
        assert poll(lambda: env_mtu(bed, i) == before, 2.0), "FLANNEL_MTU was not rewritten"
        assert node_status(bed, i)["mtu_changes"] == 2
        assert [(e["underlay_mtu"], e["mtu"]) for e in mtu_events(bed, i)] == [
            (LOWERED, lowered),
            (1500, before),
        ]
        # The pod remembers the lowered path MTU to far_pod for 10 minutes; to an address
        # of the other node it never sent to, 1428 bytes with DF cross again.
        answer = df_ping(bed, pod, gateway_of(bed, other), DF_PING)
        assert " 0% packet loss" in answer, answer
        print(f"{backend} n{i} {dev}: followed in {took_down:.2f} s down, {took_up:.2f} s up")
    finally:
        sh(bed, f"n{i}", "ip link set eth0 mtu 1500")


def test_a_tcp_stream_goes_on_while_the_mtu_changes(udp: Testbed) -> None:
    """A paced stream (tests/helpers/stream.py, 6 s at 16 MB/s) from n1's pod to n2's
    while n1's eth0 goes to 1400 and back, twice: every byte arrives in order (count and
    sha256), the longest pause stays short, and nothing but tx_too_big (a packet queued
    at the old MTU) is dropped."""
    address, port = udp.pod_ip("n2-p1"), 7300
    changes = node_status(udp, 1)["mtu_changes"]
    server = udp.popen("n2-p1", [PYTHON, STREAM, "server", address, str(port)],
                       stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = udp.popen(
            "n1-p1",
            [PYTHON, STREAM, "client", address, str(port), str(SECONDS), str(RATE)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for mtu in (LOWERED, 1500, LOWERED, 1500):
            time.sleep(1.0)
            assert client.poll() is None, "the stream ended before the MTU changed"
            sh(udp, "n1", f"ip link set eth0 mtu {mtu}")
        out, _ = client.communicate(timeout=SECONDS + 60)
        assert client.returncode == 0, out
        sent, received = out.split(), server.stdout.readline().split()
        assert received[:2] == sent, f"sent {sent}, received {received}"
    finally:
        sh(udp, "n1", "ip link set eth0 mtu 1500")
        server.kill()
        server.wait()
    gap = float(received[2])
    st = node_status(udp, 1)
    drops = st["counters"]["drops"]
    print(
        f"udp stream under 4 MTU changes: {int(sent[0]) / 1e6:.0f} MB intact, longest pause "
        f"{gap:.2f} s, drops {drops}, frag-needed sent {st['counters']['icmp_frag_needed_sent']}"
    )
    assert gap < 3.0, "the stream stalled"
    assert st["mtu_changes"] == changes + 4
    assert set(drops) <= {"tx_too_big"}, drops
    assert poll(lambda: link_mtu(udp, "n1", "flannel0") == 1472, FOLLOW_WITHIN)
