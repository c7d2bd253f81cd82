"""Address, MTU, link state and routes of the TUN device, through pyroute2 (no `ip`).

Synchronous on purpose: pyroute2's IPRoute refuses to run inside a running event loop
and its async variant fails under uvloop, so the daemon calls these via to_thread.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

from tun.rtnl import IPRoute, NetlinkError


class LinkError(OSError):
    """A netlink operation on a link failed; the message names the link and the step."""


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LinkError(f"link {name} does not exist")
    return int(found[0])


def prepare_tun(name: str, *, ipv6: bool = False) -> None:
    """What flannel0 needs before its address, MTU and route (``overlay.kernel.objects``):
    no IPv6 (with ``ipv6``, IPv6 without a link-local address or router solicitations:
    the overlay's IPv6 half needs only the lease's address), and a transmit queue long
    enough for a burst of TUN writes."""
    if ipv6:
        _quiet_ipv6(name)
    else:
        _disable_ipv6(name)
    _accept_local(name)
    with IPRoute() as ipr:
        index = _index(ipr, name)
        try:
            ipr.link("set", index=index, txqlen=10000)
        except NetlinkError as e:
            raise LinkError(f"configuring {name}: {e}") from None


def _disable_ipv6(name: str) -> None:
    """The overlay is IPv4 only: keep the kernel from sending IPv6 router solicitations."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass  # no IPv6 in this kernel or namespace: nothing to disable


def _quiet_ipv6(name: str) -> None:
    """IPv6 on, but nothing of the kernel's own in the TUN: no link-local address (so
    no MLD reports or duplicate address detection) and no router solicitations."""
    for setting, value in (("disable_ipv6", "0"), ("addr_gen_mode", "1"), ("accept_ra", "0")):
        with open(f"/proc/sys/net/ipv6/conf/{name}/{setting}", "w") as f:
            f.write(value)


def _accept_local(name: str) -> None:
    """Let the kernel take packets from the TUN whose source is one of our addresses: the
    ICMP net-unreachable the dataplane writes back comes from the TUN's own address (as
    flanneld's proxy sends it), which the kernel otherwise drops as a martian source
    (checked on Linux 6.x with rp_filter 0, 1 and 2). Nothing else arrives on flannel0
    with our address as its source: received datagrams whose inner source is outside the
    sending peer's subnet are dropped before the TUN (rx_foreign_source)."""
    with open(f"/proc/sys/net/ipv4/conf/{name}/accept_local", "w") as f:
        f.write("1")


def link_stats(name: str) -> dict[str, int] | None:
    """The kernel's 64-bit counters of link ``name`` (IFLA_STATS64), None if it is gone."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        stats = ipr.get_links(found[0])[0].get_attr("IFLA_STATS64")
        return {key: int(value) for key, value in dict(stats or {}).items()}


def interface_addresses() -> dict[str, list[tuple[IPv4Address, int]]]:
    """IPv4 addresses per interface (name -> [(address, prefixlen)])."""
    result: dict[str, list[tuple[IPv4Address, int]]] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in ipr.get_addr(family=2):
            name = names.get(addr["index"], "?")
            result.setdefault(name, []).append(
                (IPv4Address(addr.get_attr("IFA_ADDRESS")), addr["prefixlen"])
            )
    return result


IFA_F_DEPRECATED = 0x20


def interface_ipv6_addresses() -> dict[str, list[IPv6Address]]:
    """IPv6 addresses per interface, in the kernel's order, but deprecated ones (as
    flanneld skips them)."""
    result: dict[str, list[IPv6Address]] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in ipr.get_addr(family=10):
            flags = addr.get_attr("IFA_FLAGS") or addr["flags"]
            if flags & IFA_F_DEPRECATED:
                continue
            address = addr.get_attr("IFA_ADDRESS")
            result.setdefault(names.get(addr["index"], "?"), []).append(IPv6Address(address))
    return result


def interface_mtu(name: str) -> int:
    with IPRoute() as ipr:
        link = ipr.get_links(_index(ipr, name))[0]
        return int(link.get_attr("IFLA_MTU"))


def default_route_interface() -> str | None:
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=2, dst_len=0, table=254):
            oif = route.get_attr("RTA_OIF")
            if oif is not None:
                links = ipr.get_links(oif)
                if links:
                    return str(links[0].get_attr("IFLA_IFNAME"))
    return None


def route_to(
    address: IPv4Address | IPv6Address,
) -> tuple[str, IPv4Address | IPv6Address | None] | None:
    """(interface, source address) the kernel would use to reach ``address`` (what
    `ip route get` prints; of its family), or None when it has no route."""
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=str(address))
        except NetlinkError:
            return None
        if not routes:
            return None
        oif = routes[0].get_attr("RTA_OIF")
        source = routes[0].get_attr("RTA_PREFSRC")
        links = ipr.get_links(oif) if oif is not None else []
        if not links:
            return None
        name = str(links[0].get_attr("IFLA_IFNAME"))
        return name, ip_address(source) if source else None
