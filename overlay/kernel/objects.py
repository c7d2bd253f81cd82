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
from ipaddress import IPv4Address, IPv4Network
from typing import Any, ClassVar

from tun.rtnl import IPRoute, NetlinkError

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 4
IFF_UP = 1
MAIN_TABLE = 254
SCOPE_LINK = 253
ENOENT, ESRCH, ENODEV = 2, 3, 19
GONE = (ENOENT, ESRCH, ENODEV)


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
    dst: IPv4Network
    gateway: IPv4Address | None
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
    addresses: set[tuple[str, IPv4Address, int]] = field(default_factory=set)
    routes: list[RouteInfo] = field(default_factory=list)
    neighbours: dict[tuple[str, IPv4Address], tuple[str | None, bool]] = field(
        default_factory=dict
    )  # (dev, address) -> (lladdr, permanent)
    fdb: set[tuple[str, str, IPv4Address]] = field(default_factory=set)


def _link_info(link: Any) -> LinkInfo:
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    vxlan = None
    if kind == "vxlan":
        data = info.get_attr("IFLA_INFO_DATA")
        vxlan = {
            "vni": data.get_attr("IFLA_VXLAN_ID"),
            "port": data.get_attr("IFLA_VXLAN_PORT"),
            "local": data.get_attr("IFLA_VXLAN_LOCAL"),
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


def read_view(ipr: IPRoute, devices: Iterable[str]) -> KernelView:
    """The kernel's state as far as ``devices`` (the names our objects use) are concerned:
    their links, addresses, neighbours and fdb entries, and the whole main routing table.
    Links are fetched by name: a full link dump of a node with many pods costs tens of
    milliseconds of Python (pyroute2) parsing, every resync."""
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
    for addr in ipr.get_addr(family=socket.AF_INET):
        dev = names.get(addr["index"])
        if dev is not None:
            view.addresses.add(
                (dev, IPv4Address(addr.get_attr("IFA_ADDRESS")), int(addr["prefixlen"]))
            )
    for route in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
        if route.get_attr("RTA_TABLE", MAIN_TABLE) != MAIN_TABLE or route["type"] != 1:
            continue  # only unicast routes of the main table
        route_dst: str = route.get_attr("RTA_DST") or "0.0.0.0"
        gateway = route.get_attr("RTA_GATEWAY")
        oif = route.get_attr("RTA_OIF")
        view.routes.append(
            RouteInfo(
                dst=IPv4Network((route_dst, route["dst_len"])),
                gateway=IPv4Address(gateway) if gateway else None,
                dev=names.get(oif, f"#{oif}" if oif is not None else None),
                onlink=bool(route["flags"] & RTNH_F_ONLINK),
                scope=int(route["scope"]),
            )
        )
    for neigh in ipr.get_neighbours(family=socket.AF_INET):
        dev = names.get(neigh["ifindex"])
        dst = neigh.get_attr("NDA_DST")
        if dev is not None and dst:
            lladdr = neigh.get_attr("NDA_LLADDR")
            view.neighbours[(dev, IPv4Address(dst))] = (
                str(lladdr).lower() if lladdr else None,
                bool(neigh["state"] & NUD_PERMANENT),
            )
    for name, link in view.links.items():
        if link.kind != "vxlan":
            continue  # fdb entries with a remote (dst) only exist on vxlan devices
        for entry in ipr.get_neighbours(family=socket.AF_BRIDGE, ifindex=link.index):
            dst = entry.get_attr("NDA_DST")
            lladdr = entry.get_attr("NDA_LLADDR")
            if entry["ifindex"] == link.index and dst and lladdr and ":" not in str(dst):
                view.fdb.add((name, str(lladdr).lower(), IPv4Address(dst)))
    return view


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
    local: IPv4Address
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
            view = read_view(ipr, (self.name, self.underlay))
            if self.name in view.links and not self._compatible(view):
                ipr.link("del", ifname=self.name)
            if not ipr.link_lookup(ifname=self.name):
                ipr.link(
                    "add",
                    ifname=self.name,
                    kind="vxlan",
                    vxlan_id=self.vni,
                    vxlan_local=str(self.local),
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
    """The lease's network address as a /32 on our device (flanneld's VTEP/TUN address)."""

    kind: ClassVar[str] = "address"
    dev: str
    address: IPv4Address

    def describe(self) -> str:
        return f"{self.address}/32 dev {self.dev}"

    def present(self, view: KernelView) -> bool:
        return (self.dev, self.address, 32) in view.addresses

    def apply(self, ipr: IPRoute) -> None:
        index = _index(ipr, self.dev)
        try:
            ipr.addr("replace", index=index, address=str(self.address), prefixlen=32)
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
                prefixlen=32,
            )


@dataclass(frozen=True)
class Route:
    """A main-table IPv4 route: via a gateway (host-gw, DirectRouting), onlink via a VTEP
    address on flannel.<VNI>, or the whole network on the TUN (scope link)."""

    kind: ClassVar[str] = "route"
    dst: IPv4Network
    gateway: IPv4Address | None = None
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
        }
        if self.gateway is not None:
            spec["gateway"] = str(self.gateway)
        if self.dev is not None:
            spec["oif"] = _index(ipr, self.dev)
        if self.onlink:
            spec["flags"] = RTNH_F_ONLINK
        elif self.gateway is None:
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
    """A permanent ARP entry: the peer's VTEP address -> its VTEP MAC."""

    kind: ClassVar[str] = "neighbour"
    dev: str
    dst: IPv4Address
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
            )


@dataclass(frozen=True)
class Fdb:
    """A permanent fdb entry on flannel.<VNI>: the peer's VTEP MAC -> its public IP."""

    kind: ClassVar[str] = "fdb"
    dev: str
    lladdr: str
    dst: IPv4Address

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
    device: str, subnet: IPv4Network, public_ip: IPv4Address, mac: str
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


def directly_reachable(address: IPv4Address) -> bool:
    """flanneld's DirectRouting test: the route to ``address`` is one hop, no gateway."""
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=str(address))
        except NetlinkError:
            return False
        return len(routes) == 1 and routes[0].get_attr("RTA_GATEWAY") is None
