"""`overlay run`: wire the registry, the lease, the peer table and the backend together.

Startup order is chosen so that a failure leaves nothing behind: the interface first,
then the config (which names the backend), then what the backend can fail to create for
lack of permission (the TUN), and only then the lease, addresses, routes, the iptables
rules, the socket and subnet.env; then systemd hears READY=1.

SIGTERM and SIGINT are handled from the first moment the event loop runs: startup is a
task raced against them, so a daemon waiting for a config, retrying an unreachable
registry or blocked on a registry lock stops within a second, undoing what it had made
(``overlay.lifecycle`` keeps a blocked thread from holding the process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import structlog

from control.config import ConfigError, NetworkConfig, config_json, parse_config
from control.etcd_registry import EtcdRegistry, TlsFiles
from control.file_registry import FileRegistry
from control.kv import KeyValueStore, RegistryConfigError, RegistryError
from control.lease import Lease
from control.peer_table import PeerTable
from control.subnet_env import SubnetEnv
from control.subnet_manager import RENEW_RETRY, LeaseEvent, LeaseLost, SubnetManager
from overlay import health, kernel_routes, lifecycle, metrics, status, systemd, trace
from overlay import log as overlay_log
from overlay.backends.base import Backend, BackendError, Context, Underlay
from overlay.backends.kernel import HostGwBackend, KernelVxlanBackend
from overlay.backends.userspace import UdpBackend, VxlanBackend
from overlay.counters import Counters, add_snapshots
from overlay.drop_log import DropLog, Drops
from overlay.ipmasq import Iptables, IptablesError, IptablesRules
from overlay.reconcile import RESYNC_INTERVAL, KernelWatch
from overlay.subnet_file import read_previous, write_subnet_env
from overlay.underlay import UnderlayError, select_underlay
from tun import netlink

PROG = "overlay run"
T = TypeVar("T")
STOP_BUDGET = 0.8  # seconds shutdown may take in all (SIGTERM -> exit within a second)
# While the registry is unreachable, how often to ask it whether it is back (one small
# read; nothing is asked while it answers).
REGISTRY_PROBE = 2.0
# Notify events of the subnet manager that mean the registry did not answer.
REGISTRY_FAILURES = frozenset({"watch_failed", "registry_unavailable", "lease_renew_failed"})
QUIT_EXIT = 2  # after SIGQUIT's stack dump, as a Go program exits
# Up to this many peers /metrics is rendered on the loop, one pause between two drains
# (0.3 ms for 2 peers, 2.2 ms for 100, 19 ms for 1000 measured here); above, in a thread,
# whose GIL share the drain loops take back every sys.getswitchinterval() (5 ms).
RENDER_INLINE_PEERS = 200


class Fatal(Exception):
    """A startup or runtime error that ends the daemon with one line and exit status 1."""


def registry_for(args: argparse.Namespace, notify: Any = None) -> KeyValueStore:
    """etcd when --etcd-endpoints is given, else the embedded file registry. etcd's TLS
    files are checked here (RegistryConfigError, one line, before anything is made); the
    registry file's path, owner, mode and content first thing in ``Daemon.start``, as
    that takes its lock, which may be held."""
    if args.etcd_endpoints:
        if (args.etcd_username is None) != (args.etcd_password is None):
            raise Fatal("--etcd-username and --etcd-password go together")
        return EtcdRegistry(
            args.etcd_endpoints,
            tls=TlsFiles(args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile),
            username=args.etcd_username,
            password=args.etcd_password,
        )
    return FileRegistry(args.registry_file, **({"notify": notify} if notify else {}))


def registry_info(args: argparse.Namespace) -> dict[str, Any]:
    """Which registry is in use, as the start-up line and `overlay status` show it."""
    if args.etcd_endpoints:
        return {
            "kind": "etcd",
            "endpoints": [str(e) for e in args.etcd_endpoints],
            "prefix": args.etcd_prefix,
        }
    return {"kind": "file", "path": str(args.registry_file), "prefix": args.etcd_prefix}


def check_paths(args: argparse.Namespace) -> None:
    """Files the daemon reads must be regular files: opening a FIFO (or a device) would
    block startup until someone writes to it. Checked with stat, which never blocks."""
    paths = [("--subnet-file", args.subnet_file)]
    if not args.etcd_endpoints:
        paths.append(("--registry-file", args.registry_file))
    for flag, path in paths:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as e:
            raise Fatal(f"{flag} {path}: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else ""
            raise Fatal(f"{flag} {path} is not a regular file{f' ({kind})' if kind else ''}")


async def make_backend(ctx: Context) -> Backend:
    """The backend the network config asks for (and, for vxlan, the chosen datapath)."""
    kind = ctx.config.backend.type
    if kind == "udp":
        return UdpBackend(ctx)
    if kind == "host-gw":
        return HostGwBackend(ctx)
    datapath = ctx.args.vxlan_datapath
    if datapath == "auto":
        kernel = await asyncio.to_thread(kernel_routes.kernel_has_vxlan)
        datapath = "kernel" if kernel else "userspace"
    return KernelVxlanBackend(ctx) if datapath == "kernel" else VxlanBackend(ctx)


class Daemon:
    def __init__(self, args: argparse.Namespace, underlay: Underlay) -> None:
        self.args = args
        self.underlay = underlay
        self.log = structlog.get_logger().bind(node=str(underlay.public_ip))
        self.readiness = health.Readiness(registry_grace=args.registry_timeout)
        self._registry_down = asyncio.Event()
        self._watch_down = False  # between watch_failed and watch_recovered
        self.registry = registry_info(args)
        self.kv = registry_for(args, self._notify)
        self.manager = SubnetManager(
            self.kv,
            public_ip=underlay.public_ip,
            prefix=args.etcd_prefix,
            renew_margin=args.subnet_lease_renew_margin * 60,
            notify=self._notify,
        )
        self.counters = Counters(drops=Drops())
        self.started = time.time()
        self.config: NetworkConfig | None = None
        self.lease: Lease | None = None
        self.backend: Backend | None = None
        self.peers: PeerTable | None = None
        self.iptables: IptablesRules | None = None
        self._warned_backend: set[IPv4Network] = set()
        self.lease_expires: float | None = None  # Unix time; None for a reservation
        self.next_renewal: float | None = None
        self.captures: trace.Captures | None = None  # userspace datapaths only
        self.stopping = asyncio.Event()
        self.exit_code = 0

    def _notify(self, event: str, **fields: Any) -> None:
        registry = self.readiness.registry
        if event in REGISTRY_FAILURES:
            registry.failed()
            self._registry_down.set()
        if event == "watch_failed":  # said once per outage: the probe follows it after
            self._watch_down = True
        elif event == "watch_recovered":
            self._watch_down = False
            registry.answered()
        if event == "lease_renewed":
            registry.answered()
            self._lease_renewed(float(fields.get("ttl", self.manager.ttl)))
        elif event == "lease_renew_failed":
            self.next_renewal = time.time() + RENEW_RETRY
        warning = ("failed", "invalid", "compacted", "lost", "held")
        level = "warning" if event.endswith(warning) else "info"
        getattr(self.log, level)(event, **fields)

    def _lease_renewed(self, ttl: float) -> None:
        now = time.time()
        self.lease_expires = now + ttl
        self.next_renewal = now + max(ttl - self.manager.renew_margin, 1.0)

    # -- startup -------------------------------------------------------------------------

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry ``call`` while the registry is unreachable, up to --registry-timeout."""
        deadline = time.monotonic() + self.args.registry_timeout
        delay = 0.5
        last = ""
        while True:
            try:
                return await call()
            except RegistryConfigError as e:
                raise Fatal(str(e)) from None  # retrying cannot fix it: say so at once
            except RegistryError as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Fatal(
                        f"registry unreachable for {self.args.registry_timeout:g} s while "
                        f"{what}: {e}"
                    ) from None
                if str(e) != last:
                    self.log.warning("registry_unavailable", step=what, error=str(e))
                    last = str(e)
                await asyncio.sleep(min(delay, left))  # the last try is at the deadline
                delay = min(delay * 2, 5.0)

    async def _network_config(self) -> NetworkConfig:
        args = self.args
        read = self.manager.read_config
        try:
            config = await self._retrying("reading the config", read)
            if config is None and args.network is not None:
                seed = config_json(args.network, args.backend or "udp").encode()
                try:  # all of it checked before anything is written
                    self._check_network(parse_config(seed), "--network")
                except ConfigError as e:
                    raise Fatal(f"--network {args.network}: {e}; nothing was written") from None
                created = await self._retrying(
                    "seeding the config",
                    lambda: self.kv.create(self.manager.config_key, seed, None),
                )
                if created:
                    self.log.info("config_seeded", network=str(args.network))
                config = await self._retrying("reading the config", read)
            if config is None:
                config = await self.manager.wait_for_config()
        except ConfigError as e:
            raise Fatal(f"invalid network config at {self.manager.config_key}: {e}") from None
        self._check_network(config, f"the registry's Network at {self.manager.config_key}")
        if args.network is not None and config.network != args.network:
            raise Fatal(
                f"--network {args.network} disagrees with the registry's Network "
                f"{config.network}: drop the flag or fix {self.manager.config_key}"
            )
        if args.backend is not None and config.backend.type != args.backend:
            raise Fatal(
                f"--backend {args.backend} disagrees with the registry's Backend.Type "
                f"{config.backend.type!r}"
            )
        for warning in config.warnings:
            self.log.warning("config_key_ignored", key=self.manager.config_key, detail=warning)
        return config

    def _check_backend_options(self, backend: Backend) -> None:
        options = self.config.backend if self.config else None
        if options is None or options.type != "vxlan":
            return
        if options.learning and not isinstance(backend, KernelVxlanBackend):
            self.log.warning(
                "config_key_ignored",
                key=self.manager.config_key,
                detail="Backend.Learning: the userspace datapath learns nothing (it answers "
                "ARP for its VTEP and keeps its peers from the registry)",
            )
        room = self.underlay.mtu - 50
        if options.mtu is not None and options.mtu > room:
            self.log.warning(
                "mtu_too_large",
                mtu=options.mtu,
                underlay_allows=room,
                effect="encapsulated packets exceed the underlay MTU and are fragmented",
            )

    async def _check_file_registry(self) -> None:
        assert isinstance(self.kv, FileRegistry)
        await asyncio.to_thread(self.kv.check_sync)

    def _check_network(self, config: NetworkConfig, source: str) -> None:
        """A network that holds this node's own underlay address cannot work: its route
        into the TUN would swallow the traffic to the other nodes."""
        for address in {self.underlay.address, self.underlay.public_ip}:
            if address in config.network:
                raise Fatal(
                    f"{source} {config.network} contains this node's underlay address "
                    f"{address} ({self.underlay.iface}): the overlay must not overlap the "
                    "underlay"
                )

    async def start(self) -> Backend:
        self.log.info("registry", **self.registry)
        if isinstance(self.kv, FileRegistry):  # its directory, lock and content, at once
            await self._retrying("checking the registry file", self._check_file_registry)
        self.config = config = await self._network_config()
        self.peers = PeerTable(config.backend.port)
        ctx = Context(self.args, self.underlay, config, self.counters, self.peers, self.log)
        self.backend = backend = await make_backend(ctx)
        if self.args.workers > 1 and not isinstance(backend, UdpBackend):
            raise Fatal(
                f"--workers {self.args.workers} needs a userspace datapath (udp, or vxlan "
                f"with --vxlan-datapath userspace); {backend.name} forwards in the kernel: "
                "use --workers 1"
            )
        self._check_backend_options(backend)
        self.peers.prefix_for = backend.prefix_for
        iptables = self._iptables_command()
        backend.prepare()  # the TUN, before any lease: a permission error leaves nothing
        self.manager.backend_type = backend.lease_type
        self.manager.backend_data = backend.lease_data()
        subnet_file = Path(self.args.subnet_file)
        previous = await asyncio.to_thread(read_previous, subnet_file)
        self.lease = lease = await self._retrying(
            "acquiring a lease",
            lambda: self.manager.acquire(config, previous.subnet.network if previous else None),
        )
        self.readiness.registry.answered()
        if lease.has_ttl:
            self._lease_renewed(self.manager.ttl)
        self.readiness.step("lease")
        await backend.start(lease)
        self.readiness.step("datapath")
        if iptables is not None:
            await self._install_iptables(iptables, config, lease, previous)
        env = SubnetEnv.for_lease(config.network, lease.subnet, backend.mtu, self.args.ip_masq)
        await asyncio.to_thread(write_subnet_env, subnet_file, env)
        self.readiness.step("subnet_env")
        self._attach_captures(backend)
        shown = backend.status()
        for detail in ("workers", "kernel", "programmed", "repairs"):
            shown.pop(detail, None)  # in `overlay status`
        self.log.info(
            "started",
            subnet=str(lease.subnet),
            network=str(config.network),
            backend=backend.name,
            iface=self.underlay.iface,
            public_ip=str(self.underlay.public_ip),
            mtu=backend.mtu,
            registry=self.registry["kind"],
            ip_masq=self.args.ip_masq,
            **shown,
        )
        return backend

    def _iptables_command(self) -> Iptables | None:
        """The iptables command, if rules are wanted: --ip-masq needs it, the default
        FORWARD rules are skipped with one warning where there is none."""
        if not (self.args.ip_masq or self.args.iptables_forward_rules):
            return None
        try:
            return Iptables()
        except IptablesError as e:
            if self.args.ip_masq:
                raise Fatal(f"--ip-masq: {e.strerror}") from None
            self.log.warning(
                "forward_rules_skipped",
                reason=e.strerror,
                effect="a FORWARD policy of DROP would block the overlay",
            )
            return None

    async def _install_iptables(
        self, ipt: Iptables, config: NetworkConfig, lease: Lease, previous: SubnetEnv | None
    ) -> None:
        rules = IptablesRules(
            ipt,
            config.network,
            lease.subnet,
            ip_masq=self.args.ip_masq,
            forward=self.args.iptables_forward_rules,
        )

        def install() -> None:
            if previous is not None and self.args.ip_masq:
                old = previous.subnet.network
                if (previous.network, old) != (config.network, lease.subnet):
                    rules.recycle(previous.network, old)
            rules.install()

        self.iptables = rules  # before they exist: a stop during the install removes them
        try:
            await asyncio.to_thread(install)
        except IptablesError as e:
            self.iptables = None
            await asyncio.to_thread(rules.remove)
            if self.args.ip_masq:
                raise Fatal(f"installing the ip-masq rules: {e.strerror}") from None
            self.log.warning("forward_rules_skipped", reason=e.strerror)
            return
        self.log.info(
            "iptables_rules_installed",
            sets=[s.name for s in rules.sets],
            random_fully=rules.random_fully,
            resync_s=self.args.iptables_resync,
        )

    # -- registry events -----------------------------------------------------------------

    def _usable(self, lease: Lease) -> bool:
        assert self.backend is not None
        if self.backend.accepts(lease):
            return True
        if lease.subnet not in self._warned_backend:
            self._warned_backend.add(lease.subnet)
            self.log.warning(
                "peer_skipped",
                subnet=str(lease.subnet),
                backend=lease.backend_type or "udp",
                reason=f"lease backend differs from ours ({self.backend.name})",
            )
        return False

    def _changed(self, added: list[Lease], removed: list[Lease]) -> None:
        assert self.backend is not None
        for lease in added:
            self.log.info("peer_added", subnet=str(lease.subnet), public_ip=str(lease.public_ip))
        for lease in removed:
            self.log.info("peer_removed", subnet=str(lease.subnet))
        if added or removed:
            self.backend.peers_changed(added, removed)

    def on_snapshot(self, leases: list[Lease]) -> None:
        assert self.peers is not None
        self.readiness.registry.answered()
        self.readiness.registry.resyncs += 1
        if overlay_log.enabled(2):
            self.log.debug("leases_listed", leases=len(leases))
        self._changed(*self.peers.replace_all([x for x in leases if self._usable(x)]))

    def on_event(self, event: LeaseEvent) -> None:
        assert self.peers is not None
        self.readiness.registry.answered()
        self.readiness.registry.watch_events += 1
        if overlay_log.enabled(2):
            self.log.debug("lease_event", kind=event.kind, subnet=str(event.subnet))
        if event.lease is not None:
            old = self.peers.get(event.subnet)
            if not self._usable(event.lease):
                if old is not None:  # a peer that switched to another backend
                    self.peers.remove(event.subnet)
                    self._changed([], [old.lease])
            elif self.peers.upsert(event.lease):
                self._changed([event.lease], [])
        elif (peer := self.peers.remove(event.subnet)) is not None:
            self._changed([], [peer.lease])

    # -- what the daemon shows: status, metrics, health, traces -----------------------------

    def _registry_status(self) -> dict[str, Any]:
        """Which registry (``registry_info``) and how it answers."""
        registry = self.readiness.registry
        info = self.registry
        address = ",".join(info["endpoints"]) if info["kind"] == "etcd" else info["path"]
        gone = registry.unreachable_for()
        state = "connected" if registry.connected else "unreachable"
        if not registry.connected_once and gone is None:
            state = "connecting"
        return {
            **info,
            "address": address,
            "state": state,
            "unreachable_for_s": None if gone is None else round(gone, 1),
            "watch_revision": self.manager.watch_revision,
            "watch_events": registry.watch_events,
            "resyncs": registry.resyncs,
            "watch_failures": registry.failures,
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything `overlay status` shows (and /metrics exports), also while starting."""
        ready, reason = self.readiness.check()
        base: dict[str, Any] = {
            "state": "stopping" if self.stopping.is_set() else "running",
            "version": metrics.version(),
            "node": str(self.underlay.public_ip),
            "started_at": round(self.started, 3),
            "uptime_s": round(time.time() - self.started, 1),
            "ready": {"ready": ready, "reason": reason},
            "registry": self._registry_status(),
        }
        if "datapath" not in self.readiness.done:
            return {**base, "state": "starting"}
        assert self.config is not None and self.lease is not None
        assert self.backend is not None
        margin = self.manager.renew_margin
        return {
            **base,
            "lease": {
                "subnet": str(self.lease.subnet),
                "public_ip": str(self.lease.public_ip),
                "key": self.manager.key_of(self.lease),
                "expires": None if self.lease_expires is None else round(self.lease_expires, 3),
                "next_renewal": None if self.next_renewal is None else round(self.next_renewal, 3),
                "renew_margin_s": margin,
            },
            "network": str(self.config.network),
            "backend": self.config.backend.type,
            "datapath": self.backend.name,
            "iface": self.underlay.iface,
            "mtu": self.backend.mtu,
            **self._counters_and_status(),
        }

    def _counters_and_status(self) -> dict[str, Any]:
        """The backend's status, the peers with their traffic, and the counters: with
        --workers, the sums over every worker (each one's own are in ``workers``).
        ``repairs`` counts every kernel object and iptables rule put back, by kind."""
        assert self.backend is not None and self.peers is not None
        # The native drains keep their counts between wake-ups: added here, before the
        # counters and the peers' PeerStats (_peer_rows) are read.
        self.counters.settle()
        backend = self.backend.status()
        workers = backend.get("workers")
        if workers:
            counters = add_snapshots([w["counters"] for w in workers])
        elif isinstance(self.backend, UdpBackend):
            counters = self.counters.snapshot()
        else:
            counters = {}  # the kernel forwards: its counters are in kernel_counters
        reported = [w.pop("peers", {}) for w in workers or []]
        repairs = dict(backend.pop("repairs", {}))
        if self.iptables is not None:
            repairs["iptables"] = self.iptables.repairs
            backend["iptables"] = self.iptables.status()
        return {
            "peers": self._peer_rows(reported),
            "counters": counters,
            **backend,
            "repairs": repairs,
        }

    def _peer_rows(self, reported: list[dict[str, list[float]]]) -> list[dict[str, Any]]:
        """Every peer; for a userspace datapath with its traffic: this process's PeerStats
        plus what each worker reported for the same subnet."""
        assert self.peers is not None
        now, wall = time.monotonic(), time.time()
        counted = isinstance(self.backend, UdpBackend)
        rows = []
        for peer in sorted(self.peers.peers(), key=lambda p: p.net):
            subnet = str(peer.lease.subnet)
            row: dict[str, Any] = {"subnet": subnet, "public_ip": peer.addr[0]}
            row["port"] = peer.addr[1]
            if counted:
                s = peer.stats
                sums = [s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes]
                last = [s.last_tx, s.last_rx]
                for theirs in (report[subnet] for report in reported if subnet in report):
                    sums = [a + int(b) for a, b in zip(sums, theirs[:4], strict=True)]
                    last = [max(a, b) for a, b in zip(last, theirs[4:6], strict=True)]
                keys = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")
                row.update(zip(keys, sums, strict=True))
                for key, at in zip(("tx", "rx"), last, strict=True):
                    row[f"last_{key}_s"] = round(now - at, 1) if at else None
                    row[f"last_{key}_at"] = round(wall - (now - at), 3) if at else None
            rows.append(row)
        return rows

    async def status_snapshot(self) -> dict[str, Any]:
        """``snapshot()`` plus what must be read from the kernel (off the loop)."""
        st = self.snapshot()
        device = self._kernel_device()
        if device is not None and st["state"] != "starting":
            stats = await asyncio.to_thread(netlink.link_stats, device)
            if stats is not None:
                st["kernel_counters"] = {"device": device, **stats}
                st["kernel_is_overlay"] = isinstance(self.backend, KernelVxlanBackend)
        return st

    def _kernel_device(self) -> str | None:
        if isinstance(self.backend, KernelVxlanBackend):
            return self.backend.device
        if isinstance(self.backend, HostGwBackend):
            return self.underlay.iface  # no device of its own: the underlay's statistics
        return None

    def _attach_captures(self, backend: Backend) -> None:
        dataplane = getattr(backend, "dataplane", None)
        if dataplane is None or self.peers is None:
            return
        address, port = dataplane.sock.getsockname()
        endpoint = trace.Endpoint(address, port, dataplane.headroom)
        self.captures = trace.Captures(
            dataplane, endpoint, self.peers, getattr(backend, "workers", None)
        )

    async def _trace(
        self, argument: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One `overlay trace` client: stream pcapng until its count or its EOF."""
        captures, backend = self.captures, self.backend
        if captures is None or not isinstance(backend, UdpBackend) or backend.tun is None:
            where = getattr(backend, "device", None) or self.underlay.iface
            writer.write(
                f"error: this node's packets cross the kernel's datapath, not this process "
                f"(trace them with tcpdump -i {where})\n".encode()
            )
            return
        try:
            request = trace.TraceRequest.parse(json.loads(argument or "{}"))
        except ValueError as e:
            writer.write(f"error: {e}\n".encode())
            return
        stream = trace.PcapngStream(
            writer,
            request,
            backend.tun.name,
            trace.outer_name(self.underlay.iface, captures.endpoint.port),
        )
        handle = captures.start(request, stream.emit)
        self.log.info("trace_started", filter=request.filter, count=request.count)
        waits = [
            asyncio.create_task(reader.read(1)),  # b"" when the client goes away
            asyncio.create_task(stream.done.wait()),
            asyncio.create_task(self.stopping.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            captures.stop(handle)
            for task in waits:
                task.cancel()
            stream.close()
            self.log.info("trace_stopped", packets=sum(stream.captured), missed=sum(stream.missed))

    async def _metrics_page(self) -> health.Page:
        started = time.perf_counter()
        st = await self.status_snapshot()
        if len(st.get("peers", [])) <= RENDER_INLINE_PEERS:
            body = metrics.render(st)
        else:  # a big table: the GIL is handed back to the drain loops every 5 ms
            body = await asyncio.to_thread(metrics.render, st)
        if overlay_log.enabled(2):
            self.log.debug("scraped", ms=round((time.perf_counter() - started) * 1000, 2))
        return 200, metrics.CONTENT_TYPE, body

    async def _readyz_page(self) -> health.Page:
        ready, reason = self.readiness.check()
        return (200 if ready else 503), health.TEXT, f"{reason}\n".encode()

    async def _healthz_page(self) -> health.Page:
        return 200, health.TEXT, b"overlay is running\n"

    async def _serve_health(self) -> asyncio.AbstractServer | None:
        port = self.args.healthz_port
        if not port:
            return None
        host = str(self.args.healthz_ip)
        routes = {
            "/healthz": self._healthz_page,
            "/readyz": self._readyz_page,
            "/metrics": self._metrics_page,
        }
        try:
            server = await health.serve(host, port, routes)
        except OSError as e:
            raise Fatal(
                f"cannot serve health on --healthz-ip {host} --healthz-port {port}: "
                f"{e.strerror or e}"
            ) from None
        self.log.info("healthz_listening", address=f"{host}:{port}")
        return server

    async def _probe_registry(self) -> None:
        """While the registry is unreachable, or the watch has not recovered yet, ask it
        every REGISTRY_PROBE seconds whether it answers (the watch only reports the next
        event, which may be hours away, and says "watch_failed" once per outage: an
        outage that starts again before the watch is back is only seen here)."""
        registry = self.readiness.registry
        while True:
            await self._registry_down.wait()
            while not registry.connected or self._watch_down:
                await asyncio.sleep(REGISTRY_PROBE)
                try:
                    await self.kv.get(self.manager.config_key)
                except RegistryError:
                    if registry.connected:
                        registry.failed()
                    continue
                registry.answered()
                if overlay_log.enabled(2):
                    self.log.debug("registry_answers")
            self._registry_down.clear()

    def _drops(self) -> dict[str, int]:
        if self.backend is None or self.peers is None:
            return {}
        drops = self._counters_and_status()["counters"].get("drops") or {}
        return dict(drops)

    # -- running -------------------------------------------------------------------------

    async def _resync_kernel(self) -> None:
        """Check (and repair) our kernel objects every RESYNC_INTERVAL seconds; the
        netlink watch asks for one sooner when the kernel announces a change."""
        kernel = self.backend.kernel if self.backend else None
        if kernel is None:
            await asyncio.Event().wait()
            return
        watch = KernelWatch(kernel.resync)
        try:
            watch.start(asyncio.get_running_loop())
        except OSError as e:
            self.log.warning("kernel_watch_unavailable", error=e.strerror or str(e))
        try:
            while True:
                try:
                    await asyncio.wrap_future(kernel.resync())
                except Exception:  # noqa: BLE001 - logged by the worker; tried again
                    pass
                await asyncio.sleep(RESYNC_INTERVAL)
        finally:
            watch.stop()

    async def _resync_iptables(self) -> None:
        rules = self.iptables
        if rules is None:
            await asyncio.Event().wait()
            return
        failing = False
        while True:
            await asyncio.sleep(self.args.iptables_resync)
            try:
                repaired = await asyncio.to_thread(rules.check)
            except IptablesError as e:
                if not failing:
                    self.log.error("iptables_check_failed", error=e.strerror)
                failing = True
                continue
            failing = False
            for rule in repaired:
                self.log.warning("iptables_rule_repaired", rule=rule)

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = self.stopping
        received: list[str] = []

        def on_signal(signum: signal.Signals) -> None:
            received.append(signum.name)
            stop.set()

        def quit_() -> None:
            received.append("SIGQUIT")
            self.exit_code = QUIT_EXIT
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        # Before anything else, so a second daemon on the same socket stops here, and
        # `overlay status` and /healthz answer while we wait for the registry.
        try:
            server = await status.serve(
                Path(self.args.status_socket), self.status_snapshot, {"trace": self._trace}
            )
        except status.StatusSocketError as e:
            raise Fatal(str(e)) from None
        stopping = asyncio.create_task(stop.wait())
        health_server: asyncio.AbstractServer | None = None
        tasks: list[asyncio.Task[Any]] = []
        overlay_log.install_stack_dumps(loop, quit_)
        try:
            health_server = await self._serve_health()
            starting = asyncio.create_task(self.start())
            await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                await asyncio.wait([starting], timeout=STOP_BUDGET / 2)
                self.log.info("stopping", reason=received[0], stage="startup")
                return self.exit_code
            starting.result()  # a startup error ends here, with everything undone below
            assert self.lease is not None
            systemd.notify(f"READY=1\nSTATUS=forwarding for {self.lease.subnet}")
            drop_log = DropLog(
                self.log,
                self._drops,
                self.captures.start if self.captures else None,
                self.captures.stop if self.captures else None,
            )
            drops = self.counters.drops
            if isinstance(drops, Drops):  # noticed in the drain loop, handled after it
                drops.on_new = lambda reason: loop.call_soon(drop_log.notice, reason)
            tasks = [
                asyncio.create_task(
                    self.manager.watch(
                        self.lease, self.on_snapshot, self.on_event, config=self.config
                    )
                ),
                asyncio.create_task(self.manager.keep_renewed(self.lease)),
                asyncio.create_task(self._resync_kernel()),
                asyncio.create_task(self._resync_iptables()),
                asyncio.create_task(self._probe_registry()),
                asyncio.create_task(drop_log.run()),
                stopping,
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is stopping:
                    continue
                error = None if task.cancelled() else task.exception()
                if isinstance(error, LeaseLost):
                    raise Fatal(f"{error}; exiting so a supervisor restarts us")
                if error is not None:
                    raise error
                if stopping not in done:  # each runs until we stop: not a clean stop
                    how = "was cancelled" if task.cancelled() else "returned"
                    name = getattr(task.get_coro(), "__qualname__", task.get_name())
                    raise Fatal(f"{name} {how} unexpectedly; exiting so a supervisor restarts us")
            self.log.info("stopping", reason=received[0] if received else "signal")
            return self.exit_code
        finally:
            systemd.notify("STOPPING=1")
            stop.set()  # ends the traces still streaming
            for task in [*tasks, stopping]:
                task.cancel()
            await asyncio.wait([*tasks, stopping], timeout=STOP_BUDGET / 4)
            await self._cleanup(server, health_server)
            overlay_log.remove_stack_dumps(loop)

    async def _cleanup(
        self, server: status.StatusServer, health_server: asyncio.AbstractServer | None
    ) -> None:
        """Undo what startup made, each step bounded so the whole fits STOP_BUDGET."""

        async def step(what: str, call: Awaitable[Any], budget: float) -> None:
            try:
                await asyncio.wait_for(call, budget)
            except Exception as e:  # noqa: BLE001 - best effort (a timeout too)
                self.log.warning("cleanup_incomplete", step=what, error=str(e) or type(e).__name__)

        if self.iptables is not None:
            # One transaction per rule set, ~0.1 s; given longer on a loaded machine, as
            # rules left behind would outlive us.
            await step("iptables rules", asyncio.to_thread(self.iptables.remove), 2.0)
        if self.backend is not None:
            await step("backend", self.backend.stop(), 0.4)
        if health_server is not None:
            health_server.close()
        server.close()  # removes the socket only if it is still ours
        await step("registry", self.kv.close(), 0.1)


class Stopped(Exception):
    """SIGTERM before the event loop took over the signals."""


def _stopped(signum: int, frame: object) -> None:
    raise Stopped


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stopped)  # until Daemon.main installs the loop's
    overlay_log.configure(args.log_format, args.v)
    fmt = args.log_format
    for flag in getattr(args, "ignored_flags", []):
        structlog.get_logger().warning("flag_ignored", flag=flag, reason="a klog flag")
    node = str(args.public_ip) if args.public_ip else None
    try:
        check_paths(args)
        underlay = select_underlay(args)
        node = str(underlay.public_ip)
        daemon = Daemon(args, underlay)  # the registry's flags and TLS files checked here
        return lifecycle.run(daemon.main())
    except (Fatal, RegistryError, UnderlayError, BackendError) as e:
        return overlay_log.fatal(PROG, str(e), fmt, node)
    except OSError as e:  # TunError, LinkError, KernelError, a socket that cannot be bound
        return overlay_log.fatal(PROG, str(e.strerror or e), fmt, node)
    except (KeyboardInterrupt, Stopped):
        return 0  # flanneld exits 0 on SIGTERM and SIGINT
