"""The backends by name, as the network config's ``Backend.Type`` names them (flannel's
backend manager); for vxlan, the datapath the operator chose."""

from __future__ import annotations

import asyncio

from overlay.backends.base import Backend, Context
from overlay.backends.hostgw import HostGwBackend
from overlay.backends.udp import UdpBackend
from overlay.backends.vxlan import KernelVxlanBackend, VxlanBackend
from overlay.kernel.objects import kernel_has_vxlan


async def make_backend(ctx: Context) -> Backend:
    """The backend the network config asks for (and, for vxlan, the chosen datapath)."""
    kind = ctx.config.backend.type
    if kind == "udp":
        return UdpBackend(ctx)
    if kind == "host-gw":
        return HostGwBackend(ctx)
    datapath = ctx.options.vxlan_datapath
    if datapath == "auto":
        datapath = "kernel" if await asyncio.to_thread(kernel_has_vxlan) else "userspace"
    return KernelVxlanBackend(ctx) if datapath == "kernel" else VxlanBackend(ctx)
