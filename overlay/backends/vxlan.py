"""flannel's vxlan backend, with two datapaths that speak the same wire (RFC 7348, as the
kernel's vxlan device and ``flannel.1`` do):

- userspace (the default): this process frames and unframes VXLAN on a TUN, so a node
  whose kernel has no VXLAN joins a cluster of ``flannel.1`` nodes; with EnableIPv6 it
  carries the IPv6 half too, as ``flannel-v6.<VNI>`` does (a second socket on our IPv6
  underlay address, the TUN with the lease's IPv6 address and a route for IPv6Network);
- kernel (``--kernel-vxlan``): the kernel's vxlan device ``flannel.<VNI>``, programmed as
  flanneld does (permanent neighbour + fdb entry + onlink route per peer); with
  EnableIPv6 a second one, ``flannel-v6.<VNI>``, over the IPv6 underlay, programmed the
  same way in IPv6 (its VTEP MAC published as BackendV6Data).

Both derive the VTEP MAC from the public IP and the VNI, so it is stable across restarts,
and publish it in the lease; with DirectRouting, peers on our L2 segment get a plain
route via their public IP instead of encapsulation.
"""

from __future__ import annotations

import asyncio
from typing import Any

from control.lease import Lease
from encap import vxlan
from overlay.backends.base import Backend, Context, KernelLink, Underlay
from overlay.backends.routed import (
    RoutedBackend,
    direct_route,
    direct_route6,
    ipv4_half,
    ipv6_half,
)
from overlay.backends.userspace import UserspaceBackend
from overlay.dataplane.counters import sum_ipv6_status
from overlay.dataplane.ipv6 import IPV6_EXTRA_OVERHEAD
from overlay.dataplane.spec import DataplaneSpec
from overlay.dataplane.vxlan import vtep6_mac_of, vtep_mac_of, vxlan6_prefix_for, vxlan_prefix_for
from overlay.kernel.objects import (
    Address,
    IPAddress,
    KernelObject,
    Link,
    Reachable,
    Route,
    VxlanDevice,
    vxlan_peer,
)
from overlay.kernel.reconcile import NODE, Program

# An IPv6 underlay costs 20 bytes more than an IPv4 one (the kernel's VXLAN6_HEADROOM).
IPV6_OVERHEAD = vxlan.OVERHEAD + 20


class _Vtep:
    """What both datapaths publish and derive from the config: VNI, VTEP MAC, MTU."""

    def __init__(self, ctx: Context) -> None:
        self.vni = ctx.config.backend.vni
        self.port = ctx.config.backend.port
        # Stable across restarts: derived from our public IP and the VNI.
        self.mac = vxlan.vtep_mac(str(ctx.underlay.public_ip), self.vni)
        # The IPv6 VTEP's (flannel-v6.<VNI>'s), the same way from PublicIPv6.
        public6 = ctx.underlay.public_ipv6
        self.mac6 = vxlan.vtep_mac(str(public6), self.vni) if public6 else None
        self.ipv6 = ctx.config.ipv6 is not None
        self.configured_mtu = ctx.config.backend.mtu  # flanneld's vxlan option Backend.MTU

    def mtu_for(self, underlay: Underlay) -> int:
        """Backend.MTU when the config sets it, else underlay - 50."""
        return self.configured_mtu or underlay.mtu - vxlan.OVERHEAD

    def mtu6_for(self, underlay: Underlay) -> int:
        """flannel-v6.<VNI>'s: Backend.MTU when the config sets it, else underlay - 70."""
        return self.configured_mtu or underlay.mtu - IPV6_OVERHEAD

    def lease_data(self) -> dict[str, Any]:
        return {"VNI": self.vni, "VtepMAC": vxlan.format_mac(self.mac)}

    def lease_v6_data(self) -> dict[str, Any] | None:
        """BackendV6Data, as flanneld publishes flannel-v6's VNI and MAC (EnableIPv6)."""
        if not self.ipv6 or self.mac6 is None:
            return None
        return {"VNI": self.vni, "VtepMAC": vxlan.format_mac(self.mac6)}


def _mtu_warning(backend: Backend) -> list[dict[str, Any]]:
    """Backend.MTU larger than the underlay leaves room for: said once at start."""
    options, room = backend.ctx.config.backend, backend.ctx.underlay.mtu - vxlan.OVERHEAD
    if options.mtu is None or options.mtu <= room:
        return []
    return [
        {
            "event": "mtu_too_large",
            "mtu": options.mtu,
            "underlay_allows": room,
            "effect": "encapsulated packets exceed the underlay MTU and are fragmented",
        }
    ]


def ipv6_route_mtu(tun_mtu: int) -> int:
    """The MTU of the TUN's route for IPv6Network: the TUN's (the IPv4 half's, underlay -
    50) less the 20 bytes an IPv6 underlay header adds, what the IPv6 half forwards at most
    (flannel-v6.<VNI>'s underlay - 70). The kernel then sizes this node's own IPv6 TCP
    segments (MSS) to it and answers a longer forwarded packet itself, so no connection
    sends a first window our dataplane has to refuse with packet-too-big."""
    return tun_mtu - IPV6_EXTRA_OVERHEAD


class VxlanBackend(UserspaceBackend):
    """VXLAN in userspace, interoperable with the kernel's vxlan device."""

    ipv6_refusal = ""

    lease_type = "vxlan"
    name = "vxlan (userspace datapath)"
    overhead = vxlan.OVERHEAD

    def __init__(self, ctx: Context) -> None:
        self.vtep = _Vtep(ctx)
        super().__init__(ctx)

    def _peer_objects(self) -> Program | None:
        # DirectRouting: peers on our L2 segment get a plain kernel route, more specific
        # than the network's route into the TUN, so their traffic never reaches us.
        return self._direct if self.ctx.config.backend.direct_routing else None

    def _direct(self, lease: Lease, reachable: Reachable) -> list[KernelObject] | None:
        """A plain route for each half of the peer whose public address is on our
        segment (IPv4 via PublicIP, IPv6 via PublicIPv6, as flanneld's DirectRouting)."""
        objects: list[KernelObject] = []
        if ipv4_half(self.ctx, lease) and reachable(lease.public_ip):
            objects += direct_route(lease)
        if ipv6_half(self.ctx, lease) and lease.public_ipv6 and reachable(lease.public_ipv6):
            objects += direct_route6(lease)
        return objects or None

    def mtu_for(self, underlay: Underlay) -> int:
        return self.vtep.mtu_for(underlay)

    def config_warnings(self) -> list[dict[str, Any]]:
        warnings = _mtu_warning(self)
        if self.ctx.config.backend.learning:
            detail = (
                "Backend.Learning: the userspace datapath learns nothing (it answers ARP "
                "for its VTEP and keeps its peers from the registry)"
            )
            warnings.insert(0, {"event": "config_key_ignored", "detail": detail})
        return warnings

    def lease_data(self) -> dict[str, Any]:
        return self.vtep.lease_data()

    def lease_v6_data(self) -> dict[str, Any] | None:
        return self.vtep.lease_v6_data()

    def prefix_for(self, lease: Lease) -> bytes:
        return vxlan_prefix_for(self.vtep.vni, self.vtep.mac)(lease)

    def prefix6_for(self, lease: Lease) -> bytes:
        if self.vtep.mac6 is None:
            return b""
        return vxlan6_prefix_for(self.vtep.vni, self.vtep.mac6)(lease)

    def node_objects(self, lease: Lease) -> list[KernelObject]:
        """The TUN as the udp backend's, and with EnableIPv6 also the lease's IPv6 subnet
        address (a /128, as flannel-v6.<VNI>'s) and a route for IPv6Network with the IPv6
        half's MTU (``ipv6_route_mtu``)."""
        objects = super().node_objects(lease)
        ipv6 = self.ctx.config.ipv6
        if ipv6 is not None and lease.ipv6_subnet is not None:
            name = self.ctx.options.tun_name
            objects += [
                Address(name, lease.ipv6_subnet.network_address),
                Route(ipv6.network, dev=name, mtu=ipv6_route_mtu(self.mtu)),
            ]
        return objects

    def dataplane_spec(self, lease: Lease) -> DataplaneSpec:
        options = self.ctx.options
        return DataplaneSpec(
            framing="vxlan",
            subnet=lease.subnet,
            port=self.vtep.port,
            mtu=self.mtu,
            offload=options.offload,
            tun_tso=options.tun_tso,
            busy_poll_us=options.busy_poll_us,
            vni=self.vtep.vni,
            mac=self.vtep.mac,
            subnet6=lease.ipv6_subnet if self.vtep.ipv6 else None,
            mac6=self.vtep.mac6 or b"",
        )

    def status(self) -> dict[str, Any]:
        status = super().status()
        workers = status.get("workers", [])
        arp_replies = sum(w["arp_replies"] for w in workers) if workers else None
        if arp_replies is None:
            arp_replies = self.dataplane.arp_replies if self.dataplane else 0
        result = {**status, "vtep_mac": vxlan.format_mac(self.vtep.mac), "arp_replies": arp_replies}
        if workers:  # the IPv6 half's counts, summed over every forwarding process
            ipv6 = sum_ipv6_status([w["ipv6"] for w in workers])
        else:
            ipv6 = self.dataplane.ipv6_status() if self.dataplane is not None else {}
        if self.vtep.ipv6 and self.vtep.mac6 is not None:
            result |= {"vtep_mac6": vxlan.format_mac(self.vtep.mac6), **ipv6}
        return result


class KernelVxlanBackend(RoutedBackend):
    """flanneld's vxlan backend: the kernel's vxlan device does the datapath."""

    lease_type = "vxlan"
    name = "vxlan (kernel datapath)"

    ipv6_refusal = ""

    def __init__(self, ctx: Context) -> None:
        self.vtep = _Vtep(ctx)
        self.device = f"flannel.{self.vtep.vni}"
        self.device6 = f"flannel-v6.{self.vtep.vni}"
        self.mac6 = self.vtep.mac6
        self.lease: Lease | None = None
        # IPv6 only (EnableIPv4 false): flannel-v6.<VNI> alone, no flannel.<VNI>.
        self.ipv4 = ctx.config.enable_ipv4
        ipv6 = ctx.config.ipv6 is not None
        devices = (*((self.device,) if self.ipv4 else ()), *((self.device6,) if ipv6 else ()))
        super().__init__(ctx, devices=devices)

    def lease_data(self) -> dict[str, Any]:
        return self.vtep.lease_data()

    def lease_v6_data(self) -> dict[str, Any] | None:
        return self.vtep.lease_v6_data()

    def mtu_for(self, underlay: Underlay) -> int:
        return self.vtep.mtu_for(underlay)

    def config_warnings(self) -> list[dict[str, Any]]:
        return _mtu_warning(self)

    def kernel_link(self) -> KernelLink:
        return KernelLink(self.device if self.ipv4 else self.device6, overlay_only=True)

    def kernel_link6(self) -> KernelLink | None:
        return KernelLink(self.device6, overlay_only=True) if self.ctx.config.ipv6 else None

    def node_objects(self, lease: Lease) -> list[KernelObject]:
        """The device as flanneld sets it up: learning off, our MAC, the lease's network
        address as a /32, MTU underlay - 50 (or Backend.MTU), up; IPv6 only, none of it."""
        underlay = self.ctx.underlay
        objects: list[KernelObject] = []
        if self.ipv4:
            objects += [
                *self._device(self.device, underlay.address, self.mtu, self.vtep.mac),
                Address(self.device, lease.subnet.network_address),
            ]
        return objects + self._node_objects6(lease)

    def _device(self, name: str, local: IPAddress, mtu: int, mac: bytes) -> list[KernelObject]:
        """A vxlan device of ours, up: the VNI, port and learning of the config."""
        return [
            VxlanDevice(
                name,
                vni=self.vtep.vni,
                local=local,
                underlay=self.ctx.underlay.iface,
                port=self.vtep.port,
                learning=self.ctx.config.backend.learning,
            ),
            Link(name, mtu=mtu, mac=vxlan.format_mac(mac)),
        ]

    def _node_objects6(self, lease: Lease) -> list[KernelObject]:
        """flannel-v6.<VNI> as flanneld sets it up: the same VNI, port and learning, our
        IPv6 underlay address as its local one, the lease's IPv6 subnet address as a
        /128, MTU underlay - 70 (or Backend.MTU)."""
        underlay = self.ctx.underlay
        if lease.ipv6_subnet is None or underlay.address6 is None or self.mac6 is None:
            return []
        mtu = self.vtep.mtu6_for(underlay)
        return [
            *self._device(self.device6, underlay.address6, mtu, self.mac6),
            Address(self.device6, lease.ipv6_subnet.network_address),
        ]

    async def start(self, lease: Lease) -> None:
        self.lease = lease
        await asyncio.wrap_future(self.kernel.set(NODE, self.node_objects(lease)))

    async def follow_underlay(self, underlay: Underlay) -> None:
        """flannel.<VNI>'s MTU follows, and flannel-v6.<VNI>'s (underlay - 70); the kernel
        then answers forwarded packets longer than them with frag-needed (IPv6: packet
        too big), and their queue is empty: the devices have none."""
        await super().follow_underlay(underlay)
        if self.lease is not None:
            await asyncio.wrap_future(self.kernel.set(NODE, self.node_objects(self.lease)))

    def _program(self, lease: Lease, reachable: Reachable) -> list[KernelObject] | None:
        objects = (self._program4(lease, reachable) or []) if ipv4_half(self.ctx, lease) else []
        if ipv6_half(self.ctx, lease):
            objects += self._program6(lease, reachable)
        return objects or None

    def _program6(self, lease: Lease, reachable: Reachable) -> list[KernelObject]:
        """The IPv6 half of a peer: a plain route with DirectRouting on our segment, else
        flanneld's neighbour + fdb + onlink route on flannel-v6.<VNI>."""
        assert lease.ipv6_subnet is not None and lease.public_ipv6 is not None
        if self.ctx.config.backend.direct_routing and reachable(lease.public_ipv6):
            return direct_route6(lease)
        raw = vtep6_mac_of(lease)
        if raw is None:
            self.ctx.log.warning(
                "peer_skipped",
                subnet=str(lease.ipv6_subnet),
                reason="dual-stack vxlan lease without a valid BackendV6Data VtepMAC",
            )
            return []
        return vxlan_peer(self.device6, lease.ipv6_subnet, lease.public_ipv6, vxlan.format_mac(raw))

    def _program4(self, lease: Lease, reachable: Reachable) -> list[KernelObject] | None:
        if self.ctx.config.backend.direct_routing and reachable(lease.public_ip):
            return direct_route(lease)
        raw = vtep_mac_of(lease)
        if raw is None:
            self.ctx.log.warning(
                "peer_skipped",
                subnet=str(lease.subnet),
                reason="vxlan lease without a valid VtepMAC",
            )
            return None
        return vxlan_peer(self.device, lease.subnet, lease.public_ip, vxlan.format_mac(raw))
