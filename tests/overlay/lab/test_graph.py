"""The bed as a picture (overlay.lab.graph): rates from two status snapshots, Mermaid
text, and DOT that Graphviz draws."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

from overlay.lab.graph import dot, flows, mermaid, rate

BED: dict[str, Any] = {
    "prefix": "two",
    "network": "198.18.0.0/16",
    "backend": "vxlan",
    "registry": "etcd",
    "etcd_endpoints": ["http://192.0.2.62:2379"],
    "router": "two-rt",
    "segments": [
        {"name": "a", "cidr": "192.0.2.0/26", "bridge": "br0"},
        {"name": "b", "cidr": "192.0.2.64/26", "bridge": "br1"},
    ],
    "nodes": [
        {
            "name": "n1",
            "segment": "a",
            "underlay_ip": "192.0.2.2",
            "subnet": "198.18.1.0/24",
            "backend": "vxlan-user",
            "running": True,
            "impair": None,
        },
        {
            "name": "n2",
            "segment": "b",
            "underlay_ip": "192.0.2.66",
            "subnet": "198.18.2.0/24",
            "backend": "vxlan-kernel",
            "running": False,
            "impair": None,
        },
    ],
}


def peer(subnet: str, packets: int, octets: int) -> dict[str, Any]:
    return {"subnet": subnet, "tx_packets": packets, "tx_bytes": octets}


def test_rates_come_from_the_difference_of_two_snapshots() -> None:
    before = {"n1": {"peers": [peer("198.18.2.0/24", 100, 10_000), peer("198.18.9.0/24", 1, 1)]}}
    after = {"n1": {"peers": [peer("198.18.2.0/24", 300, 260_000), peer("198.18.9.0/24", 5, 9)]}}
    (flow,) = flows(BED, before, after, 2.0)  # 198.18.9.0/24 is no node of the bed
    assert (flow.source, flow.target) == ("n1", "n2")
    assert flow.bits_per_s == 1_000_000 and flow.packets_per_s == 100
    assert flows(BED, after, after, 2.0) == []  # nothing sent, no arrow
    # Each node's own interval, when the snapshots say when they were taken.
    timed = flows(
        BED,
        {"n1": {**before["n1"], "sampled_at": 10.0}},
        {"n1": {**after["n1"], "sampled_at": 14.0}},
        2.0,
    )
    assert timed[0].packets_per_s == 50
    assert rate(1_000_000) == "1.0 Mbit/s" and rate(12) == "12 bit/s"


def test_mermaid_has_segments_router_etcd_and_the_arrows() -> None:
    before = {"n1": {"peers": [peer("198.18.2.0/24", 0, 0)]}}
    after = {"n1": {"peers": [peer("198.18.2.0/24", 10, 12_500)]}}
    text = mermaid(BED, flows(BED, before, after, 1.0))
    assert text.startswith("flowchart LR\n")
    assert 'subgraph seg_a["segment a 192.0.2.0/26"]' in text
    assert (
        'n2["n2<br/>192.0.2.66<br/>198.18.2.0/24<br/>vxlan-kernel<br/>daemon not running"]' in text
    )
    assert "router --- seg_b" in text and 'etcd[("etcd x1' in text
    assert 'n1 -- "100.0 kbit/s, 10 pkt/s" --> n2' in text


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz (`make setup`)")
def test_graphviz_draws_the_dot_as_svg() -> None:
    after = {"n1": {"peers": [peer("198.18.2.0/24", 10, 12_500)]}}
    before = {"n1": {"peers": [peer("198.18.2.0/24", 0, 0)]}}
    drawn = subprocess.run(
        ["dot", "-Tsvg"],
        input=dot(BED, flows(BED, before, after, 1.0)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "<svg" in drawn.stdout and "segment b 192.0.2.64/26" in drawn.stdout
    assert "100.0 kbit/s" in drawn.stdout and "two&#45;rt" in drawn.stdout
