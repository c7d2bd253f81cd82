"""Backends whose datapath is the kernel: vxlan through ``flannel.<VNI>``, and host-gw.

Both program netlink state per peer from one worker thread: pyroute2's IPRoute cannot
run inside the event loop, and one thread keeps the changes in order. For every subnet
the worker remembers how to undo what it programmed, so a changed lease (new VtepMAC or
PublicIP) replaces the old entries instead of leaving them behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from ipaddress import IPv4Network
from typing import Any

from control.lease import Lease
from encap import vxlan
from encap.errors import CodecError
from overlay import kernel_routes
from overlay.backends.base import Backend, Context

Undo = Callable[[], None]


class RouteWorker:
    """Programs per-peer kernel state in order on one thread, remembering how to undo it."""

    def __init__(self, log: Any, program: Callable[[Lease], Undo | None]) -> None:
        self.log = log
        self.program = program  # runs in the worker; returns the undo, or None if skipped
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._programmed: dict[IPv4Network, Undo] = {}  # touched by the worker only
        self.errors = 0

    def _submit(self, call: Callable[..., None], *args: Any) -> None:
        def done(future: Future[None]) -> None:
            error = future.exception()
            if error is not None:
                self.errors += 1
                self.log.error("netlink_failed", step=call.__name__, error=str(error))

        self._worker.submit(call, *args).add_done_callback(done)

    def apply(self, added: list[Lease], removed: list[Lease]) -> None:
        for lease in removed:
            self._submit(self._remove, lease.subnet)
        for lease in added:
            self._submit(self._add, lease)

    def _add(self, lease: Lease) -> None:
        self._remove(lease.subnet)
        undo = self.program(lease)
        if undo is not None:
            self._programmed[lease.subnet] = undo

    def _remove(self, subnet: IPv4Network) -> None:
        undo = self._programmed.pop(subnet, None)
        if undo is not None:
            undo()

    def status(self) -> dict[str, Any]:
        return {
            "programmed": sorted(str(s) for s in list(self._programmed)),
            "netlink_errors": self.errors,
        }

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._worker.shutdown)


def direct_route(lease: Lease) -> Undo:
    """A plain route via the peer's public IP (host-gw, DirectRouting); returns its undo."""
    kernel_routes.add_direct_route(lease.subnet, lease.public_ip)
    return lambda: kernel_routes.del_direct_route(lease.subnet, lease.public_ip)


class RoutedBackend(Backend):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.routes = RouteWorker(ctx.log, self._program)

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        self.routes.apply(added, removed)

    def _program(self, lease: Lease) -> Undo | None:
        """Program ``lease`` (in the worker); return how to undo it, or None if skipped."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        return self.routes.status()

    async def stop(self) -> None:
        await self.routes.stop()


class HostGwBackend(RoutedBackend):
    """Plain routes via each peer's public IP; only for peers on our L2 segment."""

    lease_type = "host-gw"
    name = "host-gw"

    def _program(self, lease: Lease) -> Undo | None:
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


class KernelVxlanBackend(RoutedBackend):
    """flanneld's vxlan backend: the kernel's vxlan device does the datapath."""

    lease_type = "vxlan"
    name = "vxlan (kernel datapath)"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        backend = ctx.config.backend
        self.vni = backend.vni
        self.port = backend.port
        self.device = f"flannel.{self.vni}"
        # Stable across restarts: derived from our public IP and the VNI.
        self.mac = vxlan.vtep_mac(str(ctx.underlay.public_ip), self.vni)

    def lease_data(self) -> dict[str, Any]:
        return {"VNI": self.vni, "VtepMAC": vxlan.format_mac(self.mac)}

    @property
    def mtu(self) -> int:
        return self.ctx.underlay.mtu - vxlan.OVERHEAD

    async def start(self, lease: Lease) -> None:
        await asyncio.to_thread(
            kernel_routes.ensure_vxlan_device,
            self.device,
            vni=self.vni,
            local=self.ctx.underlay.address,
            underlay=self.ctx.underlay.iface,
            port=self.port,
            mac=vxlan.format_mac(self.mac),
            address=lease.subnet.network_address,
            mtu=self.mtu,
        )

    def _program(self, lease: Lease) -> Undo | None:
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
        mac = vxlan.format_mac(raw)
        kernel_routes.add_vxlan_peer(self.device, lease.subnet, lease.public_ip, mac)
        return lambda: kernel_routes.del_vxlan_peer(self.device, lease.subnet, lease.public_ip, mac)
