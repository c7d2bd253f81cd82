"""A testbed described in a file (``overlay testbed up -f bed.yaml``): the schema, checked
key by key, and the ``Topology`` it yields. The quick form's flags make the same object
(``overlay.lab.testbed.Testbed``), so both build the same way.

Pure: text (or decoded YAML) in, a Topology or one ``TopologyError`` out, whose message
names the file and the key: ``bed.yaml: nodes[2].backend: 'vxlanx' is not one of udp,
vxlan, kernel-vxlan, host-gw``. The file's keys::

    name: two               # the default --prefix (1-8 of a-z, 0-9)
    network: 198.18.0.0/16  # the overlay network (default)
    backend: vxlan          # each node's default: udp, vxlan, kernel-vxlan, host-gw
    direct-routing: true    # vxlan: plain routes to the peers on our segment
    registry: {type: etcd, members: 3, segment: a}   # or: file (default: etcd, 1 member)
    underlay: 192.0.2.0/24  # one segment (the default) ...
    segments:               # ... or several, a router namespace between them
      - {name: a, cidr: 192.0.2.0/26}
      - {name: b, cidr: 192.0.2.64/26}
    nodes:                  # n1, n2, ... in this order
      - {segment: a, backend: vxlan, pods: 2, count: 2, impair: delay 5ms}
      - {segment: b, backend: kernel-vxlan}
    links:                  # impairment of the path between two nodes, both ways
      - {between: [n1, n3], impair: delay 20ms 5ms loss 1%}
    ip-family: dual         # ipv4 (default), ipv6 (EnableIPv4 false) or dual
    ipv6-network: fd00:10::/48   # the overlay's IPv6Network (ipv6, dual; a ULA default)

With ``ip-family`` ipv6 or dual, segment k's IPv6 underlay is ``2001:db8:0:k::/64``
(documentation range), each node, router leg and etcd member at the same offset in it as
in the segment's IPv4 range; with ipv6 the IPv4 ranges are left unused.

Impairment is in netem's words (``overlay impair``), applied by the daemons' userspace
datapaths (udp, vxlan): checked against netem's grammar here (``overlay.lab.impairment``),
again by the daemon that gets them. A node's goes to its daemon as ``overlay run --impair
WORDS``; a link's, once both ends hold a lease, as ``overlay impair --peer SUBNET WORDS``
at each end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, NoReturn

import yaml

from control.config import ConfigError, config_json, parse_config
from overlay.lab.errors import TestbedError
from overlay.lab.etcd import MAX_MEMBERS
from overlay.lab.impairment import NetemError, check_netem

BACKENDS = ("udp", "vxlan", "kernel-vxlan", "host-gw")
# flannel has one backend per network: the Backend.Type each node's backend needs.
NETWORK_TYPE = {"udp": "udp", "vxlan": "vxlan", "kernel-vxlan": "vxlan", "host-gw": "host-gw"}
USERSPACE = ("udp", "vxlan")  # the datapaths that run in the daemon (and can impair)
REGISTRIES = ("etcd", "file")
DEFAULT_UNDERLAY = IPv4Network("192.0.2.0/24")
DEFAULT_NETWORK = IPv4Network("198.18.0.0/16")
IP_FAMILIES = ("ipv4", "ipv6", "dual")
DEFAULT_NETWORK6 = IPv6Network("fd00:10::/48")  # unique local (fd00::/8)
# Segment k's IPv6 underlay: 2001:db8:0:k::/64, in the documentation range 2001:db8::/32.
UNDERLAY6 = IPv6Network("2001:db8::/32")
DEFAULT_SEGMENT = "underlay"  # the one segment of a bed without ``segments``
MAX_NODES = 1000  # nodes per file, counts included: a typo's 10000 is refused at once
_PREFIX = re.compile(r"^[a-z0-9]{1,8}$")
_SEGMENT = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
_NODE = re.compile(r"^n([1-9][0-9]*)$")

_TOP_KEYS = (
    "name",
    "network",
    "backend",
    "direct-routing",
    "registry",
    "underlay",
    "segments",
    "nodes",
    "links",
    "ip-family",
    "ipv6-network",
)
_REGISTRY_KEYS = ("type", "members", "segment")
_SEGMENT_KEYS = ("name", "cidr")
_NODE_KEYS = ("segment", "backend", "pods", "count", "impair")
_LINK_KEYS = ("between", "impair")


class TopologyError(TestbedError):
    """A topology that cannot be built: ``file: key: what is wrong (what to do)``."""


@dataclass(frozen=True)
class Segment:
    """One L2 segment: a bridge of its own in the underlay namespace."""

    name: str
    cidr: IPv4Network


@dataclass(frozen=True)
class NodeSpec:
    segment: str
    backend: str  # one of BACKENDS
    pods: int
    impair: str | None = None  # netem's words, for every peer, what the node sends


@dataclass(frozen=True)
class LinkSpec:
    """The path between two nodes, impaired at both ends (each end's traffic to the other)."""

    ends: tuple[int, int]
    impair: str


@dataclass(frozen=True)
class Topology:
    segments: tuple[Segment, ...]
    nodes: tuple[NodeSpec, ...]  # node i is nodes[i - 1]
    network: IPv4Network = DEFAULT_NETWORK
    registry: str = "etcd"
    etcd_members: int = 1
    registry_segment: str = DEFAULT_SEGMENT
    direct_routing: bool = False
    links: tuple[LinkSpec, ...] = ()
    name: str | None = None  # the prefix the file suggests
    source: str | None = field(default=None, compare=False)  # the file it came from
    ip_family: str = "ipv4"  # one of IP_FAMILIES
    network6: IPv6Network = DEFAULT_NETWORK6  # the overlay's IPv6Network (ipv6, dual)

    @property
    def ipv4(self) -> bool:
        """Whether the bed carries IPv4 (underlay addresses, EnableIPv4)."""
        return self.ip_family != "ipv6"

    @property
    def ipv6(self) -> bool:
        """Whether the bed carries IPv6 (underlay addresses, EnableIPv6)."""
        return self.ip_family != "ipv4"

    def cidr6(self, segment: Segment) -> IPv6Network:
        """Segment ``segment``'s IPv6 underlay: 2001:db8:0:<its index>::/64."""
        k = self.segments.index(segment)
        return IPv6Network((int(UNDERLAY6.network_address) + (k << 64), 64))

    @property
    def backend_type(self) -> str:
        """The network config's Backend.Type (the same for every node, as in flannel)."""
        return NETWORK_TYPE[self.nodes[0].backend]

    def segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)

    def to_json(self) -> dict[str, Any]:
        """What ``from_json`` reads back (the testbed's state file keeps it)."""
        return {
            "name": self.name,
            "source": self.source,
            "network": str(self.network),
            "registry": self.registry,
            "etcd_members": self.etcd_members,
            "registry_segment": self.registry_segment,
            "direct_routing": self.direct_routing,
            "segments": [{"name": s.name, "cidr": str(s.cidr)} for s in self.segments],
            "nodes": [
                {"segment": n.segment, "backend": n.backend, "pods": n.pods, "impair": n.impair}
                for n in self.nodes
            ],
            "links": [{"ends": list(link.ends), "impair": link.impair} for link in self.links],
            "ip_family": self.ip_family,
            "network6": str(self.network6),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Topology:
        return cls(
            segments=tuple(
                Segment(str(s["name"]), IPv4Network(s["cidr"])) for s in data["segments"]
            ),
            nodes=tuple(
                NodeSpec(str(n["segment"]), str(n["backend"]), int(n["pods"]), n.get("impair"))
                for n in data["nodes"]
            ),
            network=IPv4Network(data["network"]),
            registry=str(data["registry"]),
            etcd_members=int(data["etcd_members"]),
            registry_segment=str(data["registry_segment"]),
            direct_routing=bool(data["direct_routing"]),
            links=tuple(
                LinkSpec((int(link["ends"][0]), int(link["ends"][1])), str(link["impair"]))
                for link in data.get("links", [])
            ),
            name=data.get("name"),
            source=data.get("source"),
            ip_family=str(data.get("ip_family", "ipv4")),
            network6=IPv6Network(data.get("network6", str(DEFAULT_NETWORK6))),
        )


# -- addressing (shared with the plan: where nodes, the router and etcd sit) -------------


def has_router(topology: Topology) -> bool:
    return len(topology.segments) > 1


def router_address(segment: Segment) -> IPv4Address:
    """The router's leg on a segment: its first address, as a gateway usually is."""
    return segment.cidr.network_address + 1


def router_address6(topology: Topology, segment: Segment) -> IPv6Address:
    """The router's IPv6 leg on a segment: the first address of its /64."""
    return topology.cidr6(segment).network_address + 1


def node_offsets(topology: Topology) -> list[int]:
    """Node i's offset in its segment at [i - 1]: the next free one, counted from the
    segment's start (after the router's, when there is one); the same in both families."""
    first = 2 if has_router(topology) else 1
    taken: dict[str, int] = {}
    offsets = []
    for node in topology.nodes:
        k = taken.get(node.segment, 0)
        taken[node.segment] = k + 1
        offsets.append(first + k)
    return offsets


def node_addresses(topology: Topology) -> list[IPv4Address]:
    """Node i's IPv4 underlay address at [i - 1] (``node_offsets`` into its segment)."""
    return [
        topology.segment(node.segment).cidr.network_address + offset
        for node, offset in zip(topology.nodes, node_offsets(topology), strict=True)
    ]


def node_addresses6(topology: Topology) -> list[IPv6Address]:
    """Node i's IPv6 underlay address at [i - 1]: the same offset in its segment's /64."""
    return [
        topology.cidr6(topology.segment(node.segment)).network_address + offset
        for node, offset in zip(topology.nodes, node_offsets(topology), strict=True)
    ]


def room(topology: Topology, segment: Segment) -> int:
    """How many nodes fit on a segment: its hosts less the router's and etcd's addresses
    (etcd member m sits m addresses below the top, ``overlay.lab.etcd``)."""
    reserved = 1 if has_router(topology) else 0
    if topology.registry == "etcd" and segment.name == topology.registry_segment:
        reserved += topology.etcd_members
    return max(segment.cidr.num_addresses - 2 - reserved, 0)


# -- the file -------------------------------------------------------------------------------


def load_topology(text: str, source: str) -> Topology:
    """Parse and check a topology file's text; ``source`` names it in every error."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TopologyError(f"{source}: {where}{problem} (not valid YAML)") from None
    return parse_topology(data, source)


def parse_topology(data: Any, source: str) -> Topology:
    """A decoded topology file (a mapping) as a checked Topology."""
    top = _Mapping(data, source, "", _TOP_KEYS, "the file")
    name = top.text("name", None, _PREFIX, "1-8 characters a-z, 0-9 (it prefixes every name)")
    network = top.cidr("network", DEFAULT_NETWORK)
    segments = _segments(top)
    default_backend = top.choice("backend", "udp", BACKENDS)
    registry, members, registry_segment = _registry(top, segments)
    nodes = _nodes(top, segments, default_backend)
    direct = top.boolean("direct-routing", False)
    ip_family = top.choice("ip-family", "ipv4", IP_FAMILIES)
    network6 = top.cidr6("ipv6-network", DEFAULT_NETWORK6)
    if "ipv6-network" in top.data and ip_family == "ipv4":
        top.fail("ipv6-network", "needs ip-family ipv6 or dual")
    topology = Topology(
        segments=segments,
        nodes=nodes,
        network=network,
        registry=registry,
        etcd_members=members,
        registry_segment=registry_segment,
        direct_routing=direct,
        links=_links(top, nodes),
        name=name,
        source=source,
        ip_family=ip_family,
        network6=network6,
    )
    _check(topology, top)
    return topology


def _segments(top: _Mapping) -> tuple[Segment, ...]:
    if "underlay" in top.data and "segments" in top.data:
        top.fail("underlay", "give either underlay (one segment) or segments, not both")
    if "segments" not in top.data:
        underlay = top.cidr("underlay", DEFAULT_UNDERLAY)
        if underlay.num_addresses < 8:
            top.fail("underlay", f"{underlay} is too small for a segment (use /29 or larger)")
        return (Segment(DEFAULT_SEGMENT, underlay),)
    items = top.items("segments", min_length=1)
    segments: list[Segment] = []
    for index, item in enumerate(items):
        entry = top.child("segments", index, item, _SEGMENT_KEYS)
        name = str(entry.text("name", ..., _SEGMENT, "a-z, 0-9 and '-', starting with a letter"))
        cidr = entry.cidr("cidr", ...)
        for other in segments:
            if other.name == name:
                entry.fail("name", f"{name!r} is already the name of another segment")
            if other.cidr.overlaps(cidr):
                entry.fail("cidr", f"{cidr} overlaps segment {other.name} ({other.cidr})")
        if cidr.num_addresses < 8:
            entry.fail("cidr", f"{cidr} is too small for a segment (use /29 or larger)")
        segments.append(Segment(name, cidr))
    return tuple(segments)


def _registry(top: _Mapping, segments: tuple[Segment, ...]) -> tuple[str, int, str]:
    """(etcd or file, members, the segment etcd lives on)."""
    value = top.data.get("registry", "etcd")
    if isinstance(value, str):
        if value not in REGISTRIES:
            top.fail("registry", f"{value!r} is not one of {', '.join(REGISTRIES)}")
        return value, 1, segments[0].name
    entry = _Mapping(value, top.source, "registry", _REGISTRY_KEYS, "etcd, file or a mapping")
    kind = entry.choice("type", "etcd", REGISTRIES)
    members = entry.integer("members", 1, 1, MAX_MEMBERS)
    if members > 1 and kind != "etcd":
        entry.fail("members", "only an etcd registry has members (type: etcd)")
    names = [s.name for s in segments]
    where = entry.choice("segment", names[0], tuple(names))
    return kind, members, where


def _nodes(top: _Mapping, segments: tuple[Segment, ...], backend: str) -> tuple[NodeSpec, ...]:
    names = tuple(s.name for s in segments)
    nodes: list[NodeSpec] = []
    for index, item in enumerate(top.items("nodes", min_length=1)):
        entry = top.child("nodes", index, item, _NODE_KEYS)
        if len(segments) > 1 and "segment" not in entry.data:
            entry.fail("segment", f"missing: this file has segments {', '.join(names)}, say which")
        spec = NodeSpec(
            segment=entry.choice("segment", names[0], names),
            backend=entry.choice("backend", backend, BACKENDS),
            pods=entry.integer("pods", 1, 0, 64),
            impair=entry.netem("impair", None),
        )
        count = entry.integer("count", 1, 1, MAX_NODES)
        if len(nodes) + count > MAX_NODES:
            entry.fail("count", f"{len(nodes) + count} nodes in all: at most {MAX_NODES}")
        nodes.extend([spec] * count)
    return tuple(nodes)


def _links(top: _Mapping, nodes: tuple[NodeSpec, ...]) -> tuple[LinkSpec, ...]:
    if "links" not in top.data:
        return ()
    links: list[LinkSpec] = []
    for index, item in enumerate(top.items("links", min_length=0)):
        entry = top.child("links", index, item, _LINK_KEYS)
        impair = str(entry.netem("impair", ...))
        ends = entry.data.get("between")
        if not (isinstance(ends, list) and len(ends) == 2):
            entry.fail("between", f"{_show(ends)} is not a pair of nodes, e.g. [n1, n3]")
        numbers = tuple(_node_number(entry, end, len(nodes)) for end in ends)
        if numbers[0] == numbers[1]:
            entry.fail("between", f"n{numbers[0]} twice: a link joins two nodes")
        for number in numbers:
            if nodes[number - 1].backend not in USERSPACE:
                entry.fail(
                    "between",
                    f"n{number} is {nodes[number - 1].backend}: impairment happens in the "
                    f"userspace datapaths ({', '.join(USERSPACE)})",
                )
        links.append(LinkSpec((numbers[0], numbers[1]), impair))
    return tuple(links)


def _node_number(entry: _Mapping, end: Any, count: int) -> int:
    match = _NODE.match(end) if isinstance(end, str) else None
    if not match or int(match[1]) > count:
        entry.fail("between", f"{_show(end)} is not a node of this file (n1..n{count})")
    return int(match[1])


def _check(topology: Topology, top: _Mapping) -> None:
    """What needs the whole file: one backend type per network, room on each segment, the
    overlay network disjoint from the underlay and large enough."""
    first = topology.nodes[0].backend
    for index, node in enumerate(topology.nodes):
        if NETWORK_TYPE[node.backend] != NETWORK_TYPE[first]:
            top.fail(
                f"nodes[{_entry_of(top, index)}].backend",
                f"{node.backend!r} cannot share a network with n1's {first!r}: flannel has "
                "one backend per network (vxlan and kernel-vxlan mix; udp and host-gw "
                "stand alone)",
            )
        if node.impair and node.backend not in USERSPACE:
            top.fail(
                f"nodes[{_entry_of(top, index)}].impair",
                f"{node.backend} forwards in the kernel: impairment happens in the userspace "
                f"datapaths ({', '.join(USERSPACE)})",
            )
    if topology.direct_routing and topology.backend_type != "vxlan":
        top.fail("direct-routing", "is a vxlan option: the nodes are not vxlan")
    for index, segment in enumerate(topology.segments):
        here = sum(1 for n in topology.nodes if n.segment == segment.name)
        if here > room(topology, segment):
            key = f"segments[{index}].cidr" if "segments" in top.data else "underlay"
            top.fail(
                key, f"{segment.cidr} has room for {room(topology, segment)} nodes, not {here}"
            )
        if segment.cidr.overlaps(topology.network):
            top.fail("network", f"{topology.network} overlaps the underlay {segment.cidr}")
    problem = network_problem(topology.network, topology.backend_type, len(topology.nodes))
    if problem and topology.ipv4:
        top.fail("network", problem)
    problem6 = family_problem(topology.ip_family, topology.network6, topology.nodes)
    if problem6:
        top.fail(*problem6)


def network_problem(network: IPv4Network, backend_type: str, nodes: int) -> str | None:
    """Why the overlay network cannot hold a lease per node, or None."""
    try:
        leases = len(parse_config(config_json(network, backend_type)).subnets())
    except ConfigError as e:
        return str(e)
    if leases < nodes:
        return f"{network} has only {leases} subnet leases for {nodes} nodes: use a larger one"
    return None


def family_problem(
    ip_family: str, network6: IPv6Network, nodes: tuple[NodeSpec, ...]
) -> tuple[str, str] | None:
    """(the key, why) an IPv6 or dual-stack bed cannot be built, or None: udp carries
    IPv4 only (as flannel's), and IPv6Network must be a valid one (flanneld's rules)."""
    if ip_family == "ipv4":
        return None
    if any(node.backend == "udp" for node in nodes):
        return (
            "ip-family",
            f"{ip_family} needs a backend that carries IPv6: flannel's udp is IPv4 only "
            "(use vxlan, kernel-vxlan or host-gw)",
        )
    if network6.overlaps(UNDERLAY6):
        return "ipv6-network", f"{network6} overlaps the IPv6 underlay {UNDERLAY6}"
    config = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": str(network6)}
    try:
        parse_config(config)
    except ConfigError as e:
        return "ipv6-network", str(e)
    return None


def _entry_of(top: _Mapping, node_index: int) -> int:
    """The index in ``nodes`` of the entry (with its count) that made node_index."""
    seen = 0
    for index, item in enumerate(top.data.get("nodes") or []):
        count = item.get("count", 1) if isinstance(item, dict) else 1
        seen += count if isinstance(count, int) else 1
        if node_index < seen:
            return index
    return node_index


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Mapping:
    """One mapping of the file, read key by key; every error names its path."""

    def __init__(self, data: Any, source: str, path: str, keys: tuple[str, ...], what: str) -> None:
        self.source = source
        self.path = path
        if data is None and path == "":
            self.fail("", "the file is empty (it needs at least nodes: [...])")
        if not isinstance(data, dict):
            self.fail("", f"{_show(data)} is not a mapping ({what})")
        self.data: dict[Any, Any] = data
        unknown = [k for k in data if k not in keys]
        if unknown:
            self.fail(str(unknown[0]), f"unknown key (known here: {', '.join(keys)})")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path and name else self.path or name

    def fail(self, name: str, message: str) -> NoReturn:
        where = self.key(name)
        raise TopologyError(f"{self.source}: {where + ': ' if where else ''}{message}")

    def child(self, name: str, index: int, item: Any, keys: tuple[str, ...]) -> _Mapping:
        return _Mapping(item, self.source, f"{self.key(name)}[{index}]", keys, "a mapping")

    def items(self, name: str, min_length: int) -> list[Any]:
        value = self.data.get(name)
        if not isinstance(value, list):
            self.fail(name, f"{'missing' if value is None else _show(value)}: give a list")
        if len(value) < min_length:
            self.fail(name, "is empty")
        return value

    def _get(self, name: str, default: Any) -> Any:
        if name not in self.data:
            if default is ...:
                self.fail(name, "missing")
            return default
        return self.data[name]

    def text(
        self, name: str, default: Any, pattern: re.Pattern[str] | None, hint: str
    ) -> str | None:
        value = self._get(name, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(name, f"{_show(value)} is not text ({hint})")
        if pattern is not None and not pattern.match(value):
            self.fail(name, f"{_show(value)} is not valid: use {hint}")
        return str(value).strip()

    def netem(self, name: str, default: Any) -> str | None:
        """netem's words (``delay 20ms 5ms loss 1%``), checked against its grammar."""
        words = self.text(name, default, None, "netem's words, e.g. 'delay 20ms loss 1%'")
        if words is None:
            return None
        try:
            return check_netem(words)
        except NetemError as e:
            self.fail(name, f"{e} (netem's words, as tc-netem(8))")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._get(name, default)
        if value not in choices:
            self.fail(name, f"{_show(value)} is not one of {', '.join(choices)}")
        return str(value)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"{_show(value)} is not a whole number")
        if not low <= value <= high:
            self.fail(name, f"{value} is out of range ({low} to {high})")
        return int(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            self.fail(name, f"{_show(value)} is not true or false")
        return bool(value)

    def cidr6(self, name: str, default: Any) -> IPv6Network:
        value = self._get(name, default)
        if isinstance(value, IPv6Network):
            return value
        try:
            return IPv6Network(str(value))
        except ValueError as e:
            self.fail(name, f"{_show(value)} is not an IPv6 network, e.g. fd00:10::/48 ({e})")

    def cidr(self, name: str, default: Any) -> IPv4Network:
        value = self._get(name, default)
        if isinstance(value, IPv4Network):
            return value
        if not isinstance(value, str):
            self.fail(name, f"{_show(value)} is not an IPv4 network (e.g. 192.0.2.0/24)")
        try:
            return IPv4Network(value)
        except ValueError as e:
            self.fail(name, f"{_show(value)} is not an IPv4 network ({e})")
