"""Kernel objects the daemon programs, as values that can be applied, checked and removed.

flanneld's recipe, per remote lease: for vxlan a permanent neighbour entry (the peer's
VTEP address -> its VTEP MAC), a permanent fdb entry (that MAC -> the peer's public IP)
and an onlink route for the peer's subnet via its VTEP address; for host-gw (and vxlan
DirectRouting) a plain route via the peer's public IP. Per node: the vxlan device
``flannel.<VNI>`` (IPv6: ``flannel-v6.<VNI>``) or the TUN, its link settings, its /32
(/128) address and (TUN) the route for the whole network. Every object takes either
family; a view holds the IPv6 state when it was read with ``ipv6``.

Each object is a small frozen dataclass with ``apply`` (idempotent: replace), ``remove``
(a piece that is already gone is fine) and ``present`` against a ``KernelView``, one
dump of the kernel's links, addresses, routes, neighbours and fdb entries, so checking
a whole node costs five netlink dumps however many peers it has, and one dictionary
probe per object. The per-peer objects (routes, neighbours, fdb entries) are
``batched``: their ``request`` is one rtnetlink message (``overlay.kernel.rtnl``), and a
``Session`` sends thousands of them in a few system calls. Synchronous: pyroute2's
IPRoute refuses to run inside an event loop, so the daemon calls these from one thread.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, ClassVar, Protocol, TypeVar, cast

from overlay.kernel import rtnl
from overlay.kernel.rtnl import FdbKey, NeighbourKey, Request, RouteKey, Rtnl
from tun.rtnl import IPRoute, NetlinkError

IFF_UP = 1
ENOENT, ESRCH, ENODEV = 2, 3, 19
GONE = (ENOENT, ESRCH, ENODEV)

# Either family: flannel.<VNI> carries IPv4, flannel-v6.<VNI> IPv6, host-gw routes both.
IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
# A route on whichever device: (family, destination, length, gateway, onlink).
RouteAnyKey = tuple[int, int, int, int | None, bool]


def _family(address: IPAddress | IPNetwork) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


class KernelError(OSError):
    """A netlink change failed; the message names the object and the step. ``failed``:
    how many objects (a batch reports all its failures in one error)."""

    failed = 1


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


def describe_route(dst: IPNetwork, gateway: IPAddress | None, dev: str | None, onlink: bool) -> str:
    via = f" via {gateway}" if gateway else ""
    on = f" dev {dev}" if dev else ""
    return f"{dst}{via}{on}{' onlink' if onlink else ''}"


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass
class KernelView:
    """One dump of the kernel state the objects below are checked against. Entries are
    kept as the kernel gives them (packed addresses, integers, device indexes), the way
    the objects look themselves up: a check is a set probe per object."""

    links: dict[str, LinkInfo] = field(default_factory=dict)
    addresses: set[tuple[str, IPAddress, int]] = field(default_factory=set)
    routes: set[RouteKey] = field(default_factory=set)
    neighbours: set[NeighbourKey] = field(default_factory=set)  # permanent ones, our devices
    fdb: set[FdbKey] = field(default_factory=set)
    indexes: dict[str, int] = field(default_factory=dict)  # our devices' names -> index

    @cached_property
    def routes_any(self) -> set[RouteAnyKey]:
        """The routes without their device, for routes wanted on whichever one."""
        return {(family, dst, size, gw, onlink) for family, dst, size, gw, _, onlink in self.routes}

    def describe_route(self, route: RouteKey) -> str:
        family, dst, size, gateway, oif, onlink = route
        names = {index: name for name, index in self.indexes.items()}
        dev = names.get(oif, f"#{oif}") if oif is not None else None
        via = _address(family, gateway) if gateway is not None else None
        return describe_route(ip_network((_address(family, dst), size)), via, dev, onlink)


def _address(family: int, value: int) -> IPAddress:
    """An address of a route key (an int) back as an address of its family."""
    return IPv4Address(value) if family == socket.AF_INET else IPv6Address(value)


@dataclass
class Claimed:
    """What a set of wanted objects covers, as a view holds it (devices by index):
    anything else on our devices is extra (``overlay.kernel.reconcile``)."""

    routes: set[RouteKey] = field(default_factory=set)
    routes_any: set[RouteAnyKey] = field(default_factory=set)
    neighbours: set[NeighbourKey] = field(default_factory=set)
    fdb: set[FdbKey] = field(default_factory=set)
    addresses: set[tuple[str, IPAddress]] = field(default_factory=set)
    owners: dict[Hashable, KernelObject] = field(default_factory=dict)  # key -> its object

    def missing(self, view: KernelView) -> list[KernelObject]:
        """The claimed routes, neighbours and fdb entries the view lacks (set differences:
        a check of thousands costs what C takes to compare them)."""
        absent = [
            *(self.routes - view.routes),
            *(self.neighbours - view.neighbours),
            *(self.fdb - view.fdb),
        ]
        if self.routes_any:
            absent += self.routes_any - view.routes_any
        return [self.owners[key] for key in absent]


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


class Batchable(Protocol):
    def request(self, session: Session, add: bool) -> Request: ...


B = TypeVar("B", bound=Batchable)


class Session:
    """The netlink of one batch of changes or one check: the worker's raw socket for
    the per-peer objects, pyroute2 (opened on first use, closed by ``close``) for links
    and addresses, and device indexes looked up once."""

    def __init__(self, socket: Rtnl) -> None:
        self.rtnl = socket
        self._ipr: IPRoute | None = None
        self._indexes: dict[str, int] = {}

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def index(self, name: str) -> int:
        """The device's index (DeviceGone when it does not exist)."""
        found = self._indexes.get(name)
        if found is None:
            indexes = self.ipr.link_lookup(ifname=name)
            if not indexes:
                raise DeviceGone(ENODEV, f"link {name} does not exist")
            found = self._indexes[name] = int(indexes[0])
        return found

    def forget_indexes(self) -> None:
        """After a device was made again: its index changed."""
        self._indexes.clear()

    def run(self, changes: Sequence[tuple[B, bool]]) -> list[tuple[B, int]]:
        """Batched objects applied (True) or removed (False), in order, in as few system
        calls as the kernel takes; the ones that failed, with their errno. A removal
        of something already gone (or whose device is gone) is no failure."""
        sent: list[tuple[B, bool]] = []
        requests: list[Request] = []
        failed: list[tuple[B, int]] = []
        for obj, add in changes:
            try:
                requests.append(obj.request(self, add))
            except DeviceGone:
                if add:
                    failed.append((obj, ENODEV))
                continue
            sent.append((obj, add))
        for (obj, add), code in zip(sent, self.rtnl.run(requests), strict=True):
            if code and (add or code not in GONE):
                failed.append((obj, code))
        return failed


def read_links(session: Session, devices: Iterable[str]) -> dict[str, LinkInfo]:
    """The links of these names that exist (fetched by name: a full link dump of a node
    with many pods costs tens of milliseconds of pyroute2 parsing)."""
    links: dict[str, LinkInfo] = {}
    for name in sorted(set(devices)):
        try:
            (link,) = session.ipr.link("get", ifname=name)
        except NetlinkError as e:
            if e.code in GONE:
                continue
            raise
        links[name] = _link_info(link)
    return links


def read_view(session: Session, devices: Iterable[str], ipv6: bool = False) -> KernelView:
    """The kernel's state as far as ``devices`` (the names our objects use) are concerned:
    their links, addresses, neighbours and fdb entries, and the whole main routing table;
    with ``ipv6``, the IPv6 ones too (without the fe80:: addresses and the routes the
    kernel makes itself on every device)."""
    view = KernelView(links=read_links(session, devices))
    view.indexes = {name: link.index for name, link in view.links.items()}
    names = {index: name for name, index in view.indexes.items()}
    families = (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,)
    for family in families:
        for addr in session.ipr.get_addr(family=family):
            dev = names.get(addr["index"])
            address = ip_address(addr.get_attr("IFA_ADDRESS"))
            if dev is not None and not (address.version == 6 and address.is_link_local):
                view.addresses.add((dev, address, int(addr["prefixlen"])))
        view.routes |= session.rtnl.routes(family)
        view.neighbours |= session.rtnl.neighbours(set(names), family)
    for link in view.links.values():
        if link.kind == "vxlan":  # fdb entries with a remote (dst) only exist on vxlan devices
            view.fdb |= session.rtnl.fdb(link.index)
    return view


def _tolerant(step: str, call: Any, *args: Any, **kwargs: Any) -> None:
    """A removal: an object (or its device) that is already gone is fine."""
    try:
        call(*args, **kwargs)
    except NetlinkError as e:
        if e.code not in GONE:
            raise KernelError(e.code, f"{step}: {e}") from None


# -- the objects ---------------------------------------------------------------------------


class _Single:
    """An object applied with pyroute2, one call at a time (a node has a few)."""

    batched: ClassVar[bool] = False

    def claim(self, claimed: Claimed, indexes: dict[str, int]) -> None:
        """Nothing a check could find extra is this object's."""

    def request(self, session: Session, add: bool) -> Request:
        raise NotImplementedError(f"{type(self).__name__} is not batched")


class _Batched:
    """An object that is one rtnetlink message: applied and removed through the batch
    (a batch of one, when alone)."""

    batched: ClassVar[bool] = True

    def request(self, session: Session, add: bool) -> Request:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def _one(self, session: Session, add: bool) -> None:
        failed = session.run([(self, add)])
        if failed:
            code = failed[0][1]
            step = "" if add else "removing "
            raise KernelError(code, f"{step}{self.describe()}: {_strerror(code)}")

    def apply(self, session: Session) -> None:
        self._one(session, True)

    def remove(self, session: Session) -> None:
        self._one(session, False)


def _strerror(code: int) -> str:
    try:
        return os.strerror(code)
    except ValueError:
        return f"error {code}"


@dataclass(frozen=True)
class VxlanDevice(_Single):
    """``flannel.<VNI>`` (``flannel-v6.<VNI>``: an IPv6 ``local``) as flanneld creates
    it: learning off (unless Backend.Learning), our local address, the underlay as its
    link. A device of that name with other parameters is deleted and recreated, as
    flanneld does."""

    kind: ClassVar[str] = "vxlan_device"
    name: str
    vni: int
    local: IPAddress
    underlay: str
    port: int
    learning: bool = False

    def describe(self) -> str:
        return f"{self.name} (vxlan id {self.vni} local {self.local} dstport {self.port})"

    def devices(self) -> tuple[str, ...]:
        return (self.name, self.underlay)

    def _compatible(self, links: dict[str, LinkInfo]) -> bool:
        link = links.get(self.name)
        under = links.get(self.underlay)
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
        return self._compatible(view.links)

    def apply(self, session: Session) -> None:
        ipr = session.ipr
        try:
            links = read_links(session, (self.name, self.underlay))
            if self.name in links and not self._compatible(links):
                ipr.link("del", ifname=self.name)
            if not ipr.link_lookup(ifname=self.name):
                local = "vxlan_local" if self.local.version == 4 else "vxlan_local6"
                ipr.link(
                    "add",
                    ifname=self.name,
                    kind="vxlan",
                    vxlan_id=self.vni,
                    **{local: str(self.local)},
                    vxlan_link=session.index(self.underlay),
                    vxlan_port=self.port,
                    vxlan_learning=int(self.learning),
                )
        except NetlinkError as e:
            raise KernelError(e.code, f"creating vxlan device {self.name}: {e}") from None
        finally:
            session.forget_indexes()  # a new device has a new index

    def remove(self, session: Session) -> None:
        _tolerant(f"deleting {self.name}", session.ipr.link, "del", ifname=self.name)


@dataclass(frozen=True)
class Link(_Single):
    """A device's MTU (and MAC), up."""

    kind: ClassVar[str] = "link"
    dev: str
    mtu: int
    mac: str | None = None

    def describe(self) -> str:
        mac = f" address {self.mac}" if self.mac else ""
        return f"{self.dev} up mtu {self.mtu}{mac}"

    def devices(self) -> tuple[str, ...]:
        return (self.dev,)

    def present(self, view: KernelView) -> bool:
        link = view.links.get(self.dev)
        return (
            link is not None
            and link.up
            and link.mtu == self.mtu
            and (self.mac is None or link.mac == self.mac.lower())
        )

    def apply(self, session: Session) -> None:
        index = session.index(self.dev)
        try:
            settings: dict[str, Any] = {"mtu": self.mtu}
            if self.mac:
                settings["address"] = self.mac
            session.ipr.link("set", index=index, **settings)
            session.ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise KernelError(e.code, f"setting up {self.dev}: {e}") from None

    def remove(self, session: Session) -> None:
        """A link's settings are not undone (the device goes with its owner)."""


@dataclass(frozen=True)
class Address(_Single):
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

    def devices(self) -> tuple[str, ...]:
        return (self.dev,)

    def present(self, view: KernelView) -> bool:
        return (self.dev, self.address, self.prefixlen) in view.addresses

    def claim(self, claimed: Claimed, indexes: dict[str, int]) -> None:
        claimed.addresses.add((self.dev, self.address))

    def apply(self, session: Session) -> None:
        index = session.index(self.dev)
        try:
            session.ipr.addr(
                "replace",
                index=index,
                address=str(self.address),
                prefixlen=self.prefixlen,
                family=_family(self.address),
            )
        except NetlinkError as e:
            raise KernelError(e.code, f"address {self.describe()}: {e}") from None

    def remove(self, session: Session) -> None:
        try:
            index = session.index(self.dev)
        except DeviceGone:
            return
        _tolerant(
            f"removing {self.describe()}",
            session.ipr.addr,
            "del",
            index=index,
            address=str(self.address),
            prefixlen=self.prefixlen,
            family=_family(self.address),
        )


@dataclass(frozen=True)
class Route(_Batched):
    """A main-table route: via a gateway (host-gw, DirectRouting), onlink via a VTEP
    address on flannel.<VNI> (flannel-v6.<VNI>), or the whole network on the TUN (scope
    link)."""

    kind: ClassVar[str] = "route"
    dst: IPNetwork
    gateway: IPAddress | None = None
    dev: str | None = None
    onlink: bool = False
    # The route's own MTU, below its device's (the TUN's IPv6 network: vxlan over an IPv6
    # underlay costs 20 bytes more); 0: the device's. Made with the route (NLM_F_REPLACE);
    # the check finds the route by its key, whatever its MTU.
    mtu: int = 0

    def describe(self) -> str:
        text = describe_route(self.dst, self.gateway, self.dev, self.onlink)
        return f"{text} mtu {self.mtu}" if self.mtu else text

    def devices(self) -> tuple[str, ...]:
        return (self.dev,) if self.dev else ()

    @cached_property
    def _any(self) -> RouteAnyKey:
        """(family, destination, length, gateway, onlink): the route on whichever device."""
        gateway = int(self.gateway) if self.gateway is not None else None
        dst = int(self.dst.network_address)
        return _family(self.dst), dst, self.dst.prefixlen, gateway, self.onlink

    def _key(self, indexes: dict[str, int]) -> RouteKey:
        family, dst, size, gateway, onlink = self._any
        oif = indexes.get(self.dev, -1) if self.dev else None
        return family, dst, size, gateway, oif, onlink

    def present(self, view: KernelView) -> bool:
        if self.dev is None:
            return self._any in view.routes_any
        return self._key(view.indexes) in view.routes

    def claim(self, claimed: Claimed, indexes: dict[str, int]) -> None:
        if self.dev is None:
            claimed.routes_any.add(self._any)
            claimed.owners.setdefault(self._any, self)
        else:
            key = self._key(indexes)
            claimed.routes.add(key)
            claimed.owners.setdefault(key, self)

    def request(self, session: Session, add: bool) -> Request:
        return rtnl.route_request(
            add,
            self.dst.network_address.packed,
            self.dst.prefixlen,
            gateway=self.gateway.packed if self.gateway is not None else None,
            oif=session.index(self.dev) if self.dev is not None else None,
            onlink=self.onlink,
            mtu=self.mtu,
        )


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


class _DeviceEntry(_Batched):
    """A neighbour or an fdb entry: a device's (address, MAC) pair, found in the view's and
    the claims' set named ``table`` under ``_key``."""

    table: ClassVar[str]  # "neighbours" or "fdb"
    dev: str
    lladdr: str
    dst: IPAddress

    def devices(self) -> tuple[str, ...]:
        return (self.dev,)

    @cached_property
    def _lladdr(self) -> bytes:
        return _mac_bytes(self.lladdr)

    @cached_property
    def _dst(self) -> bytes:
        return self.dst.packed

    def _key(self, indexes: dict[str, int]) -> tuple[int, bytes, bytes]:
        raise NotImplementedError

    def present(self, view: KernelView) -> bool:
        found: set[tuple[int, bytes, bytes]] = getattr(view, self.table)
        return self._key(view.indexes) in found

    def claim(self, claimed: Claimed, indexes: dict[str, int]) -> None:
        key = self._key(indexes)
        mine: set[tuple[int, bytes, bytes]] = getattr(claimed, self.table)
        mine.add(key)
        claimed.owners.setdefault(key, cast("KernelObject", self))  # Neighbour or Fdb


@dataclass(frozen=True)
class Neighbour(_DeviceEntry):
    """A permanent ARP (IPv6: neighbour discovery) entry: the peer's VTEP address -> its
    VTEP MAC."""

    kind: ClassVar[str] = "neighbour"
    table: ClassVar[str] = "neighbours"
    dev: str
    dst: IPAddress
    lladdr: str

    def describe(self) -> str:
        return f"{self.dst} lladdr {self.lladdr} dev {self.dev} permanent"

    def _key(self, indexes: dict[str, int]) -> NeighbourKey:
        return indexes.get(self.dev, -1), self._dst, self._lladdr

    def request(self, session: Session, add: bool) -> Request:
        return rtnl.neighbour_request(add, session.index(self.dev), self._dst, self._lladdr)


@dataclass(frozen=True)
class Fdb(_DeviceEntry):
    """A permanent fdb entry on flannel.<VNI> (flannel-v6.<VNI>): the peer's VTEP MAC ->
    its public IP (PublicIPv6)."""

    kind: ClassVar[str] = "fdb"
    table: ClassVar[str] = "fdb"
    dev: str
    lladdr: str
    dst: IPAddress

    def describe(self) -> str:
        return f"{self.lladdr} dst {self.dst} dev {self.dev} self permanent"

    def _key(self, indexes: dict[str, int]) -> FdbKey:
        return indexes.get(self.dev, -1), self._lladdr, self._dst

    def request(self, session: Session, add: bool) -> Request:
        return rtnl.fdb_request(add, session.index(self.dev), self._lladdr, self._dst)


KernelObject = VxlanDevice | Link | Address | Route | Neighbour | Fdb


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

# Whether a peer's public IP is on our L2 segment (flanneld's DirectRouting test).
Reachable = Callable[[IPAddress], bool]


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


def directly_reachable(session: Session, addresses: Iterable[IPAddress]) -> set[IPAddress]:
    """flanneld's DirectRouting test for many addresses (either family) at once (``ip
    route get``, one message each, sent together): those whose route is one hop without
    a gateway."""
    wanted = list(set(addresses))
    answers = session.rtnl.route_get([address.packed for address in wanted])
    return {
        address
        for address, route in zip(wanted, answers, strict=True)
        if route is not None and route.gateway is None and not route.multipath
    }
