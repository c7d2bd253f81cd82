"""Address, MTU, link state and routes of the TUN device, through pyroute2 (no `ip`).

Synchronous on purpose: pyroute2's IPRoute refuses to run inside a running event loop
and its async variant fails under uvloop, so the daemon calls these via to_thread.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


class LinkError(OSError):
    """A netlink operation on a link failed; the message names the link and the step."""


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LinkError(f"link {name} does not exist")
    return int(found[0])


def configure_tun(name: str, address: IPv4Address, mtu: int, network: IPv4Network) -> None:
    """flannel0: ``address``/32, MTU, up, and one route for the whole overlay network."""
    _disable_ipv6(name)
    _accept_local(name)
    with IPRoute() as ipr:
        index = _index(ipr, name)
        try:
            ipr.link("set", index=index, mtu=mtu, txqlen=10000)
            ipr.addr("replace", index=index, address=str(address), prefixlen=32)
            ipr.link("set", index=index, state="up")
            ipr.route(
                "replace",
                dst=str(network.network_address),
                dst_len=network.prefixlen,
                oif=index,
                scope="link",
            )
        except NetlinkError as e:
            raise LinkError(f"configuring {name}: {e}") from None


def _disable_ipv6(name: str) -> None:
    """The overlay is IPv4 only: keep the kernel from sending IPv6 router solicitations."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass  # no IPv6 in this kernel or namespace: nothing to disable


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
