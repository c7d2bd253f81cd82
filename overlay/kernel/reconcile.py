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
Peer changes are programmed in batches, a check costs one dump of each kind and a
dictionary probe per object (``overlay.kernel.objects``): at 5,000 peers both stay in
the tens of milliseconds (README, "Scale").
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from ipaddress import ip_address
from typing import Any

from control.lease import Lease, LeaseId
from overlay.kernel.objects import (
    ENODEV,
    Claimed,
    IPAddress,
    IPNetwork,
    KernelError,
    KernelObject,
    KernelView,
    Reachable,
    Session,
    directly_reachable,
    format_mac,
    read_view,
)
from overlay.kernel.rtnl import Rtnl

RESYNC_INTERVAL = 10.0  # flanneld's route check period
EVENT_DELAY = 0.2  # batch a burst of netlink events into one resync
REPAIRS_LOGGED = 10  # repairs logged one by one per check; beyond, one line by kind

NODE = "node"  # the key of the per-node objects (device, address, network route)

# A peer's kernel objects (run on the worker), or None to skip it.
Program = Callable[[Lease, Reachable], list[KernelObject] | None]


class KernelState:
    """The kernel objects one backend wants, by key (``NODE`` or a peer's subnet).

    Peer changes are queued and programmed in batches: the worker takes everything
    queued when it gets to it (a burst that arrives while it programs the last batch
    becomes the next one, net: a peer added and removed again costs nothing), and
    sends the batch's rtnetlink messages together (``Session.run``)."""

    def __init__(
        self,
        log: Any,
        *,
        program: Program | None = None,
        devices: Iterable[str] = (),
        networks: Iterable[IPNetwork] = (),
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
        # Touched by the worker only: what each key wants, and how many keys want each
        # object (a node with two leases has one fdb entry for both).
        self._desired: dict[Hashable, list[KernelObject]] = {}
        self._wanted: Counter[KernelObject] = Counter()
        self._rtnl: Rtnl | None = None
        # Peer changes not programmed yet (lease ident -> lease, or None: remove), from the loop.
        self._lock = threading.Lock()
        self._pending: dict[LeaseId, Lease | None] = {}
        self._flush_queued = False
        self.repairs: Counter[str] = Counter()
        self.errors = 0
        self.resyncs = 0
        self.batches = 0
        self.missing: list[str] = []
        self.extra: list[str] = []
        self.checked_at: float | None = None
        self.check_cpu_ms: float | None = None  # the worker's CPU for the last check
        self._failing: set[str] = set()  # objects whose repair failed, logged once
        self._programmed: tuple[int, list[str]] = (-1, [])  # (version, sorted keys)
        self._version = 0  # of what is wanted: bumped by every change
        self._index: tuple[int, list[KernelObject], frozenset[str]] = (-1, [], frozenset())
        self._claims: tuple[tuple[int, tuple[tuple[str, int], ...]], Claimed] = (
            (-1, ()),
            Claimed(),
        )

    # -- changes (each runs on the worker, in order) ---------------------------------------

    def _submit(self, call: Callable[..., None], *args: Any) -> Future[None]:
        def done(future: Future[None]) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                self.errors += getattr(error, "failed", 1)  # a batch: every object that failed
                self.log.error("netlink_failed", step=call.__name__, error=str(error))

        future = self._worker.submit(call, *args)
        future.add_done_callback(done)
        return future

    def set(self, key: Hashable, objects: list[KernelObject]) -> Future[None]:
        """Program ``objects`` under ``key``, removing what the key had and no longer has."""
        return self._submit(self._change, {key: list(objects)})

    def forget(self, key: Hashable) -> Future[None]:
        """Stop wanting ``key``'s objects without removing them (their device is gone
        and will be made again)."""
        return self._submit(self._forget, key)

    def _forget(self, key: Hashable) -> None:
        self._wanted.subtract(self._desired.pop(key, []))
        self._wanted += Counter()  # drops the zeros
        self._version += 1

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        with self._lock:
            for lease in removed:
                self._pending[lease.ident] = None
            for lease in added:
                self._pending[lease.ident] = lease
            if self._flush_queued:
                return
            self._flush_queued = True
        self._submit(self._program_peers)

    def resync(self) -> Future[None]:
        return self._submit(self._resync)

    def _session(self) -> Session:
        if self._rtnl is None:
            self._rtnl = Rtnl()  # in the worker thread's (the daemon's) namespace
        return Session(self._rtnl)

    def _program_peers(self) -> None:
        """Everything queued, as one batch."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._flush_queued = False
        assert self.program is not None
        session = self._session()
        try:
            publics: list[IPAddress] = []
            for lease in pending.values():
                if lease is not None:
                    publics.append(lease.public_ip)
                    if lease.public_ipv6 is not None:
                        publics.append(lease.public_ipv6)
            reachable = _Reachability(session, publics)
            changes: dict[Hashable, list[KernelObject] | None] = {}
            for subnet, lease in pending.items():
                changes[subnet] = None if lease is None else self.program(lease, reachable)
            self._apply(session, changes)
        finally:
            session.close()

    def _change(self, changes: dict[Hashable, list[KernelObject] | None]) -> None:
        session = self._session()
        try:
            self._apply(session, changes)
        finally:
            session.close()

    def _apply(self, session: Session, changes: dict[Hashable, list[KernelObject] | None]) -> None:
        """Keys to their new objects (None: none): what no key wants any more is removed
        (last made, first removed), then what is new is made, in order."""
        gone: list[KernelObject] = []
        made: list[KernelObject] = []
        for key, objects in changes.items():
            old = self._desired.pop(key, [])
            self._wanted.subtract(old)
            if objects is not None:
                self._desired[key] = objects
                self._wanted.update(objects)
                made += [o for o in objects if o not in old]
            gone += reversed([o for o in old if o not in (objects or ())])
        gone = [o for o in dict.fromkeys(gone) if self._wanted[o] <= 0]
        self._wanted += Counter()  # drops the zeros
        self._version += 1
        self.batches += 1
        failed = self._run(session, [(o, False) for o in gone] + [(o, True) for o in made])
        if failed:
            obj, code = failed[0]
            error = KernelError(
                code,
                f"{obj.kind} {obj.describe()}: {os.strerror(code)}"
                + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""),
            )
            error.failed = len(failed)  # netlink_errors counts objects, as before batching
            raise error

    def _run(
        self, session: Session, changes: list[tuple[KernelObject, bool]]
    ) -> list[tuple[KernelObject, int]]:
        """Changes in order: the batched ones sent together (up to the next one that is
        not: a device must exist before what goes on it); the failures."""
        failed: list[tuple[KernelObject, int]] = []
        batch: list[tuple[KernelObject, bool]] = []
        for obj, add in changes:
            if obj.batched:
                batch.append((obj, add))
                continue
            failed += session.run(batch)
            batch = []
            try:
                obj.apply(session) if add else obj.remove(session)
            except KernelError as e:
                failed.append((obj, e.errno or 0))
        return failed + session.run(batch)

    # -- reconciliation ------------------------------------------------------------------

    def _wanted_now(self) -> tuple[list[KernelObject], frozenset[str]]:
        """Every wanted object (the single ones first, in the order they were wanted: a
        device before its settings) and the devices they are on: listed once per change
        of what is wanted, not per check."""
        if self._index[0] != self._version:
            wanted = list(self._wanted)
            devices = set(self.devices).union(*(obj.devices() for obj in wanted))
            self._index = (self._version, wanted, frozenset(devices))
        return self._index[1], self._index[2]

    def _claimed(self, wanted: list[KernelObject], indexes: dict[str, int]) -> Claimed:
        """What the wanted objects cover, for these device indexes (made again when what
        is wanted changes or a device is made again)."""
        key = (self._version, tuple(sorted(indexes.items())))
        if self._claims[0] != key:
            claimed = Claimed()
            for obj in wanted:
                obj.claim(claimed, indexes)
            self._claims = (key, claimed)
        return self._claims[1]

    def _missing(self, wanted: list[KernelObject], view: KernelView) -> list[KernelObject]:
        """The wanted objects the view lacks: the few single ones asked one by one, the
        batched ones (thousands) by set difference."""
        singles = [o for o in wanted if not o.batched and not o.present(view)]
        return singles + self._claimed(wanted, view.indexes).missing(view)

    def _resync(self) -> None:
        started = time.thread_time()
        self.resyncs += 1
        wanted, devices = self._wanted_now()
        session = self._session()
        try:
            view = read_view(session, devices, self.ipv6)
            missing = self._missing(wanted, view)
            if missing and self._repair(session, missing):
                view = read_view(session, devices, self.ipv6)
                missing = self._missing(wanted, view)
        finally:
            session.close()
        self.missing = sorted(o.describe() for o in missing)
        self.extra = self._extras(view, self._claimed(wanted, view.indexes))
        self.checked_at = time.time()
        self.check_cpu_ms = round((time.thread_time() - started) * 1000, 2)

    def _repair(self, session: Session, missing: list[KernelObject]) -> bool:
        """Put back what is missing: devices and their settings first, one by one, then
        the rest in one batch. True when anything was put back."""
        repaired: list[KernelObject] = []
        for obj in (o for o in missing if not o.batched):
            try:
                obj.apply(session)
            except KernelError as e:
                self._repair_failed(obj, e)
                continue
            repaired.append(obj)
        session.forget_indexes()
        batched = [o for o in missing if o.batched]
        failed = dict(session.run([(o, True) for o in batched]))
        for obj in batched:
            code = failed.get(obj)
            if code is None:
                repaired.append(obj)
            else:
                self._repair_failed(obj, KernelError(code, os.strerror(code)))
        for obj in repaired:
            self._failing.discard(f"{obj.kind} {obj.describe()}")
            self.repairs[obj.kind] += 1
        for obj in repaired[:REPAIRS_LOGGED]:
            self.log.warning("kernel_object_repaired", kind=obj.kind, object=obj.describe())
        if len(repaired) > REPAIRS_LOGGED:
            kinds = Counter(obj.kind for obj in repaired[REPAIRS_LOGGED:])
            self.log.warning(
                "kernel_objects_repaired", more=len(repaired) - REPAIRS_LOGGED, **kinds
            )
        return bool(repaired)

    def _repair_failed(self, obj: KernelObject, error: KernelError) -> None:
        """Said once per object until it is repaired; a device we cannot make again (the
        TUN: DeviceGone, ENODEV) is handed to ``on_gone``."""
        name = f"{obj.kind} {obj.describe()}"
        gone = error.errno == ENODEV
        if name not in self._failing:
            self._failing.add(name)
            say = self.log.warning if gone else self.log.error
            say(
                "kernel_object_missing" if gone else "kernel_repair_failed",
                kind=obj.kind,
                object=obj.describe(),
                error=error.strerror or str(error),
            )
        if gone and self.on_gone is not None:
            self.on_gone(obj)

    def _extras(self, view: KernelView, claimed: Claimed) -> list[str]:
        """What is on our devices (or routed inside the network via a gateway) that we did
        not program: reported, never removed (it may be an operator's)."""
        ours = {index for name, index in view.indexes.items() if name in self.devices}
        extra: list[str] = []
        for route in view.routes - claimed.routes:
            family, dst, size, gateway, oif, onlink = route
            if (family, dst, size, gateway, onlink) in claimed.routes_any:
                continue
            if oif in ours or (gateway is not None and self._inside(family, dst, size)):
                extra.append(f"route {view.describe_route(route)}")
        names = {index: name for name, index in view.indexes.items()}
        for index, ip, lladdr in view.neighbours - claimed.neighbours:
            if index in ours:
                mac = format_mac(lladdr)
                extra.append(f"neighbour {ip_address(ip)} lladdr {mac} dev {names[index]}")
        for index, lladdr, remote in view.fdb - claimed.fdb:
            if index in ours:
                mac = format_mac(lladdr)
                extra.append(f"fdb {mac} dst {ip_address(remote)} dev {names[index]}")
        for dev, address, prefixlen in view.addresses:
            if dev in self.devices and (dev, address) not in claimed.addresses:
                extra.append(f"address {address}/{prefixlen} dev {dev}")
        return sorted(extra)

    def _inside(self, family: int, dst: int, size: int) -> bool:
        """Whether the route to ``dst/size`` (of ``family``) lies inside an overlay network
        of that family."""
        version = 4 if family == socket.AF_INET else 6
        for network in self.networks:
            if network.version != version or size < network.prefixlen:
                continue
            shift = network.max_prefixlen - network.prefixlen
            if dst >> shift == int(network.network_address) >> shift:
                return True
        return False

    # -- reporting and shutdown -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        desired = dict(self._desired)
        version, programmed = self._programmed
        if version != self._version:  # sorted once per change, not per scrape
            programmed = sorted(str(k) for k in desired if k != NODE)
            self._programmed = (self._version, programmed)
        return {
            "programmed": list(programmed),
            "netlink_errors": self.errors,
            "kernel": {
                "objects": sum(len(v) for v in desired.values()),
                "missing": list(self.missing),
                "extra": list(self.extra),
                "checked_at": self.checked_at,
                "check_cpu_ms": self.check_cpu_ms,
                "resyncs": self.resyncs,
                "batches": self.batches,
            },
            "repairs": dict(sorted(self.repairs.items())),
        }

    async def stop(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


class _Reachability:
    """Which public IPs of one batch are on our L2 segment: asked of the kernel for all
    of them together, the first time a peer's objects need to know."""

    def __init__(self, session: Session, addresses: list[IPAddress]) -> None:
        self.session = session
        self.addresses = addresses
        self._direct: set[IPAddress] | None = None

    def __call__(self, address: IPAddress) -> bool:
        if self._direct is None:
            self._direct = directly_reachable(self.session, self.addresses)
        return address in self._direct


# -- event-driven resyncs -------------------------------------------------------------------

# rtnetlink multicast groups (linux/rtnetlink.h): links, neighbours (both families), IPv4
# addresses and routes, IPv6 addresses and routes.
RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x4, 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
NLMSG_HEADER = struct.Struct("=IHHII")


class KernelWatch:
    """Asks for a resync soon after the kernel announces a change to links, addresses,
    routes or neighbours (IPv6 addresses and routes with ``ipv6``: only a node that
    programs IPv6 objects resyncs on the host's IPv6 changes). Messages are not parsed
    beyond their header: any change may be one to our objects, and a resync is a handful
    of dumps."""

    def __init__(
        self, resync: Callable[[], object], delay: float = EVENT_DELAY, ipv6: bool = False
    ) -> None:
        self.resync = resync
        self.delay = delay
        self.groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
        if ipv6:
            self.groups |= RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
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
        sock.bind((0, self.groups))
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
