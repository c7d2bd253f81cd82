"""`overlay run`: wire the registry, the lease, the peer table and the backend together.

Startup order is chosen so that a failure leaves nothing behind: the interface first,
then the config (which names the backend), then what the backend can fail to create for
lack of permission (the TUN), and only then the lease, addresses, routes, the socket and
subnet.env.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import structlog
import uvloop

from control.config import ConfigError, NetworkConfig, config_json, parse_config
from control.etcd_registry import EtcdRegistry, TlsFiles
from control.file_registry import FileRegistry
from control.kv import KeyValueStore, RegistryConfigError, RegistryError
from control.lease import Lease
from control.peer_table import PeerTable
from control.subnet_env import SubnetEnv
from control.subnet_manager import LeaseEvent, LeaseLost, SubnetManager
from overlay import kernel_routes, status
from overlay import log as overlay_log
from overlay.backends.base import Backend, Context, Underlay
from overlay.backends.kernel import HostGwBackend, KernelVxlanBackend
from overlay.backends.userspace import UdpBackend, VxlanBackend
from overlay.counters import Counters, add_snapshots
from overlay.subnet_file import read_previous, write_subnet_env
from tun import netlink

PROG = "overlay run"
T = TypeVar("T")


class Fatal(Exception):
    """A startup or runtime error that ends the daemon with one line and exit status 1."""


def select_underlay(ifaces: list[str], public_ip: IPv4Address | None) -> Underlay:
    """The interface for inter-node traffic, as flanneld picks it (--iface, else default)."""
    addresses = netlink.interface_addresses()
    candidates = [name for name in addresses if name != "lo"]
    chosen: tuple[str, IPv4Address] | None = None
    for wanted in ifaces:
        for name, addrs in addresses.items():
            if name == wanted and addrs:
                chosen = (name, addrs[0][0])
            for addr, _ in addrs:
                if str(addr) == wanted:
                    chosen = (name, addr)
        if chosen:
            break
    if ifaces and chosen is None:
        raise Fatal(f"none of --iface {', '.join(ifaces)} exists with an IPv4 address")
    if chosen is None:
        default = netlink.default_route_interface()
        if default and addresses.get(default):
            chosen = (default, addresses[default][0][0])
        elif len(candidates) == 1:
            chosen = (candidates[0], addresses[candidates[0]][0][0])
        else:
            found = ", ".join(candidates) or "none"
            raise Fatal(f"cannot choose an interface (no default route; have {found}): use --iface")
    name, address = chosen
    return Underlay(name, address, public_ip or address, netlink.interface_mtu(name))


def registry_for(args: argparse.Namespace, notify: Any = None) -> KeyValueStore:
    """etcd when --etcd-endpoints is given, else the embedded file registry. What can be
    checked without a connection is checked here (TLS files, the registry file's path,
    owner, mode and content): RegistryConfigError, one line, before anything is made."""
    if args.etcd_endpoints:
        if (args.etcd_username is None) != (args.etcd_password is None):
            raise Fatal("--etcd-username and --etcd-password go together")
        return EtcdRegistry(
            args.etcd_endpoints,
            tls=TlsFiles(args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile),
            username=args.etcd_username,
            password=args.etcd_password,
        )
    registry = FileRegistry(args.registry_file, **({"notify": notify} if notify else {}))
    registry.check_sync()
    return registry


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
        self.kv = registry_for(args, self._notify)
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
        self._warned_backend: set[IPv4Network] = set()

    def _notify(self, event: str, **fields: Any) -> None:
        warning = ("failed", "invalid", "compacted", "lost", "held")
        level = "warning" if event.endswith(warning) else "info"
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
        return config

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
        self.peers.prefix_for = backend.prefix_for
        backend.prepare()  # the TUN, before any lease: a permission error leaves nothing
        self.manager.backend_type = backend.lease_type
        self.manager.backend_data = backend.lease_data()
        subnet_file = Path(self.args.subnet_file)
        previous = read_previous(subnet_file)
        self.lease = lease = await self._retrying(
            "acquiring a lease",
            lambda: self.manager.acquire(config, previous.subnet.network if previous else None),
        )
        await backend.start(lease)
        write_subnet_env(
            subnet_file, SubnetEnv.for_lease(config.network, lease.subnet, backend.mtu)
        )
        shown = backend.status()
        if "workers" in shown:  # their pids and counters are in `overlay status`
            shown["workers"] = len(shown["workers"])
        self.log.info(
            "started",
            subnet=str(lease.subnet),
            network=str(config.network),
            backend=backend.name,
            iface=self.underlay.iface,
            public_ip=str(self.underlay.public_ip),
            mtu=backend.mtu,
            **shown,
        )
        return backend

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
        worker's (each one's own are in ``workers``)."""
        assert self.backend is not None
        backend = self.backend.status()
        workers = backend.get("workers")
        if workers:
            counters = add_snapshots([w["counters"] for w in workers])
        else:
            counters = self.counters.snapshot()
        return {"counters": counters, **backend}

    # -- main ----------------------------------------------------------------------------

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            backend = await self.start()
        except BaseException:
            if self.backend is not None:
                await self.backend.stop()
            raise
        assert self.lease is not None
        server = await status.serve(Path(self.args.status_socket), self.snapshot)
        tasks = [
            asyncio.create_task(
                self.manager.watch(self.lease, self.on_snapshot, self.on_event, config=self.config)
            ),
            asyncio.create_task(self.manager.keep_renewed(self.lease)),
            asyncio.create_task(stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if isinstance(error, LeaseLost):
                    raise Fatal(f"{error}; exiting so a supervisor restarts us")
                if error is not None:
                    raise error
            self.log.info("stopping", reason="signal")
            return 0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await backend.stop()
            server.close()
            Path(self.args.status_socket).unlink(missing_ok=True)
            await self.kv.close()


def run(args: argparse.Namespace) -> int:
    overlay_log.configure(args.log_format, args.v)
    fmt = args.log_format
    try:
        underlay = select_underlay(args.iface, args.public_ip)
        daemon = Daemon(args, underlay)  # the registry's flags and files checked here
        return uvloop.run(daemon.main())
    except (Fatal, RegistryError) as e:
        return overlay_log.fatal(PROG, str(e), fmt)
    except OSError as e:  # TunError, LinkError, KernelError, a socket that cannot be bound
        return overlay_log.fatal(PROG, str(e.strerror or e), fmt)
    except KeyboardInterrupt:
        return 130
