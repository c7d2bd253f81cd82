"""Topology files: the examples load, the plan says what would be made, and a bad file
fails in one line naming its key (from the API and from `overlay testbed up -f`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay.lab.impairment import NetemError, check_netem
from overlay.lab.plan import describe, make_plan
from overlay.lab.topology import TopologyError, load_topology
from tests.helpers.paths import ROOT
from tests.helpers.testbed import testbed_cli as cli

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

TWO_SEGMENTS = """
name: two
backend: vxlan
registry: {type: etcd, members: 3, segment: a}
segments:
  - {name: a, cidr: 192.0.2.0/26}
  - {name: b, cidr: 192.0.2.64/26}
nodes:
  - {segment: a, count: 2}
  - {segment: b, backend: kernel-vxlan, pods: 2}
"""


def test_every_example_loads_and_plans() -> None:
    assert EXAMPLES, "no examples/*.yaml"
    for path in EXAMPLES:
        topology = load_topology(path.read_text(), path.name)
        plan = make_plan(topology, topology.name or "ex")
        assert len(plan.nodes) == len(topology.nodes) >= 2


def test_two_segments_plan_addresses_router_and_routes() -> None:
    topology = load_topology(TWO_SEGMENTS, "bed.yaml")
    plan = make_plan(topology, "two")
    assert [str(n.address) for n in plan.nodes] == ["192.0.2.2", "192.0.2.3", "192.0.2.66"]
    assert [n.spec.backend for n in plan.nodes] == ["vxlan", "vxlan", "kernel-vxlan"]
    assert [str(leg.address) for leg in plan.legs] == ["192.0.2.1", "192.0.2.65"]
    assert [(str(c), str(v)) for c, v in plan.node(3).routes] == [("192.0.2.0/26", "192.0.2.65")]
    # etcd's members sit at the top of segment a, with a route back to segment b.
    assert [(str(c), str(v)) for c, v in plan.etcd_routes()] == [("192.0.2.64/26", "192.0.2.1")]
    text = describe(plan, ["http://192.0.2.62:2379"])
    assert "two-rt eth1" in text and "on b: 192.0.2.0/26 via 192.0.2.65" in text
    assert "n3     two-n3         b          192.0.2.66/26      kernel-vxlan  2" in text


BAD_FILES = [
    ("", "bed.yaml: the file is empty"),
    ("nodes: [", "bed.yaml: line 1, column 9"),
    ("nodes: [{}]\ncolour: red", "bed.yaml: colour: unknown key"),
    ("nodes: [{backend: vxlanx}]", "bed.yaml: nodes[0].backend: 'vxlanx' is not one of udp"),
    ("nodes: [{pods: -1}]", "bed.yaml: nodes[0].pods: -1 is out of range (0 to 64)"),
    ("nodes: [{count: many}]", "bed.yaml: nodes[0].count: 'many' is not a whole number"),
    ("nodes: [{}, {backend: host-gw}]", "bed.yaml: nodes[1].backend: 'host-gw' cannot share"),
    ("nodes: [{}]\nunderlay: 192.0.2.0/30", "bed.yaml: underlay: 192.0.2.0/30 is too small"),
    ("nodes: [{}]\nnetwork: 192.0.2.0/24", "bed.yaml: network: 192.0.2.0/24 overlaps"),
    ("nodes: [{}]\nregistry: consul", "bed.yaml: registry: 'consul' is not one of etcd, file"),
    ("nodes: [{}]\nregistry: {members: 9}", "bed.yaml: registry.members: 9 is out of range"),
    ("nodes: [{count: 300}]", "bed.yaml: underlay: 192.0.2.0/24 has room for 253 nodes, not 300"),
    (
        "segments: [{name: a, cidr: 192.0.2.0/26}, {name: b, cidr: 192.0.2.32/27}]\nnodes: [{}]",
        "bed.yaml: segments[1].cidr: 192.0.2.32/27 overlaps segment a",
    ),
    (
        "segments: [{name: a, cidr: 192.0.2.0/26}, {name: b, cidr: 192.0.2.64/26}]\nnodes: [{}]",
        "bed.yaml: nodes[0].segment: missing: this file has segments a, b",
    ),
    ("nodes: [{impair: delay fast}]", "bed.yaml: nodes[0].impair: delay TIME"),
    ("nodes: [{impair: loss 150%}]", "bed.yaml: nodes[0].impair: loss [random] PERCENT"),
    ("nodes: [{impair: jitter 5ms}]", "bed.yaml: nodes[0].impair: 'jitter' is not a netem word"),
    ("nodes: [{count: 2}]\nlinks: [{between: [n1, n5], impair: delay 1ms}]", "links[0].between"),
    ("nodes: [{count: 2}]\nlinks: [{between: [n1, n2]}]", "bed.yaml: links[0].impair: missing"),
    ("nodes: [{backend: host-gw, impair: delay 1ms}]", "nodes[0].impair: host-gw forwards in"),
    ("nodes: [{}]\nip-family: ipv5", "bed.yaml: ip-family: 'ipv5' is not one of ipv4, ipv6, dual"),
    ("nodes: [{}]\nip-family: dual", "bed.yaml: ip-family: dual needs a backend that carries"),
    ("nodes: [{}]\nipv6-network: fd00:10::/48", "bed.yaml: ipv6-network: needs ip-family"),
    (
        "nodes: [{backend: vxlan}]\nip-family: ipv6\nipv6-network: fe80::/64",
        "bed.yaml: ipv6-network: IPv6Network: fe80::/64 is not a unique local",
    ),
    (
        "nodes: [{backend: vxlan}]\nip-family: ipv6\nipv6-network: 2001:db8:1::/48",
        "bed.yaml: ipv6-network: 2001:db8:1::/48 overlaps the IPv6 underlay 2001:db8::/32",
    ),
    (
        "nodes: [{backend: vxlan}]\nip-family: dual\nipv6-network: 10.0.0.0/8",
        "bed.yaml: ipv6-network: '10.0.0.0/8' is not an IPv6 network",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_file_fails_in_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(TopologyError) as caught:
        load_topology(text, "bed.yaml")
    assert str(caught.value).startswith(message) or message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_netem_words_as_tc_netem_takes_them() -> None:
    assert check_netem(" delay 20ms  5ms 25% distribution normal ") == (
        "delay 20ms 5ms 25% distribution normal"
    )
    for good in ("loss gemodel 1% 10% 70% 0.1%", "reorder 25% 50% gap 5 delay 10ms", "rate 1gbit"):
        assert check_netem(good) == good
    for bad in ("", "delay", "loss 1% loss 2%", "rate 10 mbit", "limit many", "reorder x"):
        with pytest.raises(NetemError):
            check_netem(bad)


def test_up_with_a_bad_file_exits_1_with_one_line(tmp_path: Path) -> None:
    bed = tmp_path / "bed.yaml"
    bed.write_text("nodes:\n  - {segment: a, backend: udp}\n")
    proc = cli("up", "-f", str(bed), "--prefix", "tbad")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "overlay testbed up: error: bed.yaml: nodes[0].segment: 'a' is not one of underlay"
    )


def test_dry_run_prints_the_plan_and_makes_nothing() -> None:
    example = ROOT / "examples" / "two-segments.yaml"
    proc = cli("up", "-f", str(example), "--dry-run", "--prefix", "tdry")
    assert proc.returncode == 0, proc.stderr
    assert "testbed tdry (from two-segments.yaml)" in proc.stdout
    assert "etcd registry, 3 member(s) on segment a" in proc.stdout
    assert "tdry-n4" in proc.stdout and "kernel-vxlan" in proc.stdout
    assert not Path("/run/overlay-testbed/tdry").exists()


def test_file_and_quick_flags_do_not_mix() -> None:
    example = ROOT / "examples" / "two-segments.yaml"
    proc = cli("up", "-f", str(example), "--nodes", "5", "--dry-run")
    assert proc.returncode == 1
    assert "--nodes cannot be combined with -f" in proc.stderr


DUAL_SEGMENTS = """
name: dual
backend: vxlan
ip-family: dual
segments:
  - {name: a, cidr: 192.0.2.0/26}
  - {name: b, cidr: 192.0.2.64/26}
nodes:
  - {segment: a, count: 2}
  - {segment: b, backend: kernel-vxlan}
"""


def test_dual_stack_plan_addresses_both_families_router_and_routes() -> None:
    """ip-family dual: every node, router leg and route in IPv6 too, segment k's /64 in
    2001:db8::/32 at the IPv4 offsets; the overlay's IPv6Network a ULA by default."""
    topology = load_topology(DUAL_SEGMENTS, "bed.yaml")
    assert topology.ip_family == "dual" and str(topology.network6) == "fd00:10::/48"
    plan = make_plan(topology, "dual")
    assert [str(n.address) for n in plan.nodes] == ["192.0.2.2", "192.0.2.3", "192.0.2.66"]
    assert [str(n.address6) for n in plan.nodes] == [
        "2001:db8::2",
        "2001:db8::3",
        "2001:db8:0:1::2",
    ]
    assert [str(leg.address6) for leg in plan.legs] == ["2001:db8::1", "2001:db8:0:1::1"]
    assert [(str(c), str(v)) for c, v in plan.node(3).routes6] == [
        ("2001:db8::/64", "2001:db8:0:1::1")
    ]
    assert [(str(c), str(v)) for c, v in plan.etcd_routes6()] == [
        ("2001:db8:0:1::/64", "2001:db8::1")
    ]
    text = describe(plan, [])
    assert "dual network 198.18.0.0/16 fd00:10::/48" in text
    assert "on b: 2001:db8::/64 via 2001:db8:0:1::1" in text
    # The state file keeps it.
    assert type(topology).from_json(topology.to_json()) == topology


def test_ipv6_only_plan_has_no_ipv4_underlay() -> None:
    topology = load_topology("ip-family: ipv6\nbackend: host-gw\nnodes: [{count: 2}]", "b.yaml")
    plan = make_plan(topology, "six")
    assert not topology.ipv4 and [str(n.address6) for n in plan.nodes] == [
        "2001:db8::1",
        "2001:db8::2",
    ]
    text = describe(plan, [])
    assert "ipv6 network fd00:10::/48" in text and "192.0.2" not in text


def test_quick_form_ip_family_flag() -> None:
    proc = cli("up", "--ip-family", "ipv6", "--backend", "vxlan", "--dry-run", "--prefix", "tv6")
    assert proc.returncode == 0, proc.stderr
    assert "ipv6 network fd00:10::/48" in proc.stdout and "2001:db8::3/64" in proc.stdout
    proc = cli("up", "--ip-family", "dual", "--dry-run", "--prefix", "tv6")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "overlay testbed up: error: --ip-family: dual needs a backend that carries IPv6: "
        "flannel's udp is IPv4 only (use vxlan, kernel-vxlan or host-gw)"
    )
