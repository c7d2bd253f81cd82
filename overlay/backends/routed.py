"""What the backends whose datapath is the kernel share (flannel's route_network.go):
they describe the kernel objects each peer needs (``overlay.kernel.objects``) and hand
them to a ``KernelState``, which programs them in order on one worker thread, replaces a
peer's objects when its lease changes (new VtepMAC or PublicIP), removes them when it
goes, and puts back whatever disappears from the kernel."""

from __future__ import annotations

from typing import Any

from control.lease import Lease
from overlay.backends.base import Backend, BackendError, Context
from overlay.kernel.objects import KernelObject, Reachable, Route
from overlay.kernel.reconcile import KernelState


def direct_route(lease: Lease) -> list[KernelObject]:
    """A plain route via the peer's public IP (host-gw, DirectRouting)."""
    return [Route(lease.subnet, gateway=lease.public_ip)]


def direct_route6(lease: Lease) -> list[KernelObject]:
    """The IPv6 one: the peer's IPv6 subnet via its PublicIPv6."""
    assert lease.ipv6_subnet is not None and lease.public_ipv6 is not None
    return [Route(lease.ipv6_subnet, gateway=lease.public_ipv6)]


def ipv4_half(ctx: Context, lease: Lease) -> bool:
    """Whether a peer's IPv4 half is programmed: EnableIPv4, and the lease has one (an
    IPv6-only lease's ``0.0.0.0/0`` via ``0.0.0.0`` is no route to make)."""
    return ctx.config.enable_ipv4 and lease.has_ipv4


def ipv6_half(ctx: Context, lease: Lease) -> bool:
    """Whether a peer's IPv6 half is programmed: EnableIPv6, and the (validated) lease
    has one (a peer without it is an IPv4 peer)."""
    return (
        ctx.config.ipv6 is not None
        and lease.ipv6_subnet is not None
        and lease.public_ipv6 is not None
    )


class RoutedBackend(Backend):
    def __init__(self, ctx: Context, devices: tuple[str, ...] = ()) -> None:
        super().__init__(ctx)
        if ctx.options.workers > 1:
            raise BackendError(
                f"--workers {ctx.options.workers} needs a userspace datapath (udp, or vxlan "
                f"with --vxlan-datapath userspace); {self.name} forwards in the kernel: "
                "use --workers 1"
            )
        if ctx.options.busy_poll_us:
            raise BackendError(
                f"--busy-poll-us {ctx.options.busy_poll_us} needs a userspace datapath (udp, "
                f"or vxlan with --vxlan-datapath userspace); {self.name} forwards in the "
                "kernel: leave it at 0 (the kernel's own is net.core.busy_read)"
            )
        self.kernel: KernelState = KernelState(
            ctx.log, program=self._program, devices=devices, networks=ctx.config.overlay_networks
        )

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        self.kernel.peers_changed(added, removed)

    def _program(self, lease: Lease, reachable: Reachable) -> list[KernelObject] | None:
        """``lease``'s kernel objects (in the worker), or None to skip it; ``reachable``
        says whether a public IP is on our L2 segment."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        return self.kernel.status()

    async def stop(self) -> None:
        await self.kernel.stop()
