"""flanneld's --ip-blackhole-route: a blackhole route in the main table for each of our
lease's subnets, so traffic for a pod address no pod holds (or any, while the bridge is
down) is dropped on this node instead of following the default route out.

As flanneld, the route is added when none exists and left in place at stop (like the
kernel datapaths' routes): the subnet stays ours across a restart. Unlike flanneld, the
IPv4 one has metric 1024 (what IPv6 routes get by default, flanneld's IPv6 one too):
flanneld's IPv4 blackhole has metric 0, the same as the pod bridge's connected route,
and the kernel then uses whichever came first, so a bridge address added after it
(the first pod on a fresh node) leaves every pod unreachable (tests/netns show both)."""

from __future__ import annotations

import socket
from ipaddress import IPv4Network, IPv6Network

from overlay.kernel.objects import KernelError
from overlay.kernel.rtnl import RT_TABLE_MAIN
from tun.rtnl import IPRoute, NetlinkError

RTN_BLACKHOLE = 6
METRIC = 1024  # above the connected route of the pod bridge (0 for IPv4, 256 for IPv6)


def has_blackhole_route(ipr: IPRoute, subnet: IPv4Network | IPv6Network) -> bool:
    family = socket.AF_INET if subnet.version == 4 else socket.AF_INET6
    for route in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
        if (
            route["type"] == RTN_BLACKHOLE
            and route["dst_len"] == subnet.prefixlen
            and route.get_attr("RTA_DST") == str(subnet.network_address)
        ):
            return True
    return False


def add_blackhole_routes(subnets: list[IPv4Network | IPv6Network]) -> list[str]:
    """A blackhole route for each subnet that has none yet; the ones added."""
    added: list[str] = []
    with IPRoute() as ipr:
        for subnet in subnets:
            if has_blackhole_route(ipr, subnet):
                continue
            try:
                ipr.route(
                    "add",
                    dst=str(subnet.network_address),
                    dst_len=subnet.prefixlen,
                    type=RTN_BLACKHOLE,
                    table=RT_TABLE_MAIN,
                    priority=METRIC,
                    family=socket.AF_INET if subnet.version == 4 else socket.AF_INET6,
                )
            except NetlinkError as e:
                raise KernelError(e.code, f"blackhole route {subnet}: {e}") from None
            added.append(str(subnet))
    return added
