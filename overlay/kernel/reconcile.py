"""Keeping the kernel objects we programmed true: what `overlay status` reports as `kernel`.

flanneld recreates a deleted ``flannel.<VNI>`` and re-checks its host-gw routes every
10 s. ``KernelState`` does that for every object a backend programs (the vxlan device,
its settings and address, each peer's neighbour, fdb entry and route, host-gw and
DirectRouting routes, the TUN's settings, address and network route): periodically, and
within a fraction of a second of the kernel announcing a change (``KernelWatch``, an
rtnetlink multicast socket on the event loop). Each repair is counted by kind and logged
once; what is still missing, and what sits on our devices without being ours to want,
is in ``status()``.

All netlink work runs on one worker thread, in submission order (pyroute2's IPRoute
cannot run inside the event loop, and one thread keeps a peer's add and remove in order).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from pyroute2 import IPRoute

from control.lease import Lease
from overlay.kernel.objects import (
    Address,
    DeviceGone,
    Fdb,
    KernelError,
    KernelObject,
    KernelView,
    Neighbour,
    Route,
    devices_of,
    read_view,
)

RESYNC_INTERVAL = 10.0  # flanneld's route check period
EVENT_DELAY = 0.2  # batch a burst of netlink events into one resync

NODE = "node"  # the key of the per-node objects (device, address, network route)


class KernelState:
    """The kernel objects one backend wants, by key (``NODE`` or a peer's subnet)."""

    def __init__(
        self,
        log: Any,
        *,
        program: Callable[[Lease], list[KernelObject] | None] | None = None,
        devices: Iterable[str] = (),
        networks: Iterable[IPv4Network | IPv6Network] = (),
        on_gone: Callable[[KernelObject], None] | None = None,
    ) -> None:
        self.log = log
        self.program = program  # a peer's objects (runs in the worker); None: skipped
        self.devices = set(devices)  # ours: anything on them that we do not want is extra
        # Gateway routes inside these (the overlay network of each family) that we do
        # not want are extra; an IPv6 one also makes each check read the IPv6 state.
        self.networks = tuple(networks)
        self.ipv6 = any(network.version == 6 for network in self.networks)
        self.on_gone = on_gone  # a device we cannot recreate ourselves disappeared
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._desired: dict[Hashable, list[KernelObject]] = {}  # touched by the worker only
        self.repairs: Counter[str] = Counter()
        self.errors = 0
        self.resyncs = 0
        self.missing: list[str] = []
        self.extra: list[str] = []
        self.checked_at: float | None = None
        self._failing: set[str] = set()  # objects whose repair failed, logged once

    # -- changes (each runs on the worker, in order) ---------------------------------------

    def _submit(self, call: Callable[..., None], *args: Any) -> Future[None]:
        def done(future: Future[None]) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                self.errors += 1
                self.log.error("netlink_failed", step=call.__name__, error=str(error))

        future = self._worker.submit(call, *args)
        future.add_done_callback(done)
        return future

    def set(self, key: Hashable, objects: list[KernelObject]) -> Future[None]:
        """Program ``objects`` under ``key``, removing what the key had and no longer has."""
        return self._submit(self._set, key, list(objects))

    def drop(self, key: Hashable) -> Future[None]:
        return self._submit(self._drop, key)

    def forget(self, key: Hashable) -> Future[None]:
        """Stop wanting ``key``'s objects without removing them (their device is gone
        and will be made again)."""
        return self._submit(self._forget, key)

    def _forget(self, key: Hashable) -> None:
        self._desired.pop(key, None)

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        for lease in removed:
            self.drop(lease.subnet)
        for lease in added:
            self._submit(self._add_peer, lease)

    def resync(self) -> Future[None]:
        return self._submit(self._resync)

    def _set(self, key: Hashable, objects: list[KernelObject]) -> None:
        old = self._desired.pop(key, [])
        with IPRoute() as ipr:
            for obj in reversed(old):
                if obj not in objects:
                    obj.remove(ipr)
            self._desired[key] = objects
            for obj in objects:
                obj.apply(ipr)

    def _drop(self, key: Hashable) -> None:
        old = self._desired.pop(key, [])
        if old:
            with IPRoute() as ipr:
                for obj in reversed(old):
                    obj.remove(ipr)

    def _add_peer(self, lease: Lease) -> None:
        assert self.program is not None
        objects = self.program(lease)
        if objects is None:
            self._drop(lease.subnet)  # e.g. a peer that moved off our L2 segment
        else:
            self._set(lease.subnet, objects)

    # -- reconciliation ------------------------------------------------------------------

    def _resync(self) -> None:
        self.resyncs += 1
        wanted = [o for objects in list(self._desired.values()) for o in objects]
        devices = set(self.devices).union(*(devices_of(o) for o in wanted))
        with IPRoute() as ipr:
            view = read_view(ipr, devices, self.ipv6)
            repaired = False
            for obj in wanted:
                if obj.present(view):
                    continue
                repaired = self._repair(ipr, obj) or repaired
            if repaired:
                view = read_view(ipr, devices, self.ipv6)
        self.missing = [o.describe() for o in wanted if not o.present(view)]
        self.extra = self._extras(view, wanted)
        self.checked_at = time.time()

    def _repair(self, ipr: IPRoute, obj: KernelObject) -> bool:
        name = f"{obj.kind} {obj.describe()}"
        try:
            obj.apply(ipr)
        except DeviceGone as e:
            if name not in self._failing:
                self._failing.add(name)
                self.log.warning(
                    "kernel_object_missing",
                    kind=obj.kind,
                    object=obj.describe(),
                    error=e.strerror or str(e),
                )
            if self.on_gone is not None:
                self.on_gone(obj)
            return False
        except KernelError as e:
            if name not in self._failing:
                self._failing.add(name)
                self.log.error(
                    "kernel_repair_failed",
                    kind=obj.kind,
                    object=obj.describe(),
                    error=e.strerror or str(e),
                )
            return False
        self._failing.discard(name)
        self.repairs[obj.kind] += 1
        self.log.warning("kernel_object_repaired", kind=obj.kind, object=obj.describe())
        return True

    def _extras(self, view: KernelView, wanted: list[KernelObject]) -> list[str]:
        """What is on our devices (or routed inside the network via a gateway) that we did
        not program: reported, never removed (it may be an operator's)."""
        routes = [o for o in wanted if isinstance(o, Route)]
        extra: list[str] = []
        for route in view.routes:
            ours = route.dev in self.devices
            stale_gateway = route.gateway is not None and any(
                _inside(route.dst, network) for network in self.networks
            )
            if (ours or stale_gateway) and not any(r.matches(route) for r in routes):
                extra.append(f"route {route.describe()}")
        # Sorted by their text: IPv4 and IPv6 addresses do not compare with each other.
        neighbours = {(o.dev, o.dst) for o in wanted if isinstance(o, Neighbour)}
        for (dev, dst), (lladdr, permanent) in sorted(view.neighbours.items(), key=str):
            if dev in self.devices and permanent and (dev, dst) not in neighbours:
                extra.append(f"neighbour {dst} lladdr {lladdr} dev {dev}")
        fdb = {(o.dev, o.lladdr.lower(), o.dst) for o in wanted if isinstance(o, Fdb)}
        for dev, lladdr, dst in sorted(view.fdb, key=str):
            if dev in self.devices and (dev, lladdr, dst) not in fdb:
                extra.append(f"fdb {lladdr} dst {dst} dev {dev}")
        addresses = {(o.dev, o.address) for o in wanted if isinstance(o, Address)}
        for dev, address, prefixlen in sorted(view.addresses, key=str):
            if dev in self.devices and (dev, address) not in addresses:
                extra.append(f"address {address}/{prefixlen} dev {dev}")
        return extra

    # -- reporting and shutdown -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        desired = dict(self._desired)
        return {
            "programmed": sorted(str(k) for k in desired if k != NODE),
            "netlink_errors": self.errors,
            "kernel": {
                "objects": sum(len(v) for v in desired.values()),
                "missing": list(self.missing),
                "extra": list(self.extra),
                "checked_at": self.checked_at,
                "resyncs": self.resyncs,
            },
            "repairs": dict(sorted(self.repairs.items())),
        }

    async def stop(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _inside(dst: IPv4Network | IPv6Network, network: IPv4Network | IPv6Network) -> bool:
    if isinstance(dst, IPv4Network) and isinstance(network, IPv4Network):
        return dst.subnet_of(network)
    if isinstance(dst, IPv6Network) and isinstance(network, IPv6Network):
        return dst.subnet_of(network)
    return False


# -- event-driven resyncs -------------------------------------------------------------------

# rtnetlink multicast groups (linux/rtnetlink.h): links, neighbours, IPv4 addresses, routes.
RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x4, 0x10, 0x40
NLMSG_HEADER = struct.Struct("=IHHII")


class KernelWatch:
    """Asks for a resync soon after the kernel announces a change to links, addresses,
    routes or neighbours. Messages are not parsed beyond their header: any change may be
    one to our objects, and a resync is a handful of dumps."""

    def __init__(self, resync: Callable[[], object], delay: float = EVENT_DELAY) -> None:
        self.resync = resync
        self.delay = delay
        self.events = 0
        self._sock: socket.socket | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            socket.NETLINK_ROUTE,
        )
        sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None and self._loop is not None
        changed = False
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                changed = changed or e.errno == errno.ENOBUFS  # we missed some: resync
                if e.errno != errno.ENOBUFS:
                    break
                continue
            changed = changed or len(data) >= NLMSG_HEADER.size
        if changed:
            self.events += 1
            if self._pending is None:
                self._pending = self._loop.call_later(self.delay, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self.resync()

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
