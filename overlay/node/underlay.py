"""The interface for inter-node traffic, chosen in flanneld's order.

With none of ``--iface``, ``--iface-regex``, ``--iface-can-reach``: the interface that
has ``--public-ip`` if it is a local address, else the default route's interface, else
the only one there is. With them: each ``--iface`` (a name or an address) in turn, then
each ``--iface-regex`` (matched against every interface's IPv4 addresses first, then its
IPv6 addresses, then the names, as flanneld does for each family), then the interface of
the route to ``--iface-can-reach`` (with that route's source address; an IPv6 target
gives the IPv6 one); the first match wins. An IPv6 address matched by a regex or taken
as a route's source is the IPv6 address used.

Its IPv6 address (for EnableIPv6) is flanneld's choice too: an ``--iface`` given as an
IPv6 address picks that address (and its interface), else the interface's first global
unicast IPv6 address (ULA included, as Go's IsGlobalUnicast), else its first link-local.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from overlay.backends.base import Underlay
from tun import netlink

Addresses = dict[str, list[tuple[IPv4Address, int]]]
# The IPv4 address of an interface that has none (an IPv6-only underlay, for an IPv6-only
# network: flanneld's ExtAddr is then nil and its leases say PublicIP 0.0.0.0).
NO_ADDRESS = IPv4Address("0.0.0.0")


class UnderlayError(Exception):
    """No usable interface; the message says which flags were tried."""


def _preferred(addrs: list[tuple[IPv4Address, int]]) -> IPv4Address:
    """An interface's first global address, else its first (link-local) one."""
    return next((a for a, _ in addrs if not a.is_link_local), addrs[0][0])


def _ipv4_of(addresses: Addresses, name: str) -> IPv4Address:
    """Interface ``name``'s preferred IPv4 address, or NO_ADDRESS (IPv6 only)."""
    found = addresses.get(name)
    return _preferred(found) if found else NO_ADDRESS


def _by_name_or_address(
    addresses: Addresses, wanted: str, addresses6: dict[str, list[IPv6Address]]
) -> tuple[str, IPv4Address] | None:
    """An interface by name or address; one with IPv6 addresses only is taken too (its
    IPv4 address NO_ADDRESS: the config says later whether IPv4 is needed)."""
    for name, found6 in addresses6.items():
        if wanted in map(str, found6):
            return name, _ipv4_of(addresses, name)
    for name, addrs in addresses.items():
        for address, _ in addrs:
            if str(address) == wanted:
                return name, address
    if addresses.get(wanted) or _global6(addresses6.get(wanted, [])):
        return wanted, _ipv4_of(addresses, wanted)
    return None


def _global6(found: list[IPv6Address]) -> list[IPv6Address]:
    return [a for a in found if not (a.is_link_local or a.is_loopback or a.is_multicast)]


# (interface, its IPv4 address or NO_ADDRESS, the IPv6 address picked with it or None)
Chosen = tuple[str, IPv4Address, IPv6Address | None]


def _by_regex(
    addresses: Addresses, pattern: str, addresses6: dict[str, list[IPv6Address]]
) -> Chosen | None:
    regex = re.compile(pattern)
    for name, addrs in addresses.items():
        for address, _ in addrs:
            if regex.search(str(address)):
                return name, address, None
    for name, found6 in addresses6.items():
        for address6 in found6:
            if regex.search(str(address6)):
                return name, _ipv4_of(addresses, name), address6
    for name in [*addresses, *(n for n in addresses6 if n not in addresses)]:
        usable = addresses.get(name) or _global6(addresses6.get(name, []))
        if usable and regex.search(name):
            return name, _ipv4_of(addresses, name), None
    return None


def _by_route(
    addresses: Addresses,
    target: IPv4Address | IPv6Address,
    addresses6: dict[str, list[IPv6Address]],
) -> Chosen | None:
    found = netlink.route_to(target)
    if found is None:
        return None
    name, source = found
    if isinstance(source, IPv6Address):  # an IPv6 target: the route's IPv6 source
        return (name, _ipv4_of(addresses, name), source) if addresses6.get(name) else None
    addrs = addresses.get(name)
    if not addrs:
        return None
    if source is not None and any(a == source for a, _ in addrs):
        return name, source, None
    return name, _preferred(addrs), None


@dataclass(frozen=True)
class UnderlayOptions:
    """How the operator asked for the interface (flanneld's --iface flags)."""

    iface: tuple[str, ...] = ()  # names or addresses, the first that exists wins
    iface_regex: tuple[str, ...] = ()  # matched against addresses, then names
    iface_can_reach: IPv4Address | IPv6Address | None = None  # the interface of the route to it
    public_ip: IPv4Address | None = None  # what peers send to, if not the address
    public_ipv6: IPv6Address | None = None  # the same for IPv6 (EnableIPv6)


def _preferred6(
    name: str, addresses6: dict[str, list[IPv6Address]], wanted: tuple[str, ...]
) -> IPv6Address | None:
    """The IPv6 address of interface ``name``: one given as --iface, else the first
    global unicast one, else the first link-local one."""
    found = addresses6.get(name, [])
    for address in found:
        if str(address) in wanted:
            return address
    usable = [a for a in found if not (a.is_loopback or a.is_multicast or a.is_unspecified)]
    return next((a for a in usable if not a.is_link_local), usable[0] if usable else None)


def select_underlay(args: UnderlayOptions) -> Underlay:
    """The Underlay ``args`` ask for."""
    addresses = netlink.interface_addresses()
    addresses6 = netlink.interface_ipv6_addresses()
    chosen: tuple[str, IPv4Address] | None = None
    picked6: IPv6Address | None = None  # by a regex or as a route's source
    if args.iface or args.iface_regex or args.iface_can_reach:
        for wanted in args.iface:
            if chosen := _by_name_or_address(addresses, wanted, addresses6):
                break
        for pattern in args.iface_regex if chosen is None else ():
            if by_regex := _by_regex(addresses, pattern, addresses6):
                chosen, picked6 = by_regex[:2], by_regex[2]
                break
        if chosen is None and args.iface_can_reach is not None:
            if by_route := _by_route(addresses, args.iface_can_reach, addresses6):
                chosen, picked6 = by_route[:2], by_route[2]
        if chosen is None:
            tried = [f"--iface {x}" for x in args.iface]
            tried += [f"--iface-regex {x}" for x in args.iface_regex]
            if args.iface_can_reach is not None:
                tried.append(f"--iface-can-reach {args.iface_can_reach}")
            raise UnderlayError(f"no interface with an address matches {', '.join(tried)}")
    elif args.public_ip is not None:
        chosen = _by_name_or_address(addresses, str(args.public_ip), {})
    if chosen is None:
        candidates = [name for name, addrs in addresses.items() if name != "lo" and addrs]
        candidates += [
            name
            for name, found6 in addresses6.items()
            if name != "lo" and name not in candidates and _global6(found6)
        ]
        default = netlink.default_route_interface()
        if default and addresses.get(default):
            chosen = (default, _preferred(addresses[default]))
        elif len(candidates) == 1:
            chosen = (candidates[0], _ipv4_of(addresses, candidates[0]))
        else:
            found = ", ".join(candidates) or "none"
            raise UnderlayError(
                f"cannot choose an interface (no default route; have {found}): use --iface"
            )
    name, address = chosen
    wanted6 = (*args.iface, *((str(picked6),) if picked6 is not None else ()))
    address6 = _preferred6(name, addresses6, wanted6)
    return Underlay(
        name,
        address,
        args.public_ip or address,
        netlink.interface_mtu(name),
        address6=address6,
        public_ipv6=args.public_ipv6 or address6,
    )
