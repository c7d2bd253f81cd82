"""What a testbed is made of, before anything is made: from a ``Topology`` and the run's
prefix, every namespace, bridge, link, address and route, and each node's backend
(``overlay testbed up --dry-run`` prints it). Pure; ``overlay.lab.testbed`` builds it.

Names, all derived from the prefix P so ``down`` finds them after a crash: the underlay
namespace ``P-ul`` holds one bridge per segment (``br0``, ``br1``, ...) and etcd; each
node ``P-n<i>`` has ``eth0`` on its segment's bridge (``n<i>`` is the bridge's end); with
several segments the router ``P-rt`` has a leg ``eth<k>`` on bridge ``br<k>`` (``rt<k>``
is the bridge's end), forwarding, and each node a route to every other segment via the
router's address on its own. Nodes get no default route.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from overlay.lab.errors import TestbedError
from overlay.lab.topology import (
    NodeSpec,
    Segment,
    Topology,
    has_router,
    node_addresses,
    router_address,
)

IFNAMSIZ = 15  # usable characters in an interface name (16 with the NUL)


@dataclass(frozen=True)
class NodePlan:
    number: int
    spec: NodeSpec
    segment: Segment
    bridge: str  # its segment's bridge, in the underlay namespace
    address: IPv4Address
    routes: tuple[tuple[IPv4Network, IPv4Address], ...]  # the other segments, via the router

    @property
    def name(self) -> str:
        return f"n{self.number}"

    @property
    def datapath(self) -> str:
        """As ``overlay testbed status`` shows it."""
        backend = self.spec.backend
        return {"vxlan": "vxlan-user", "kernel-vxlan": "vxlan-kernel"}.get(backend, backend)


@dataclass(frozen=True)
class RouterLeg:
    segment: Segment
    bridge: str
    outside: str  # the bridge's end, in the underlay namespace
    inside: str  # the router's interface
    address: IPv4Address


@dataclass(frozen=True)
class Plan:
    prefix: str
    topology: Topology
    nodes: tuple[NodePlan, ...]
    legs: tuple[RouterLeg, ...]  # none with one segment

    @property
    def underlay_ns(self) -> str:
        return f"{self.prefix}-ul"

    @property
    def router_ns(self) -> str:
        return f"{self.prefix}-rt"

    def node_ns(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    def pod_ns(self, i: int, j: int) -> str:
        return f"{self.prefix}-n{i}-p{j}"

    def node(self, i: int) -> NodePlan:
        return self.nodes[i - 1]

    @property
    def bridges(self) -> list[tuple[str, Segment]]:
        return [(bridge_name(k), s) for k, s in enumerate(self.topology.segments)]

    @property
    def etcd_segment(self) -> Segment:
        return self.topology.segment(self.topology.registry_segment)

    @property
    def etcd_bridge(self) -> str:
        return bridge_name(self.topology.segments.index(self.etcd_segment))

    def etcd_routes(self) -> list[tuple[IPv4Network, IPv4Address]]:
        """The underlay namespace's routes back to the nodes of the other segments."""
        return _routes_from(self.topology, self.etcd_segment)


def bridge_name(k: int) -> str:
    return f"br{k}"


def make_plan(topology: Topology, prefix: str) -> Plan:
    addresses = node_addresses(topology)
    nodes = tuple(
        NodePlan(
            number=i,
            spec=spec,
            segment=topology.segment(spec.segment),
            bridge=bridge_name(_index(topology, spec.segment)),
            address=addresses[i - 1],
            routes=tuple(_routes_from(topology, topology.segment(spec.segment))),
        )
        for i, spec in enumerate(topology.nodes, start=1)
    )
    legs = tuple(
        RouterLeg(s, bridge_name(k), f"rt{k}", f"eth{k}", router_address(s))
        for k, s in enumerate(topology.segments)
        if has_router(topology)
    )
    plan = Plan(prefix, topology, nodes, legs)
    longest = plan.node_ns(len(nodes))
    if len(longest) > IFNAMSIZ:
        raise TestbedError(
            f"name {longest!r} would exceed {IFNAMSIZ} characters: use a shorter prefix "
            "or fewer nodes"
        )
    return plan


def _index(topology: Topology, segment: str) -> int:
    return [s.name for s in topology.segments].index(segment)


def _routes_from(topology: Topology, segment: Segment) -> list[tuple[IPv4Network, IPv4Address]]:
    if not has_router(topology):
        return []
    via = router_address(segment)
    return [(s.cidr, via) for s in topology.segments if s != segment]


def describe(plan: Plan, endpoints: list[str]) -> str:
    """The plan as ``--dry-run`` prints it: what would be made, nothing made."""
    t = plan.topology
    backend = f"{t.backend_type} backend" + (" with DirectRouting" if t.direct_routing else "")
    registry = (
        f"etcd registry, {t.etcd_members} member(s) on segment {t.registry_segment}: "
        + ", ".join(endpoints)
        if t.registry == "etcd"
        else "file registry"
    )
    source = f" (from {t.source})" if t.source else ""
    lines = [
        f"testbed {plan.prefix}{source}: network {t.network}, {backend}, {registry}",
        "",
        f"{'SEGMENT':<10} {'CIDR':<18} {'BRIDGE':<16} ROUTER",
    ]
    legs = {leg.segment.name: leg for leg in plan.legs}
    for bridge, segment in plan.bridges:
        leg = legs.get(segment.name)
        router = f"{leg.address} ({plan.router_ns} {leg.inside})" if leg else "-"
        where = f"{bridge}@{plan.underlay_ns}"
        lines.append(f"{segment.name:<10} {str(segment.cidr):<18} {where:<16} {router}")
    lines += ["", f"{'NODE':<6} {'NETNS':<14} {'SEGMENT':<10} {'ADDRESS':<18} {'BACKEND':<13} PODS"]
    for node in plan.nodes:
        address = f"{node.address}/{node.segment.cidr.prefixlen}"
        lines.append(
            f"{node.name:<6} {plan.node_ns(node.number):<14} {node.segment.name:<10} "
            f"{address:<18} {node.spec.backend:<13} {node.spec.pods}"
            + (f"  impair: {node.spec.impair}" if node.spec.impair else "")
        )
    if plan.legs:
        lines += ["", "routes (the nodes of each segment, to the other segments):"]
        for segment in t.segments:
            for cidr, via in _routes_from(t, segment):
                lines.append(f"  on {segment.name}: {cidr} via {via}")
    if t.links:
        lines += ["", "links (impaired both ways):"]
        lines += [f"  n{a} <-> n{b}: {link.impair}" for link in t.links for a, b in [link.ends]]
    return "\n".join(lines)
