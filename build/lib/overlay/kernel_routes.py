"""Kernel state the vxlan (kernel datapath) and host-gw backends program, through pyroute2.

flanneld's recipe, per remote lease: for vxlan a permanent neighbour entry (the peer's
VTEP address -> its VTEP MAC), a permanent fdb entry (that MAC -> the peer's public IP)
and an onlink route for the peer's subnet via its VTEP address; for host-gw (and vxlan
DirectRouting) a plain route via the peer's public IP. Synchronous: pyroute2's IPRoute
refuses to run inside an event loop, so the daemon calls these from one worker thread.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
ENOENT, ESRCH, ENODEV = 2, 3, 19


class KernelError(OSError):
    """A netlink change failed; the message names the object and the step."""


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise KernelError(f"link {name} does not exist")
    return int(found[0])


def ensure_vxlan_device(
    name: str,
    *,
    vni: int,
    local: IPv4Address,
    underlay: str,
    port: int,
    mac: str,
    address: IPv4Address,
    mtu: int,
) -> None:
    """Create (or reuse) ``flannel.<VNI>`` the way flanneld does: learning off, our MAC,
    the lease's network address as a /32, MTU underlay - 50, up."""
    with IPRoute() as ipr:
        try:
            if not ipr.link_lookup(ifname=name):
                ipr.link(
                    "add",
                    ifname=name,
                    kind="vxlan",
                    vxlan_id=vni,
                    vxlan_local=str(local),
                    vxlan_link=_index(ipr, underlay),
                    vxlan_port=port,
                    vxlan_learning=0,
                )
            index = _index(ipr, name)
            ipr.link("set", index=index, address=mac, mtu=mtu)
            ipr.addr("replace", index=index, address=str(address), prefixlen=32)
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise KernelError(f"setting up vxlan device {name}: {e}") from None


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


def add_vxlan_peer(device: str, subnet: IPv4Network, public_ip: IPv4Address, mac: str) -> None:
    vtep = str(subnet.network_address)
    with IPRoute() as ipr:
        index = _index(ipr, device)
        try:
            ipr.neigh("replace", ifindex=index, dst=vtep, lladdr=mac, state=NUD_PERMANENT)
            ipr.fdb(
                "replace",
                ifindex=index,
                lladdr=mac,
                dst=str(public_ip),
                state=NUD_PERMANENT,
                flags=NTF_SELF,
            )
            ipr.route(
                "replace",
                dst=str(subnet.network_address),
                dst_len=subnet.prefixlen,
                gateway=vtep,
                oif=index,
                flags=4,  # RTNH_F_ONLINK
            )
        except NetlinkError as e:
            raise KernelError(f"programming vxlan peer {subnet} on {device}: {e}") from None


def del_vxlan_peer(device: str, subnet: IPv4Network, public_ip: IPv4Address, mac: str) -> None:
    """Remove what add_vxlan_peer made; a piece that is already gone is fine."""
    vtep = str(subnet.network_address)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=device)
        if not found:
            return
        index = found[0]
        steps = (
            lambda: ipr.route(
                "del", dst=str(subnet.network_address), dst_len=subnet.prefixlen, oif=index
            ),
            lambda: ipr.fdb("del", ifindex=index, lladdr=mac, dst=str(public_ip)),
            lambda: ipr.neigh("del", ifindex=index, dst=vtep, lladdr=mac),
        )
        for step in steps:
            try:
                step()
            except NetlinkError as e:
                if e.code not in (ENOENT, ESRCH, ENODEV):
                    raise KernelError(f"removing vxlan peer {subnet}: {e}") from None


def add_direct_route(subnet: IPv4Network, via: IPv4Address) -> None:
    with IPRoute() as ipr:
        try:
            ipr.route(
                "replace",
                dst=str(subnet.network_address),
                dst_len=subnet.prefixlen,
                gateway=str(via),
            )
        except NetlinkError as e:
            raise KernelError(f"route {subnet} via {via}: {e}") from None


def del_direct_route(subnet: IPv4Network, via: IPv4Address) -> None:
    with IPRoute() as ipr:
        try:
            ipr.route(
                "del", dst=str(subnet.network_address), dst_len=subnet.prefixlen, gateway=str(via)
            )
        except NetlinkError as e:
            if e.code not in (ENOENT, ESRCH):
                raise KernelError(f"removing route {subnet} via {via}: {e}") from None


def directly_reachable(address: IPv4Address) -> bool:
    """flanneld's DirectRouting test: the route to ``address`` is one hop, no gateway."""
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=str(address))
        except NetlinkError:
            return False
        return len(routes) == 1 and routes[0].get_attr("RTA_GATEWAY") is None
