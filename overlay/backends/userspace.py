"""Backends whose datapath is this process: a TUN device and a UDP socket.

udp is flannel's udp backend (the datagram is the packet); vxlan is RFC 7348 framing in
userspace, so a node without kernel VXLAN can join a cluster of ``flannel.1`` nodes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from control.lease import Lease
from encap import udp_frame, vxlan
from overlay import kernel_routes
from overlay.backends.base import Backend, Context
from overlay.backends.kernel import RouteWorker, Undo, direct_route, vtep_mac_of
from overlay.backends.udp import UdpDataplane, open_socket
from overlay.backends.vxlan import VxlanDataplane
from tun import netlink
from tun.device import TunDevice


class UdpBackend(Backend):
    lease_type = ""  # flannel's udp backend publishes no BackendType
    name = "udp"
    overhead = udp_frame.OVERHEAD

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.tun: TunDevice | None = None
        self.dataplane: UdpDataplane | None = None

    @property
    def mtu(self) -> int:
        return self.ctx.underlay.mtu - self.overhead

    def accepts(self, lease: Lease) -> bool:
        return lease.backend_type in ("", "udp")

    def prepare(self) -> None:
        # With offloads, IFF_VNET_HDR from the start (TCP super-packets can then be written
        # into the TUN) rather than switched on later, which bounces the link's carrier.
        self.tun = TunDevice(self.ctx.args.tun_name, vnet_hdr=not self.ctx.args.no_offload)

    dataplane_class: type[UdpDataplane] = UdpDataplane

    def _dataplane_options(self, lease: Lease) -> dict[str, Any]:
        return {}

    def _dataplane(self, sock: Any, lease: Lease) -> UdpDataplane:
        assert self.tun is not None
        return self.dataplane_class(
            self.tun,
            sock,
            self.ctx.peers,
            lease.subnet,
            self.ctx.counters,
            offload=not self.ctx.args.no_offload,
            **self._dataplane_options(lease),
        )

    async def start(self, lease: Lease) -> None:
        assert self.tun is not None
        config = self.ctx.config
        await asyncio.to_thread(
            netlink.configure_tun,
            self.tun.name,
            lease.subnet.network_address,
            self.mtu,
            config.network,
        )
        address = str(self.ctx.underlay.address)
        try:
            sock = open_socket(address, config.backend.port)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot bind UDP {address}:{config.backend.port}: {e.strerror}"
            ) from None
        self.dataplane = self._dataplane(sock, lease)
        self.dataplane.start(asyncio.get_running_loop())

    def status(self) -> dict[str, Any]:
        features = getattr(self.dataplane, "features", None)
        return {
            "tun": self.tun.name if self.tun else None,
            "features": features() if features else {},
        }

    async def stop(self) -> None:
        if self.dataplane is not None:
            self.dataplane.stop(asyncio.get_running_loop())
            self.dataplane.sock.close()
        if self.tun is not None:
            self.tun.close()


class VxlanBackend(UdpBackend):
    """VXLAN in userspace, interoperable with the kernel's vxlan device."""

    lease_type = "vxlan"
    name = "vxlan (userspace datapath)"
    overhead = vxlan.OVERHEAD

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.vni = ctx.config.backend.vni
        self.mac = vxlan.vtep_mac(str(ctx.underlay.public_ip), self.vni)
        # DirectRouting: peers on our L2 segment get a plain kernel route, more specific
        # than the network's route into the TUN, so their traffic never reaches us.
        self.routes = (
            RouteWorker(ctx.log, self._direct) if ctx.config.backend.direct_routing else None
        )

    @staticmethod
    def _direct(lease: Lease) -> Undo | None:
        if kernel_routes.directly_reachable(lease.public_ip):
            return direct_route(lease)
        return None

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        if self.routes is not None:
            self.routes.apply(added, removed)

    async def stop(self) -> None:
        if self.routes is not None:
            await self.routes.stop()
        await super().stop()

    def accepts(self, lease: Lease) -> bool:
        return lease.backend_type == "vxlan"

    def lease_data(self) -> dict[str, Any]:
        return {"VNI": self.vni, "VtepMAC": vxlan.format_mac(self.mac)}

    def prefix_for(self, lease: Lease) -> bytes:
        mac = vtep_mac_of(lease)
        return vxlan.prefix(self.vni, mac, self.mac) if mac is not None else b""

    dataplane_class = VxlanDataplane

    def _dataplane_options(self, lease: Lease) -> dict[str, Any]:
        return {
            "vni": self.vni,
            "mac": self.mac,
            "vtep_ip": lease.subnet.network_address.packed,
            "port": self.ctx.config.backend.port,
        }

    def status(self) -> dict[str, Any]:
        arp_replies = getattr(self.dataplane, "arp_replies", 0)
        return {
            **super().status(),
            "vtep_mac": vxlan.format_mac(self.mac),
            "arp_replies": arp_replies,
        }
