"""Backends whose datapath is this process: a TUN device and a UDP socket.

udp is flannel's udp backend (the datagram is the packet); vxlan is RFC 7348 framing in
userspace, so a node without kernel VXLAN can join a cluster of ``flannel.1`` nodes.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

from control.lease import Lease
from control.peer_table import PeerTable
from encap import native, udp_frame, vxlan
from overlay import kernel_routes
from overlay.backends.base import Backend, Context
from overlay.backends.kernel import RouteWorker, Undo, direct_route, vtep_mac_of
from overlay.backends.udp import UdpDataplane, open_socket
from overlay.backends.vxlan import VxlanDataplane
from overlay.counters import Counters
from overlay.worker import Workers
from tun import netlink, steering
from tun.device import TunDevice


class UdpBackend(Backend):
    lease_type = ""  # flannel's udp backend publishes no BackendType
    name = "udp"
    overhead = udp_frame.OVERHEAD

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.tun: TunDevice | None = None
        self.dataplane: UdpDataplane | None = None
        self.workers: Workers | None = None  # queues 1..N-1 with --workers N
        self.steering = "automq"  # how the kernel picks a TUN queue (tun.steering)

    @property
    def mtu(self) -> int:
        return self.ctx.underlay.mtu - self.overhead

    def accepts(self, lease: Lease) -> bool:
        return lease.backend_type in ("", "udp")

    def prepare(self) -> None:
        # With offloads, IFF_VNET_HDR from the start (TCP super-packets can then be written
        # into the TUN) rather than switched on later, which bounces the link's carrier.
        self.tun = TunDevice(
            self.ctx.args.tun_name,
            vnet_hdr=not self.ctx.args.no_offload,
            multi_queue=self.ctx.args.workers > 1,
        )

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
            tun_tso=not self.ctx.args.no_tun_tso,
            mtu=self.mtu,
            **self._dataplane_options(lease),
        )  # a worker's is built by worker_dataplane(): keep worker_spec in step

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
        if not native.AVAILABLE:
            self.ctx.log.warning(
                "native_codecs_unavailable",
                error=native.LOAD_ERROR,
                effect="the pure-Python reference codecs run, several times slower",
            )
        count = self.ctx.args.workers
        sock = self._open_socket(reuse_port=count > 1)
        self.dataplane = self._dataplane(sock, lease)
        if count > 1:
            try:
                steering.steer_by_flow_hash(self.tun.fd)
                self.steering = "flow_hash"
            except OSError as e:
                self.ctx.log.warning(
                    "tun_steering_unavailable",
                    error=e.strerror or str(e),
                    effect="each flow leaves through the worker that receives its replies",
                )
            # Before our own dataplane runs and before the first peer snapshot: every
            # worker starts with the table as it is and gets every change after.
            self.workers = Workers(self.ctx.log)
            await self.workers.start(
                count - 1,
                self.tun.open_queue,
                lambda: self._open_socket(reuse_port=True),
                self.worker_spec(lease),
                [peer.lease for peer in self.ctx.peers.peers()],
            )
        self.dataplane.start(asyncio.get_running_loop())

    def _open_socket(self, *, reuse_port: bool) -> socket.socket:
        address = str(self.ctx.underlay.address)
        port = self.ctx.config.backend.port
        try:
            return open_socket(address, port, reuse_port=reuse_port)
        except OSError as e:
            raise OSError(e.errno, f"cannot bind UDP {address}:{port}: {e.strerror}") from None

    def worker_spec(self, lease: Lease) -> dict[str, Any]:
        """What a worker process needs to build the same dataplane (``worker_dataplane``)."""
        assert self.tun is not None
        args = self.ctx.args
        return {
            "backend": "udp",
            "node": str(self.ctx.underlay.public_ip),
            "subnet": str(lease.subnet),
            "port": self.ctx.config.backend.port,
            "mtu": self.mtu,
            "offload": not args.no_offload,
            # TUNSETOFFLOAD is device-wide: if ours takes TCP super-packets, every queue
            # gets them, so every worker must cut them too.
            "tun_tso": bool(getattr(self.dataplane, "tso", False)),
            "tun": self.tun.name,
            "vnet_hdr": self.tun.vnet_hdr,
            "offload_features": self.tun.offload_features,
            "features": self.dataplane.features() if self.dataplane else {},
            "log_format": args.log_format,
            "v": args.v,
        }

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        if self.workers is not None:
            self.workers.peers_changed(added, removed)

    def status(self) -> dict[str, Any]:
        features = getattr(self.dataplane, "features", None)
        result: dict[str, Any] = {
            "tun": self.tun.name if self.tun else None,
            "features": features() if features else {},
        }
        if self.workers is not None:
            result["tun_steering"] = self.steering
            result["workers"] = [self._own_status(), *self.workers.status()]
        return result

    def _own_status(self) -> dict[str, Any]:
        """This process as worker 0 (the daemon sums the counters of all of them)."""
        return {
            "index": 0,
            "pid": os.getpid(),
            "alive": True,
            "counters": self.ctx.counters.snapshot(),
            "features": self.dataplane.features() if self.dataplane else {},
            "arp_replies": getattr(self.dataplane, "arp_replies", 0),
        }

    async def stop(self) -> None:
        if self.workers is not None:
            await self.workers.stop()
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
        super().peers_changed(added, removed)
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
        return vxlan_prefix_for(self.vni, self.mac)(lease)

    dataplane_class = VxlanDataplane

    def _dataplane_options(self, lease: Lease) -> dict[str, Any]:
        return vxlan_options(self.vni, self.mac, lease.subnet, self.ctx.config.backend.port)

    def worker_spec(self, lease: Lease) -> dict[str, Any]:
        return {
            **super().worker_spec(lease),
            "backend": "vxlan",
            "vni": self.vni,
            "mac": vxlan.format_mac(self.mac),
        }

    def status(self) -> dict[str, Any]:
        status = super().status()
        workers = status.get("workers", [])
        arp_replies = sum(w["arp_replies"] for w in workers) if workers else None
        if arp_replies is None:
            arp_replies = getattr(self.dataplane, "arp_replies", 0)
        return {**status, "vtep_mac": vxlan.format_mac(self.mac), "arp_replies": arp_replies}


def vxlan_prefix_for(vni: int, mac: bytes) -> Callable[[Lease], bytes]:
    """The peer table's per-peer prefix: VXLAN header + Ethernet header to its VTEP MAC."""

    def prefix_for(lease: Lease) -> bytes:
        peer_mac = vtep_mac_of(lease)
        return vxlan.prefix(vni, peer_mac, mac) if peer_mac is not None else b""

    return prefix_for


def vxlan_options(vni: int, mac: bytes, subnet: IPv4Network, port: int) -> dict[str, Any]:
    return {"vni": vni, "mac": mac, "vtep_ip": subnet.network_address.packed, "port": port}


def worker_dataplane(
    spec: dict[str, Any], tun: TunDevice, sock: socket.socket, counters: Counters
) -> tuple[UdpDataplane, PeerTable]:
    """A worker's dataplane and its own peer table, built from ``worker_spec`` the way
    the backend builds the main process's (same class, options and per-peer prefix)."""
    subnet = IPv4Network(spec["subnet"])
    options: dict[str, Any] = {"offload": spec["offload"], "mtu": spec.get("mtu", 0)}
    if spec.get("tun_tso"):
        options["tun_tso"] = True
    if spec["backend"] == "vxlan":
        vni, mac = spec["vni"], vxlan.parse_mac(spec["mac"])
        peers = PeerTable(spec["port"], vxlan_prefix_for(vni, mac))
        options |= vxlan_options(vni, mac, subnet, spec["port"])
        dataplane: UdpDataplane = VxlanDataplane(tun, sock, peers, subnet, counters, **options)
    else:
        peers = PeerTable(spec["port"])
        dataplane = UdpDataplane(tun, sock, peers, subnet, counters, **options)
    if dataplane.features() != spec.get("features", dataplane.features()):
        # Offloads are probed per socket and queue; a worker that ended up with other
        # ones than the main process could mishandle what the shared device hands it.
        raise RuntimeError(
            f"worker dataplane features {dataplane.features()} differ from the main "
            f"process's {spec['features']}"
        )
    return dataplane, peers
