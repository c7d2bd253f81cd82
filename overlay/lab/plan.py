"""What a testbed is made of, before anything is made: from a ``Topology`` and the run's
prefix, every namespace, bridge, link, address and route, and each node's backend
(``overlay testbed up --dry-run`` prints it). Pure; ``overlay.lab.testbed`` builds it.

Names, all derived from the prefix P so ``down`` finds them after a crash: the underlay
namespace ``P-ul`` holds one bridge per segment (``br0``, ``br1``, ...) and etcd; each
node ``P-n<i>`` has ``eth0`` on its segment's bridge (``n<i>`` is the bridge's end); with
several segments the router ``P-rt`` has a leg ``eth<k>`` on bridge ``br<k>`` (``rt<k>``
is the bridge's end), forwarding, and each node a route to every other segment via the
router's address on its own. Nodes get no default route. An IPv6 or dual-stack bed
(``Topology.ip_family``) gives each of them an address in its segment's IPv6 /64 too (or
only), and the same routes in IPv6.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from overlay.lab.errors import TestbedError
from overlay.lab.topology import (
    NodeSpec,
    Segment,
    Topology,
    has_router,
    node_addresses,
    node_addresses6,
    router_address,
    router_address6,
)

Routes6 = tuple[tuple[IPv6Network, IPv6Address], ...]

IFNAMSIZ = 15  # usable characters in an interface name (16 with the NUL)


@dataclass(frozen=True)
class NodePlan:
    number: int
    spec: NodeSpec
    segment: Segment
    bridge: str  # its segment's bridge, in the underlay namespace
    address: IPv4Address  # unused by an IPv6 bed (ip-family ipv6)
    routes: tuple[tuple[IPv4Network, IPv4Address], ...]  # the other segments, via the router
    address6: IPv6Address | None = None  # ip-family ipv6 or dual: in its segment's /64
    routes6: Routes6 = ()

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
    address6: IPv6Address | None = None  # ip-family ipv6 or dual


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

    def etcd_routes6(self) -> Routes6:
        """The same in IPv6 (an IPv6 or dual-stack bed)."""
        return _routes6_from(self.topology, self.etcd_segment)


def bridge_name(k: int) -> str:
    return f"br{k}"


def make_plan(topology: Topology, prefix: str) -> Plan:
    addresses = node_addresses(topology)
    addresses6 = node_addresses6(topology) if topology.ipv6 else [None] * len(addresses)
    nodes = tuple(
        NodePlan(
            number=i,
            spec=spec,
            segment=topology.segment(spec.segment),
            bridge=bridge_name(_index(topology, spec.segment)),
            address=addresses[i - 1],
            routes=tuple(_routes_from(topology, topology.segment(spec.segment))),
            address6=addresses6[i - 1],
            routes6=_routes6_from(topology, topology.segment(spec.segment)),
        )
        for i, spec in enumerate(topology.nodes, start=1)
    )
    legs = tuple(
        RouterLeg(
            s,
            bridge_name(k),
            f"rt{k}",
            f"eth{k}",
            router_address(s),
            router_address6(topology, s) if topology.ipv6 else None,
        )
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


def _routes6_from(topology: Topology, segment: Segment) -> Routes6:
    if not (has_router(topology) and topology.ipv6):
        return ()
    via = router_address6(topology, segment)
    return tuple((topology.cidr6(s), via) for s in topology.segments if s != segment)


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
    networks = " ".join(
        [*([str(t.network)] if t.ipv4 else []), *([str(t.network6)] if t.ipv6 else [])]
    )
    lines = [
        f"testbed {plan.prefix}{source}: {t.ip_family} network {networks}, {backend}, {registry}",
        "",
        f"{'SEGMENT':<10} {'CIDR':<18} {'BRIDGE':<16} ROUTER",
    ]
    legs = {leg.segment.name: leg for leg in plan.legs}
    for bridge, segment in plan.bridges:
        leg = legs.get(segment.name)
        router = "-"
        if leg:
            router = " ".join(str(a) for a in _family(t, leg.address, leg.address6))
            router += f" ({plan.router_ns} {leg.inside})"
        where = f"{bridge}@{plan.underlay_ns}"
        cidrs = " ".join(str(c) for c in _family(t, segment.cidr, t.cidr6(segment)))
        lines.append(f"{segment.name:<10} {cidrs:<18} {where:<16} {router}")
    lines += ["", f"{'NODE':<6} {'NETNS':<14} {'SEGMENT':<10} {'ADDRESS':<18} {'BACKEND':<13} PODS"]
    for node in plan.nodes:
        address = " ".join(
            _family(t, f"{node.address}/{node.segment.cidr.prefixlen}", f"{node.address6}/64")
        )
        lines.append(
            f"{node.name:<6} {plan.node_ns(node.number):<14} {node.segment.name:<10} "
            f"{address:<18} {node.spec.backend:<13} {node.spec.pods}"
            + (f"  impair: {node.spec.impair}" if node.spec.impair else "")
        )
    if plan.legs:
        lines += ["", "routes (the nodes of each segment, to the other segments):"]
        for segment in t.segments:
            for cidr, via in _routes_from(t, segment) if t.ipv4 else []:
                lines.append(f"  on {segment.name}: {cidr} via {via}")
            for cidr6, via6 in _routes6_from(t, segment):
                lines.append(f"  on {segment.name}: {cidr6} via {via6}")
    if t.links:
        lines += ["", "links (impaired both ways):"]
        lines += [f"  n{a} <-> n{b}: {link.impair}" for link in t.links for a, b in [link.ends]]
    return "\n".join(lines)


def _family(topology: Topology, v4: object, v6: object) -> list[str]:
    """What a line shows of the bed's families: the IPv4 value, the IPv6 one, or both."""
    return [str(x) for x, on in ((v4, topology.ipv4), (v6, topology.ipv6)) if on]
