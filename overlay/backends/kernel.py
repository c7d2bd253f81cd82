"""Backends whose datapath is the kernel: vxlan through ``flannel.<VNI>``, and host-gw.

Both describe the kernel objects they want (``overlay.kernel_routes``) and hand them to a
``KernelState``, which programs them in order on one worker thread, replaces a peer's
objects when its lease changes (new VtepMAC or PublicIP), removes them when it goes, and
puts back whatever disappears from the kernel.
"""

from __future__ import annotations

import asyncio
from typing import Any

from control.lease import Lease
from encap import vxlan
from encap.errors import CodecError
from overlay import kernel_routes
from overlay.backends.base import Backend, BackendError, Context
from overlay.kernel_routes import Address, KernelObject, Link, Route, VxlanDevice
from overlay.reconcile import NODE, KernelState


def direct_route(lease: Lease) -> list[KernelObject]:
    """A plain route via the peer's public IP (host-gw, DirectRouting)."""
    return [Route(lease.subnet, gateway=lease.public_ip)]


class RoutedBackend(Backend):
    def __init__(self, ctx: Context, devices: tuple[str, ...] = ()) -> None:
        super().__init__(ctx)
        self.kernel = KernelState(
            ctx.log, program=self._program, devices=devices, network=ctx.config.network
        )

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        self.kernel.peers_changed(added, removed)

    def _program(self, lease: Lease) -> list[KernelObject] | None:
        """``lease``'s kernel objects (in the worker), or None to skip it."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        return self.kernel.status()

    async def stop(self) -> None:
        await self.kernel.stop()


class HostGwBackend(RoutedBackend):
    """Plain routes via each peer's public IP; only for peers on our L2 segment."""

    lease_type = "host-gw"
    name = "host-gw"

    def prepare(self) -> None:
        underlay = self.ctx.underlay
        if underlay.public_ip != underlay.address:  # flanneld's check, same reason
            raise BackendError(
                f"--public-ip {underlay.public_ip} differs from {underlay.iface}'s address "
                f"{underlay.address}, meaning that probably you're on a NAT, which host-gw "
                "does not support (peers route to the public IP directly): use vxlan or udp"
            )

    def _program(self, lease: Lease) -> list[KernelObject] | None:
        if not kernel_routes.directly_reachable(lease.public_ip):
            self.ctx.log.warning(
                "peer_skipped",
                subnet=str(lease.subnet),
                public_ip=str(lease.public_ip),
                reason="host-gw needs the peer on our L2 segment (its route has a gateway)",
            )
            return None
        return direct_route(lease)


def vtep_mac_of(lease: Lease) -> bytes | None:
    """The VtepMAC a vxlan lease publishes; None when missing or malformed."""
    data = lease.backend_data or {}
    text = next((v for k, v in data.items() if k.lower() == "vtepmac"), None)
    if not isinstance(text, str):
        return None
    try:
        return vxlan.parse_mac(text)
    except CodecError:
        return None


def vxlan_mtu(ctx: Context) -> int:
    """Backend.MTU when the config sets it (flanneld's vxlan option), else underlay - 50."""
    return ctx.config.backend.mtu or ctx.underlay.mtu - vxlan.OVERHEAD


class KernelVxlanBackend(RoutedBackend):
    """flanneld's vxlan backend: the kernel's vxlan device does the datapath."""

    lease_type = "vxlan"
    name = "vxlan (kernel datapath)"

    def __init__(self, ctx: Context) -> None:
        backend = ctx.config.backend
        self.device = f"flannel.{backend.vni}"
        super().__init__(ctx, devices=(self.device,))
        self.vni = backend.vni
        self.port = backend.port
        # Stable across restarts: derived from our public IP and the VNI.
        self.mac = vxlan.vtep_mac(str(ctx.underlay.public_ip), self.vni)

    def lease_data(self) -> dict[str, Any]:
        return {"VNI": self.vni, "VtepMAC": vxlan.format_mac(self.mac)}

    @property
    def mtu(self) -> int:
        return vxlan_mtu(self.ctx)

    def node_objects(self, lease: Lease) -> list[KernelObject]:
        """The device as flanneld sets it up: learning off, our MAC, the lease's network
        address as a /32, MTU underlay - 50 (or Backend.MTU), up."""
        underlay = self.ctx.underlay
        return [
            VxlanDevice(
                self.device,
                vni=self.vni,
                local=underlay.address,
                underlay=underlay.iface,
                port=self.port,
                learning=self.ctx.config.backend.learning,
            ),
            Link(self.device, mtu=self.mtu, mac=vxlan.format_mac(self.mac)),
            Address(self.device, lease.subnet.network_address),
        ]

    async def start(self, lease: Lease) -> None:
        await asyncio.wrap_future(self.kernel.set(NODE, self.node_objects(lease)))

    def _program(self, lease: Lease) -> list[KernelObject] | None:
        if self.ctx.config.backend.direct_routing and kernel_routes.directly_reachable(
            lease.public_ip
        ):
            return direct_route(lease)
        raw = vtep_mac_of(lease)
        if raw is None:
            self.ctx.log.warning(
                "peer_skipped",
                subnet=str(lease.subnet),
                reason="vxlan lease without a valid VtepMAC",
            )
            return None
        return kernel_routes.vxlan_peer(
            self.device, lease.subnet, lease.public_ip, vxlan.format_mac(raw)
        )
