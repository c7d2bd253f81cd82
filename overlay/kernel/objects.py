"""Kernel objects the daemon programs, as values that can be applied, checked and removed.

flanneld's recipe, per remote lease: for vxlan a permanent neighbour entry (the peer's
VTEP address -> its VTEP MAC), a permanent fdb entry (that MAC -> the peer's public IP)
and an onlink route for the peer's subnet via its VTEP address; for host-gw (and vxlan
DirectRouting) a plain route via the peer's public IP. Per node: the vxlan device
``flannel.<VNI>`` or the TUN, its link settings, its /32 address and (TUN) the route for
the whole network.

Each object is a small frozen dataclass with ``apply`` (idempotent: replace), ``remove``
(a piece that is already gone is fine) and ``present`` against a ``KernelView``, one
dump of the kernel's links, addresses, routes, neighbours and fdb entries, so checking
a whole node costs five netlink dumps however many peers it has. Synchronous: pyroute2's
IPRoute refuses to run inside an event loop, so the daemon calls these from one thread.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, ClassVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 4
IFF_UP = 1
MAIN_TABLE = 254
SCOPE_LINK = 253
ENOENT, ESRCH, ENODEV = 2, 3, 19
GONE = (ENOENT, ESRCH, ENODEV)
RTN_UNICAST = 1
RTPROT_KERNEL = 2

# Either family: flannel.<VNI> carries IPv4, flannel-v6.<VNI> IPv6, host-gw routes both.
IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


def _family(address: IPAddress | IPNetwork) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


class KernelError(OSError):
    """A netlink change failed; the message names the object and the step."""


class DeviceGone(KernelError):
    """A device we cannot recreate ourselves (the TUN, whose fd the dataplane holds)."""


# -- what the kernel has ---------------------------------------------------------------


@dataclass(frozen=True)
class LinkInfo:
    index: int
    kind: str | None
    up: bool
    mtu: int
    mac: str | None
    vxlan: dict[str, Any] | None  # vni, port, local, link (index), learning


@dataclass(frozen=True)
class RouteInfo:
    dst: IPNetwork
    gateway: IPAddress | None
    dev: str | None
    onlink: bool
    scope: int

    def describe(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        dev = f" dev {self.dev}" if self.dev else ""
        return f"{self.dst}{via}{dev}{' onlink' if self.onlink else ''}"


@dataclass
class KernelView:
    """One dump of the kernel state the objects below are checked against."""

    links: dict[str, LinkInfo] = field(default_factory=dict)
    addresses: set[tuple[str, IPAddress, int]] = field(default_factory=set)
    routes: list[RouteInfo] = field(default_factory=list)
    neighbours: dict[tuple[str, IPAddress], tuple[str | None, bool]] = field(
        default_factory=dict
    )  # (dev, address) -> (lladdr, permanent)
    fdb: set[tuple[str, str, IPAddress]] = field(default_factory=set)


def _link_info(link: Any) -> LinkInfo:
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    vxlan = None
    if kind == "vxlan":
        data = info.get_attr("IFLA_INFO_DATA")
        vxlan = {
            "vni": data.get_attr("IFLA_VXLAN_ID"),
            "port": data.get_attr("IFLA_VXLAN_PORT"),
            "local": data.get_attr("IFLA_VXLAN_LOCAL") or data.get_attr("IFLA_VXLAN_LOCAL6"),
            "link": data.get_attr("IFLA_VXLAN_LINK"),
            "learning": bool(data.get_attr("IFLA_VXLAN_LEARNING")),
        }
    mac = link.get_attr("IFLA_ADDRESS")
    return LinkInfo(
        index=link["index"],
        kind=kind,
        up=bool(link["flags"] & IFF_UP),
        mtu=int(link.get_attr("IFLA_MTU") or 0),
        mac=str(mac).lower() if mac else None,
        vxlan=vxlan,
    )


def read_view(ipr: IPRoute, devices: Iterable[str], ipv6: bool = False) -> KernelView:
    """The kernel's state as far as ``devices`` (the names our objects use) are concerned:
    their links, addresses, neighbours and fdb entries, and the whole main routing table;
    with ``ipv6``, the IPv6 ones too (their link-local addresses and routes, which the
    kernel makes on every device, left out). Links are fetched by name: a full link dump
    of a node with many pods costs tens of milliseconds of Python (pyroute2) parsing,
    every resync."""
    view = KernelView()
    names: dict[int, str] = {}
    for name in sorted(set(devices)):
        try:
            (link,) = ipr.link("get", ifname=name)
        except NetlinkError as e:
            if e.code in GONE:
                continue
            raise
        view.links[name] = _link_info(link)
        names[link["index"]] = name
    families = (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,)
    for family in families:
        _read_family(ipr, family, names, view)
    for name, link in view.links.items():
        if link.kind != "vxlan":
            continue  # fdb entries with a remote (dst) only exist on vxlan devices
        for entry in ipr.get_neighbours(family=socket.AF_BRIDGE, ifindex=link.index):
            dst = entry.get_attr("NDA_DST")
            lladdr = entry.get_attr("NDA_LLADDR")
            if entry["ifindex"] == link.index and dst and lladdr:
                remote = ip_address(dst)
                if remote.version == 4 or ipv6:
                    view.fdb.add((name, str(lladdr).lower(), remote))
    return view


def _read_family(ipr: IPRoute, family: int, names: dict[int, str], view: KernelView) -> None:
    """One family's addresses (on our devices), main-table unicast routes and neighbours."""
    for addr in ipr.get_addr(family=family):
        dev = names.get(addr["index"])
        address = ip_address(addr.get_attr("IFA_ADDRESS"))
        if dev is not None and not address.is_link_local:
            view.addresses.add((dev, address, int(addr["prefixlen"])))
    default = "0.0.0.0" if family == socket.AF_INET else "::"
    for route in ipr.get_routes(family=family, table=MAIN_TABLE):
        if route.get_attr("RTA_TABLE", MAIN_TABLE) != MAIN_TABLE or route["type"] != RTN_UNICAST:
            continue  # only unicast routes of the main table
        if family == socket.AF_INET6 and route["proto"] == RTPROT_KERNEL:
            continue  # IPv6: the kernel's own routes for each address (our /128 too)
        dst = ip_network((route.get_attr("RTA_DST") or default, route["dst_len"]))
        if dst.is_link_local or dst.is_multicast:
            continue  # IPv6: fe80::/64 and ff00::/8 on every device
        gateway = route.get_attr("RTA_GATEWAY")
        oif = route.get_attr("RTA_OIF")
        view.routes.append(
            RouteInfo(
                dst=dst,
                gateway=ip_address(gateway) if gateway else None,
                dev=names.get(oif, f"#{oif}" if oif is not None else None),
                onlink=bool(route["flags"] & RTNH_F_ONLINK),
                scope=int(route["scope"]),
            )
        )
    for neigh in ipr.get_neighbours(family=family):
        dev = names.get(neigh["ifindex"])
        dst = neigh.get_attr("NDA_DST")
        if dev is not None and dst:
            lladdr = neigh.get_attr("NDA_LLADDR")
            view.neighbours[(dev, ip_address(dst))] = (
                str(lladdr).lower() if lladdr else None,
                bool(neigh["state"] & NUD_PERMANENT),
            )


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise DeviceGone(ENODEV, f"link {name} does not exist")
    return int(found[0])


def _tolerant(step: str, call: Any, *args: Any, **kwargs: Any) -> None:
    """A removal: an object (or its device) that is already gone is fine."""
    try:
        call(*args, **kwargs)
    except NetlinkError as e:
        if e.code not in GONE:
            raise KernelError(e.code, f"{step}: {e}") from None


# -- the objects ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VxlanDevice:
    """``flannel.<VNI>`` as flanneld creates it: learning off (unless Backend.Learning),
    our local address, the underlay as its link. A device of that name with other
    parameters is deleted and recreated, as flanneld does."""

    kind: ClassVar[str] = "vxlan_device"
    name: str
    vni: int
    local: IPAddress  # IPv6 for flannel-v6.<VNI>
    underlay: str
    port: int
    learning: bool = False

    def describe(self) -> str:
        return f"{self.name} (vxlan id {self.vni} local {self.local} dstport {self.port})"

    def _compatible(self, view: KernelView) -> bool:
        link = view.links.get(self.name)
        under = view.links.get(self.underlay)
        if link is None or link.vxlan is None or under is None:
            return False
        data = link.vxlan
        return bool(
            data["vni"] == self.vni
            and data["port"] == self.port
            and data["local"] == str(self.local)
            and data["link"] == under.index
            and data["learning"] == self.learning
        )

    def present(self, view: KernelView) -> bool:
        return self._compatible(view)

    def apply(self, ipr: IPRoute) -> None:
        try:
            view = read_view(ipr, (self.name, self.underlay), self.local.version == 6)
            if self.name in view.links and not self._compatible(view):
                ipr.link("del", ifname=self.name)
            if not ipr.link_lookup(ifname=self.name):
                local = "vxlan_local" if self.local.version == 4 else "vxlan_local6"
                ipr.link(
                    "add",
                    ifname=self.name,
                    kind="vxlan",
                    vxlan_id=self.vni,
                    **{local: str(self.local)},
                    vxlan_link=_index(ipr, self.underlay),
                    vxlan_port=self.port,
                    vxlan_learning=int(self.learning),
                )
        except NetlinkError as e:
            raise KernelError(e.code, f"creating vxlan device {self.name}: {e}") from None

    def remove(self, ipr: IPRoute) -> None:
        _tolerant(f"deleting {self.name}", ipr.link, "del", ifname=self.name)


@dataclass(frozen=True)
class Link:
    """A device's MTU (and MAC), up."""

    kind: ClassVar[str] = "link"
    dev: str
    mtu: int
    mac: str | None = None

    def describe(self) -> str:
        mac = f" address {self.mac}" if self.mac else ""
        return f"{self.dev} up mtu {self.mtu}{mac}"

    def present(self, view: KernelView) -> bool:
        link = view.links.get(self.dev)
        return (
            link is not None
            and link.up
            and link.mtu == self.mtu
            and (self.mac is None or link.mac == self.mac.lower())
        )

    def apply(self, ipr: IPRoute) -> None:
        index = _index(ipr, self.dev)
        try:
            settings: dict[str, Any] = {"mtu": self.mtu}
            if self.mac:
                settings["address"] = self.mac
            ipr.link("set", index=index, **settings)
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise KernelError(e.code, f"setting up {self.dev}: {e}") from None

    def remove(self, ipr: IPRoute) -> None:
        """A link's settings are not undone (the device goes with its owner)."""


@dataclass(frozen=True)
class Address:
    """The lease's network address as a /32 (IPv6: a /128) on our device (flanneld's
    VTEP/TUN address)."""

    kind: ClassVar[str] = "address"
    dev: str
    address: IPAddress

    @property
    def prefixlen(self) -> int:
        return self.address.max_prefixlen

    def describe(self) -> str:
        return f"{self.address}/{self.prefixlen} dev {self.dev}"

    def present(self, view: KernelView) -> bool:
        return (self.dev, self.address, self.prefixlen) in view.addresses

    def apply(self, ipr: IPRoute) -> None:
        index = _index(ipr, self.dev)
        try:
            ipr.addr(
                "replace",
                index=index,
                address=str(self.address),
                prefixlen=self.prefixlen,
                family=_family(self.address),
            )
        except NetlinkError as e:
            raise KernelError(e.code, f"address {self.describe()}: {e}") from None

    def remove(self, ipr: IPRoute) -> None:
        found = ipr.link_lookup(ifname=self.dev)
        if found:
            _tolerant(
                f"removing {self.describe()}",
                ipr.addr,
                "del",
                index=found[0],
                address=str(self.address),
                prefixlen=self.prefixlen,
                family=_family(self.address),
            )


@dataclass(frozen=True)
class Route:
    """A main-table route: via a gateway (host-gw, DirectRouting), onlink via a VTEP
    address on flannel.<VNI> (flannel-v6.<VNI>), or the whole network on the TUN (scope
    link)."""

    kind: ClassVar[str] = "route"
    dst: IPNetwork
    gateway: IPAddress | None = None
    dev: str | None = None
    onlink: bool = False

    def describe(self) -> str:
        return RouteInfo(self.dst, self.gateway, self.dev, self.onlink, 0).describe()

    def matches(self, route: RouteInfo) -> bool:
        return (
            route.dst == self.dst
            and route.gateway == self.gateway
            and (self.dev is None or route.dev == self.dev)
            and route.onlink == self.onlink
        )

    def present(self, view: KernelView) -> bool:
        return any(self.matches(route) for route in view.routes)

    def _spec(self, ipr: IPRoute) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "dst": str(self.dst.network_address),
            "dst_len": self.dst.prefixlen,
            "family": _family(self.dst),
        }
        if self.gateway is not None:
            spec["gateway"] = str(self.gateway)
        if self.dev is not None:
            spec["oif"] = _index(ipr, self.dev)
        if self.onlink:
            spec["flags"] = RTNH_F_ONLINK
        elif self.gateway is None and self.dst.version == 4:
            spec["scope"] = "link"
        return spec

    def apply(self, ipr: IPRoute) -> None:
        try:
            ipr.route("replace", **self._spec(ipr))
        except NetlinkError as e:
            raise KernelError(e.code, f"route {self.describe()}: {e}") from None

    def remove(self, ipr: IPRoute) -> None:
        try:
            spec = self._spec(ipr)
        except DeviceGone:
            return  # the route went with its device
        spec.pop("flags", None)
        spec.pop("scope", None)
        _tolerant(f"removing route {self.describe()}", ipr.route, "del", **spec)


@dataclass(frozen=True)
class Neighbour:
    """A permanent ARP (IPv6: neighbour discovery) entry: the peer's VTEP address -> its
    VTEP MAC."""

    kind: ClassVar[str] = "neighbour"
    dev: str
    dst: IPAddress
    lladdr: str

    def describe(self) -> str:
        return f"{self.dst} lladdr {self.lladdr} dev {self.dev} permanent"

    def present(self, view: KernelView) -> bool:
        return view.neighbours.get((self.dev, self.dst)) == (self.lladdr.lower(), True)

    def apply(self, ipr: IPRoute) -> None:
        index = _index(ipr, self.dev)
        try:
            ipr.neigh(
                "replace",
                ifindex=index,
                dst=str(self.dst),
                lladdr=self.lladdr,
                state=NUD_PERMANENT,
                family=_family(self.dst),
            )
        except NetlinkError as e:
            raise KernelError(e.code, f"neighbour {self.describe()}: {e}") from None

    def remove(self, ipr: IPRoute) -> None:
        found = ipr.link_lookup(ifname=self.dev)
        if found:
            _tolerant(
                f"removing neighbour {self.dst}",
                ipr.neigh,
                "del",
                ifindex=found[0],
                dst=str(self.dst),
                lladdr=self.lladdr,
                family=_family(self.dst),
            )


@dataclass(frozen=True)
class Fdb:
    """A permanent fdb entry on flannel.<VNI>: the peer's VTEP MAC -> its public IP."""

    kind: ClassVar[str] = "fdb"
    dev: str
    lladdr: str
    dst: IPAddress

    def describe(self) -> str:
        return f"{self.lladdr} dst {self.dst} dev {self.dev} self permanent"

    def present(self, view: KernelView) -> bool:
        return (self.dev, self.lladdr.lower(), self.dst) in view.fdb

    def apply(self, ipr: IPRoute) -> None:
        index = _index(ipr, self.dev)
        try:
            ipr.fdb(
                "replace",
                ifindex=index,
                lladdr=self.lladdr,
                dst=str(self.dst),
                state=NUD_PERMANENT,
                flags=NTF_SELF,
            )
        except NetlinkError as e:
            raise KernelError(e.code, f"fdb {self.describe()}: {e}") from None

    def remove(self, ipr: IPRoute) -> None:
        found = ipr.link_lookup(ifname=self.dev)
        if found:
            _tolerant(
                f"removing fdb {self.lladdr}",
                ipr.fdb,
                "del",
                ifindex=found[0],
                lladdr=self.lladdr,
                dst=str(self.dst),
            )


KernelObject = VxlanDevice | Link | Address | Route | Neighbour | Fdb


def devices_of(obj: KernelObject) -> tuple[str, ...]:
    """The link names an object's check needs in the KernelView."""
    if isinstance(obj, VxlanDevice):
        return (obj.name, obj.underlay)
    dev = obj.dev
    return (dev,) if dev else ()


def vxlan_peer(
    device: str, subnet: IPNetwork, public_ip: IPAddress, mac: str
) -> list[KernelObject]:
    """flanneld's three objects for a vxlan peer, in the order they must be made."""
    vtep = subnet.network_address
    return [
        Neighbour(device, vtep, mac),
        Fdb(device, mac, public_ip),
        Route(subnet, gateway=vtep, dev=device, onlink=True),
    ]


# -- questions -----------------------------------------------------------------------------


def kernel_has_vxlan() -> bool:
    """Whether this kernel can make a vxlan device (created and deleted again)."""
    probe = "ovlprobe0"
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=probe, kind="vxlan", vxlan_id=1, vxlan_port=0)
        except NetlinkError:
            return False
        ipr.link("del", ifname=probe)
        return True


def directly_reachable(address: IPAddress) -> bool:
    """flanneld's DirectRouting test: the route to ``address`` is one hop, no gateway."""
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=str(address))
        except NetlinkError:
            return False
        return len(routes) == 1 and routes[0].get_attr("RTA_GATEWAY") is None
