"""What the backends whose datapath is this process share: a TUN device and a UDP socket
joined by a dataplane (``overlay.dataplane``), and with ``--workers N`` one forwarding
process per further queue of a multi-queue TUN. The udp backend and vxlan's userspace
datapath differ only in their framing (``DataplaneSpec.framing``), lease and MTU.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from control.lease import Lease
from encap import native
from overlay.backends.base import Backend, Context, Underlay
from overlay.dataplane.spec import DataplaneSpec, build_dataplane
from overlay.dataplane.udp_socket import open_socket
from overlay.dataplane.worker_protocol import WorkerSpec
from overlay.dataplane.workers import Workers
from overlay.impair.rules import Rules
from overlay.kernel.objects import Address, KernelObject, Link, Route
from overlay.kernel.reconcile import NODE, KernelState, Program
from tun import netlink, steering
from tun.device import TunDevice


class UserspaceBackend(Backend):
    in_process = True
    overhead = 0  # bytes the framing adds to each packet

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.tun: TunDevice | None = None
        self.steering = "automq"  # how the kernel picks a TUN queue (tun.steering)
        self.lease: Lease | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rebuild_task: asyncio.Task[None] | None = None
        self._impairment = Rules()
        self.kernel: KernelState = KernelState(
            ctx.log,
            program=self._peer_objects(),
            devices=(ctx.options.tun_name,),
            networks=ctx.config.overlay_networks,
            on_gone=self._device_gone,
        )

    def _peer_objects(self) -> Program | None:
        """How a peer's kernel objects are made (None: it has none)."""
        return None

    def dataplane_spec(self, lease: Lease) -> DataplaneSpec:
        """The dataplane this backend forwards with, for ``lease``."""
        raise NotImplementedError

    def mtu_for(self, underlay: Underlay) -> int:
        return underlay.mtu - self.overhead

    def prepare(self) -> None:
        # With offloads, IFF_VNET_HDR from the start (TCP super-packets can then be written
        # into the TUN) rather than switched on later, which bounces the link's carrier.
        options = self.ctx.options
        self.tun = TunDevice(
            options.tun_name, vnet_hdr=options.offload, multi_queue=options.workers > 1
        )

    def node_objects(self, lease: Lease) -> list[KernelObject]:
        """flannel0: up with our MTU, the lease's network address as a /32, and one route
        for the whole overlay network (IPv6 only: no IPv4 address, no IPv4 route)."""
        name = self.ctx.options.tun_name
        if not self.ctx.config.enable_ipv4:
            return [Link(name, mtu=self.mtu)]
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
        spec = self.dataplane_spec(lease)
        ipv6 = spec.subnet6 is not None
        await asyncio.to_thread(netlink.prepare_tun, self.tun.name, ipv6=ipv6)
        await asyncio.wrap_future(self.kernel.set(NODE, self.node_objects(lease)))
        count = self.ctx.options.workers
        sock = self._open_socket(reuse_port=count > 1)
        sock6 = self._open_socket(reuse_port=count > 1, ipv6=True) if ipv6 else None
        self.dataplane = dataplane = build_dataplane(
            spec, self.tun, sock, self.ctx.peers, self.ctx.counters, sock6
        )
        dataplane.set_impairment(self._impairment)
        if count > 1:
            await self._start_workers(count - 1, self.worker_spec(spec.as_built(dataplane)), ipv6)
        dataplane.start(asyncio.get_running_loop())

    async def _start_workers(self, count: int, spec: WorkerSpec, ipv6: bool) -> None:
        """``count`` workers, each with a TUN queue and a socket of its own beside ours on
        the same address (SO_REUSEPORT), and with ``ipv6`` (vxlan's IPv6 half) a second
        one beside ours on our IPv6 underlay address: the kernel spreads received
        datagrams of either family over the workers by their 4-tuple."""
        assert self.tun is not None
        try:
            steering.steer_by_flow_hash(self.tun.fd)
            self.steering = "flow_hash"
        except OSError as e:
            self.ctx.log.warning(
                "tun_steering_unavailable",
                error=e.strerror or str(e),
                effect="each flow leaves through the worker that receives its replies",
            )
        # Before our own dataplane runs and before the first peer snapshot: every worker
        # starts with the table as it is and gets every change after.
        self.workers = Workers(self.ctx.log)
        await self.workers.start(
            count,
            self.tun.open_queue,
            lambda: self._open_socket(reuse_port=True),
            spec,
            [peer.lease for peer in self.ctx.peers.peers()],
            (lambda: self._open_socket(reuse_port=True, ipv6=True)) if ipv6 else None,
        )

    def _open_socket(self, *, reuse_port: bool, ipv6: bool = False) -> socket.socket:
        """The socket peers send to, on our underlay address (``ipv6``: the IPv6 one).
        IPv6 only, the IPv4 half's is bound nowhere: it never receives (nothing listens on
        an IPv4 port) and never sends (no IPv4 peer, no IPv4 route into the TUN)."""
        underlay = self.ctx.underlay
        if not ipv6 and not self.ctx.config.enable_ipv4:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        address = str(underlay.address6 if ipv6 else underlay.address)
        port = self.ctx.config.backend.port
        try:
            return open_socket(address, port, reuse_port=reuse_port)
        except OSError as e:
            shown = f"[{address}]" if ipv6 else address
            raise OSError(e.errno, f"cannot bind UDP {shown}:{port}: {e.strerror}") from None

    def worker_spec(self, spec: DataplaneSpec) -> WorkerSpec:
        """What a worker process needs to build the same dataplane on its own queue."""
        assert self.tun is not None and self.dataplane is not None
        return WorkerSpec(
            dataplane=spec,
            node=str(self.ctx.underlay.public_ip),
            tun=self.tun.name,
            vnet_hdr=self.tun.vnet_hdr,
            offload_features=self.tun.offload_features,
            features=self.dataplane.features(),
            log=self.ctx.log_options,
            impairment=self._impairment.to_json(),
        )

    async def follow_underlay(self, underlay: Underlay) -> None:
        """The dataplanes first (they answer a packet longer than the new MTU with
        frag-needed, whatever the TUN's MTU is still), then the TUN's MTU, after which the
        kernel answers for the packets it routes there."""
        await super().follow_underlay(underlay)
        mtu = self.mtu
        if self.dataplane is not None:
            self.dataplane.set_mtu(mtu)
        if self.workers is not None:
            self.workers.set_mtu(mtu)
        if self.lease is not None:
            await asyncio.wrap_future(self.kernel.set(NODE, self.node_objects(self.lease)))

    @property
    def impairment(self) -> Rules:
        return self._impairment

    def impair(self, rules: Rules) -> None:
        """This process's dataplane and every worker's, from their next wake-up on (before
        start: from the first)."""
        self._impairment = rules
        if self.dataplane is not None:
            self.dataplane.set_impairment(rules)
        if self.workers is not None:
            self.workers.impair(rules)

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        if self.workers is not None:
            self.workers.peers_changed(added, removed)
        if self.kernel.program is not None:
            self.kernel.peers_changed(added, removed)

    # -- a TUN deleted under us (`ip link del flannel0`) ---------------------------------

    def _device_gone(self, obj: KernelObject) -> None:
        """Called on the netlink worker when the TUN is gone: a TUN cannot be recreated
        behind the dataplane's file descriptor, so the datapath is restarted."""
        if self._loop is not None and self.ctx.options.tun_name in obj.devices():
            self._loop.call_soon_threadsafe(self._rebuild_soon)

    def _rebuild_soon(self) -> None:
        if self._rebuild_task is None or self._rebuild_task.done():
            self._rebuild_task = asyncio.get_running_loop().create_task(self._rebuild())

    async def _rebuild(self) -> None:
        assert self.lease is not None
        name = self.ctx.options.tun_name
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
        result: dict[str, Any] = {
            "tun": self.tun.name if self.tun else None,
            "features": self.dataplane.features() if self.dataplane else {},
            "impairment": self._impairment.to_json(),
            "busy_poll_us": self.ctx.options.busy_poll_us,
            **self.kernel.status(),
        }
        if self.workers is not None:
            result["tun_steering"] = self.steering
            result["workers"] = [self._own_status(), *self.workers.status()]
        return result

    def _own_status(self) -> dict[str, Any]:
        """This process as worker 0 (the node sums the counters of all of them)."""
        return {
            "index": 0,
            "pid": os.getpid(),
            "alive": True,
            "counters": self.ctx.counters.snapshot(),
            "features": self.dataplane.features() if self.dataplane else {},
            "mtu": self.dataplane.mtu if self.dataplane else None,
            "arp_replies": self.dataplane.arp_replies if self.dataplane else 0,
            "ipv6": self.dataplane.ipv6_status() if self.dataplane else {},
        }

    async def _stop_datapath(self) -> None:
        workers, self.workers = self.workers, None
        if workers is not None:
            await workers.stop()
        dataplane, self.dataplane = self.dataplane, None
        if dataplane is not None:
            dataplane.stop(asyncio.get_running_loop())
            for sock in dataplane.sockets():
                sock.close()
        tun, self.tun = self.tun, None
        if tun is not None:
            tun.close()

    async def stop(self) -> None:
        if self._rebuild_task is not None:
            self._rebuild_task.cancel()
        await self.kernel.stop()
        await self._stop_datapath()
