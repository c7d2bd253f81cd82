"""flannel's host-gw backend: plain kernel routes via each peer's public IP, for the peers
on our L2 segment (a route via a gateway cannot carry them)."""

from __future__ import annotations

from control.lease import Lease
from overlay.backends.base import BackendError, KernelLink
from overlay.backends.routed import RoutedBackend, direct_route
from overlay.kernel.objects import KernelObject, Reachable


class HostGwBackend(RoutedBackend):
    lease_type = "host-gw"
    name = "host-gw"

    def kernel_link(self) -> KernelLink:
        # No device of its own: the underlay's statistics, all of its traffic.
        return KernelLink(self.ctx.underlay.iface, overlay_only=False)

    def prepare(self) -> None:
        underlay = self.ctx.underlay
        if underlay.public_ip != underlay.address:  # flanneld's check, same reason
            raise BackendError(
                f"--public-ip {underlay.public_ip} differs from {underlay.iface}'s address "
                f"{underlay.address}, meaning that probably you're on a NAT, which host-gw "
                "does not support (peers route to the public IP directly): use vxlan or udp"
            )

    def _program(self, lease: Lease, reachable: Reachable) -> list[KernelObject] | None:
        if not reachable(lease.public_ip):
            self.ctx.log.warning(
                "peer_skipped",
                subnet=str(lease.subnet),
                public_ip=str(lease.public_ip),
                reason="host-gw needs the peer on our L2 segment (its route has a gateway)",
            )
            return None
        return direct_route(lease)
