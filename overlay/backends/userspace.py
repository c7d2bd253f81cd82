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
from overlay.backends.kernel import direct_route, vtep_mac_of, vxlan_mtu
from overlay.backends.udp import UdpDataplane, open_socket
from overlay.backends.vxlan import VxlanDataplane
from overlay.counters import Counters
from overlay.kernel_routes import Address, KernelObject, Link, Route
from overlay.reconcile import NODE, KernelState
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
        self.lease: Lease | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rebuild_task: asyncio.Task[None] | None = None
        self.kernel = KernelState(
            ctx.log,
            program=self._peer_objects(),
            devices=(ctx.args.tun_name,),
            network=ctx.config.network,
            on_gone=self._device_gone,
        )

    def _peer_objects(self) -> Callable[[Lease], list[KernelObject] | None] | None:
        """How a peer's kernel objects are made (None: the udp backend has none)."""
        return None

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

    def node_objects(self, lease: Lease) -> list[KernelObject]:
        """flannel0: up with our MTU, the lease's network address as a /32, and one route
        for the whole overlay network."""
        name = self.ctx.args.tun_name
        return [
            Link(name, mtu=self.mtu),
            Address(name, lease.subnet.network_address),
            Route(self.ctx.config.network, dev=name),
        ]

    async def start(self, lease: Lease) -> None:
        assert self.tun is not None
        if not native.AVAILABLE:
            self.ctx.log.warning(
                "native_codecs_unavailable",
                error=native.LOAD_ERROR,
                effect="the pure-Python reference codecs run, several times slower",
            )
        self.lease = lease
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(netlink.prepare_tun, self.tun.name)
        await asyncio.wrap_future(self.kernel.set(NODE, self.node_objects(lease)))
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
        if self.kernel.program is not None:
            self.kernel.peers_changed(added, removed)

    # -- a TUN deleted under us (`ip link del flannel0`) ---------------------------------

    def _device_gone(self, obj: KernelObject) -> None:
        """Called on the netlink worker when the TUN is gone: a TUN cannot be recreated
        behind the dataplane's file descriptor, so the datapath is restarted."""
        if self._loop is not None and getattr(obj, "dev", None) == self.ctx.args.tun_name:
            self._loop.call_soon_threadsafe(self._rebuild_soon)

    def _rebuild_soon(self) -> None:
        if self._rebuild_task is None or self._rebuild_task.done():
            self._rebuild_task = asyncio.get_running_loop().create_task(self._rebuild())

    async def _rebuild(self) -> None:
        assert self.lease is not None
        name = self.ctx.args.tun_name
        self.ctx.log.warning("tun_lost", tun=name, action="recreating it, datapath restarts")
        try:
            # Until start() wants them again, a resync must not dress up the new TUN.
            await asyncio.wrap_future(self.kernel.forget(NODE))
            await self._stop_datapath()
            self.prepare()
            await self.start(self.lease)
        except Exception as e:  # noqa: BLE001 - the next resync tries again
            self.ctx.log.error("tun_rebuild_failed", tun=name, error=str(e))
            return
        self.kernel.repairs["tun"] += 1
        self.ctx.log.warning("kernel_object_repaired", kind="tun", object=name)

    def status(self) -> dict[str, Any]:
        features = getattr(self.dataplane, "features", None)
        result: dict[str, Any] = {
            "tun": self.tun.name if self.tun else None,
            "features": features() if features else {},
            **self.kernel.status(),
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

    async def _stop_datapath(self) -> None:
        workers, self.workers = self.workers, None
        if workers is not None:
            await workers.stop()
        dataplane, self.dataplane = self.dataplane, None
        if dataplane is not None:
            dataplane.stop(asyncio.get_running_loop())
            dataplane.sock.close()
        tun, self.tun = self.tun, None
        if tun is not None:
            tun.close()

    async def stop(self) -> None:
        if self._rebuild_task is not None:
            self._rebuild_task.cancel()
        await self.kernel.stop()
        await self._stop_datapath()


class VxlanBackend(UdpBackend):
    """VXLAN in userspace, interoperable with the kernel's vxlan device."""

    lease_type = "vxlan"
    name = "vxlan (userspace datapath)"
    overhead = vxlan.OVERHEAD

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.vni = ctx.config.backend.vni
        self.mac = vxlan.vtep_mac(str(ctx.underlay.public_ip), self.vni)

    def _peer_objects(self) -> Callable[[Lease], list[KernelObject] | None] | None:
        # DirectRouting: peers on our L2 segment get a plain kernel route, more specific
        # than the network's route into the TUN, so their traffic never reaches us.
        return self._direct if self.ctx.config.backend.direct_routing else None

    @staticmethod
    def _direct(lease: Lease) -> list[KernelObject] | None:
        if kernel_routes.directly_reachable(lease.public_ip):
            return direct_route(lease)
        return None

    @property
    def mtu(self) -> int:
        return vxlan_mtu(self.ctx)

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
