"""flannel's host-gw backend: plain kernel routes via each peer's public IP, for the peers
on our L2 segment (a route via a gateway cannot carry them); with EnableIPv6, also a
route for each peer's IPv6 subnet via its PublicIPv6 (flannel's route_network.go)."""

from __future__ import annotations

from collections.abc import Callable

from control.lease import Lease
from overlay.backends.base import BackendError, KernelLink
from overlay.backends.routed import (
    RoutedBackend,
    direct_route,
    direct_route6,
    ipv4_half,
    ipv6_half,
)
from overlay.kernel.objects import IPAddress, KernelObject, Reachable


class HostGwBackend(RoutedBackend):
    lease_type = "host-gw"
    name = "host-gw"
    ipv6_refusal = ""

    def kernel_link(self) -> KernelLink:
        # No device of its own: the underlay's statistics, all of its traffic.
        return KernelLink(self.ctx.underlay.iface, overlay_only=False)

    def prepare(self) -> None:
        underlay = self.ctx.underlay
        ipv4 = self.ctx.config.enable_ipv4
        if ipv4 and underlay.public_ip != underlay.address:  # flanneld's check, same reason
            raise BackendError(
                f"--public-ip {underlay.public_ip} differs from {underlay.iface}'s address "
                f"{underlay.address}, meaning that probably you're on a NAT, which host-gw "
                "does not support (peers route to the public IP directly): use vxlan or udp"
            )
        if self.ctx.config.ipv6 is not None and underlay.public_ipv6 != underlay.address6:
            raise BackendError(
                f"--public-ipv6 {underlay.public_ipv6} differs from {underlay.iface}'s IPv6 "
                f"address {underlay.address6}: host-gw peers route to it directly"
            )

    def _program(self, lease: Lease, reachable: Reachable) -> list[KernelObject] | None:
        objects: list[KernelObject] = []
        halves: list[tuple[IPAddress, Callable[[Lease], list[KernelObject]]]]
        halves = [(lease.public_ip, direct_route)] if ipv4_half(self.ctx, lease) else []
        if ipv6_half(self.ctx, lease) and lease.public_ipv6 is not None:
            halves.append((lease.public_ipv6, direct_route6))
        for public, routes in halves:
            if reachable(public):
                objects += routes(lease)
                continue
            self.ctx.log.warning(
                "peer_skipped",
                subnet=lease.name,
                public_ip=str(public),
                reason="host-gw needs the peer on our L2 segment (its route has a gateway)",
            )
        return objects or None
