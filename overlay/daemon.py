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
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import structlog

from control.config import ConfigError, NetworkConfig, config_json
from control.etcd_registry import EtcdRegistry, TlsFiles
from control.file_registry import FileRegistry
from control.kv import KeyValueStore, RegistryError
from control.lease import Lease
from control.peer_table import PeerTable
from control.subnet_env import SubnetEnv
from control.subnet_manager import LeaseEvent, LeaseLost, SubnetManager
from overlay import kernel_routes, lifecycle, status, systemd
from overlay import log as overlay_log
from overlay.backends.base import Backend, BackendError, Context, Underlay
from overlay.backends.kernel import HostGwBackend, KernelVxlanBackend
from overlay.backends.userspace import UdpBackend, VxlanBackend
from overlay.counters import Counters, add_snapshots
from overlay.ipmasq import Iptables, IptablesError, IptablesRules
from overlay.reconcile import RESYNC_INTERVAL, KernelWatch
from overlay.subnet_file import read_previous, write_subnet_env
from overlay.underlay import UnderlayError, select_underlay

PROG = "overlay run"
T = TypeVar("T")
STOP_BUDGET = 0.8  # seconds shutdown may take in all (SIGTERM -> exit within a second)


class Fatal(Exception):
    """A startup or runtime error that ends the daemon with one line and exit status 1."""


def registry_for(args: argparse.Namespace) -> KeyValueStore:
    """etcd when --etcd-endpoints is given, else the embedded file registry."""
    if args.etcd_endpoints:
        if (args.etcd_username is None) != (args.etcd_password is None):
            raise Fatal("--etcd-username and --etcd-password go together")
        return EtcdRegistry(
            args.etcd_endpoints,
            tls=TlsFiles(args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile),
            username=args.etcd_username,
            password=args.etcd_password,
        )
    return FileRegistry(args.registry_file)


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
        self.registry = registry_info(args)
        self.kv = registry_for(args)
        self.manager = SubnetManager(
            self.kv,
            public_ip=underlay.public_ip,
            prefix=args.etcd_prefix,
            renew_margin=args.subnet_lease_renew_margin * 60,
            notify=self._notify,
        )
        self.counters = Counters()
        self.started = time.time()
        self.config: NetworkConfig | None = None
        self.lease: Lease | None = None
        self.backend: Backend | None = None
        self.peers: PeerTable | None = None
        self.iptables: IptablesRules | None = None
        self._warned_backend: set[IPv4Network] = set()

    def _notify(self, event: str, **fields: Any) -> None:
        level = "warning" if event.endswith(("failed", "invalid", "compacted", "lost")) else "info"
        getattr(self.log, level)(event, **fields)

    # -- startup -------------------------------------------------------------------------

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry ``call`` while the registry is unreachable, up to --registry-timeout."""
        deadline = time.monotonic() + self.args.registry_timeout
        delay = 0.5
        last = ""
        while True:
            try:
                return await call()
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

    async def start(self) -> Backend:
        self.log.info("registry", **self.registry)
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
        await backend.start(lease)
        if iptables is not None:
            await self._install_iptables(iptables, config, lease, previous)
        env = SubnetEnv.for_lease(config.network, lease.subnet, backend.mtu, self.args.ip_masq)
        await asyncio.to_thread(write_subnet_env, subnet_file, env)
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
        self._changed(*self.peers.replace_all([x for x in leases if self._usable(x)]))

    def on_event(self, event: LeaseEvent) -> None:
        assert self.peers is not None
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

    def snapshot(self) -> dict[str, Any]:
        assert self.config is not None and self.lease is not None and self.peers is not None
        assert self.backend is not None
        return {
            "lease": {
                "subnet": str(self.lease.subnet),
                "public_ip": str(self.lease.public_ip),
                "key": self.manager.key_of(self.lease),
            },
            "registry": self.registry,
            "network": str(self.config.network),
            "backend": self.config.backend.type,
            "datapath": self.backend.name,
            "iface": self.underlay.iface,
            "mtu": self.backend.mtu,
            "uptime_s": round(time.time() - self.started, 1),
            "peers": [
                {"subnet": str(p.lease.subnet), "public_ip": p.addr[0], "port": p.addr[1]}
                for p in sorted(self.peers.peers(), key=lambda p: p.net)
            ],
            **self._counters_and_status(),
        }

    def _counters_and_status(self) -> dict[str, Any]:
        """The backend's status, and the counters: with --workers, the sum of every
        worker's (each one's own are in ``workers``). ``repairs`` counts every kernel
        object and iptables rule put back, by kind."""
        assert self.backend is not None
        backend = self.backend.status()
        workers = backend.get("workers")
        if workers:
            counters = add_snapshots([w["counters"] for w in workers])
        else:
            counters = self.counters.snapshot()
        repairs = dict(backend.pop("repairs", {}))
        if self.iptables is not None:
            repairs["iptables"] = self.iptables.repairs
            backend["iptables"] = self.iptables.status()
        return {"counters": counters, **backend, "repairs": repairs}

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
        stop = asyncio.Event()
        received: list[str] = []

        def on_signal(signum: signal.Signals) -> None:
            received.append(signum.name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        stopping = asyncio.create_task(stop.wait())
        server: asyncio.AbstractServer | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            starting = asyncio.create_task(self.start())
            await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                await asyncio.wait([starting], timeout=STOP_BUDGET / 2)
                self.log.info("stopping", reason=received[0], stage="startup")
                return 0
            starting.result()  # a startup error ends here, with everything undone below
            assert self.lease is not None
            server = await status.serve(Path(self.args.status_socket), self.snapshot)
            systemd.notify(f"READY=1\nSTATUS=forwarding for {self.lease.subnet}")
            tasks = [
                asyncio.create_task(
                    self.manager.watch(self.lease, self.on_snapshot, self.on_event)
                ),
                asyncio.create_task(self.manager.keep_renewed(self.lease)),
                asyncio.create_task(self._resync_kernel()),
                asyncio.create_task(self._resync_iptables()),
                stopping,
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if isinstance(error, LeaseLost):
                    raise Fatal(f"{error}; exiting so a supervisor restarts us")
                if error is not None:
                    raise error
            self.log.info("stopping", reason=received[0] if received else "signal")
            return 0
        finally:
            systemd.notify("STOPPING=1")
            for task in [*tasks, stopping]:
                task.cancel()
            await asyncio.wait([*tasks, stopping], timeout=STOP_BUDGET / 4)
            await self._cleanup(server)

    async def _cleanup(self, server: asyncio.AbstractServer | None) -> None:
        """Undo what startup made, each step bounded so the whole fits STOP_BUDGET."""

        async def step(what: str, call: Awaitable[Any], budget: float) -> None:
            try:
                await asyncio.wait_for(call, budget)
            except Exception as e:  # noqa: BLE001 - best effort (a timeout too)
                self.log.warning("cleanup_incomplete", step=what, error=str(e) or type(e).__name__)

        if self.iptables is not None:
            await step("iptables rules", asyncio.to_thread(self.iptables.remove), 0.3)
        if self.backend is not None:
            await step("backend", self.backend.stop(), 0.4)
        if server is not None:
            server.close()
            Path(self.args.status_socket).unlink(missing_ok=True)
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
    try:
        check_paths(args)
        underlay = select_underlay(args)
        registry_for(args)  # flag combinations checked before anything is created
        return lifecycle.run(Daemon(args, underlay).main())
    except (Fatal, RegistryError, UnderlayError, BackendError) as e:
        return overlay_log.fatal(PROG, str(e), fmt)
    except OSError as e:  # TunError, LinkError, KernelError, a socket that cannot be bound
        return overlay_log.fatal(PROG, str(e.strerror or e), fmt)
    except (KeyboardInterrupt, Stopped):
        return 0  # flanneld exits 0 on SIGTERM and SIGINT
