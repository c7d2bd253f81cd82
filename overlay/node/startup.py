"""Starting a node against its registry, in an order chosen so that a failure leaves
nothing behind: the registry's own checks, then the config (which names the backend),
then what the backend can fail to create for lack of permission (the TUN), and only then
the lease, addresses, routes, the iptables rules and subnet.env."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network, IPv6Network
from typing import TypeVar

from control.config import ConfigError, NetworkConfig, config_json, parse_config
from control.kv import RegistryConfigError, RegistryError
from control.lease import Lease
from control.peer_table import PeerTable
from overlay.backends.base import Backend, Context
from overlay.backends.manager import make_backend
from overlay.kernel.blackhole import add_blackhole_routes
from overlay.kernel.objects import KernelError
from overlay.node.fatal import Fatal
from overlay.node.options import NodeOptions
from overlay.node.state import NodeState
from overlay.node.subnet_file import SubnetFileError, read_previous, write_subnet_env

T = TypeVar("T")


def check_paths(options: NodeOptions) -> None:
    """Files the daemon reads must be regular files: opening a FIFO (or a device) would
    block startup until someone writes to it. Checked with stat, which never blocks."""
    paths = [("--subnet-file", options.subnet_file)]
    if not options.registry.etcd_endpoints:
        paths.append(("--registry-file", options.registry.file))
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


class Startup:
    def __init__(self, node: NodeState) -> None:
        self.node = node
        self.log = node.log

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry ``call`` while the registry is unreachable, up to --registry-timeout."""
        timeout = self.node.options.registry.timeout
        deadline = time.monotonic() + timeout
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
                        f"registry unreachable for {timeout:g} s while {what}: {e}"
                    ) from None
                if str(e) != last:
                    self.log.warning("registry_unavailable", step=what, error=str(e))
                    last = str(e)
                await asyncio.sleep(min(delay, left))  # the last try is at the deadline
                delay = min(delay * 2, 5.0)

    async def network_config(self) -> NetworkConfig:
        """The registry's network config (seeded with --network when it has none),
        checked against this node and the flags."""
        options, manager = self.node.options, self.node.manager
        try:
            config = await self.retrying("reading the config", manager.read_config)
            if config is None and options.seed_network is not None:
                await self._seed()
                config = await self.retrying("reading the config", manager.read_config)
            if config is None:
                config = await manager.wait_for_config()
        except ConfigError as e:
            raise Fatal(f"invalid network config at {manager.config_key}: {e}") from None
        self.check_ipv6(config, manager.config_key)
        self.check_network(config, f"the registry's Network at {manager.config_key}")
        if options.seed_network is not None and config.network != options.seed_network:
            raise Fatal(
                f"--network {options.seed_network} disagrees with the registry's Network "
                f"{config.network}: drop the flag or fix {manager.config_key}"
            )
        if options.seed_backend is not None and config.backend.type != options.seed_backend:
            raise Fatal(
                f"--backend {options.seed_backend} disagrees with the registry's Backend.Type "
                f"{config.backend.type!r}"
            )
        for warning in config.warnings:
            self.log.warning("config_key_ignored", key=manager.config_key, detail=warning)
        return config

    async def _seed(self) -> None:
        """Write the config --network and --backend describe, if nobody has one."""
        options, manager = self.node.options, self.node.manager
        network = options.seed_network
        assert network is not None
        seed = config_json(network, options.seed_backend or "udp").encode()
        try:  # all of it checked before anything is written
            self.check_network(parse_config(seed), "--network")
        except ConfigError as e:
            raise Fatal(f"--network {network}: {e}; nothing was written") from None
        created = await self.retrying(
            "seeding the config",
            lambda: self.node.kv.create(manager.config_key, seed, None),
        )
        if created:
            self.log.info("config_seeded", network=str(network))

    def check_network(self, config: NetworkConfig, source: str) -> None:
        """A network that holds this node's own underlay address cannot work: its route
        into the TUN would swallow the traffic to the other nodes. IPv6 only: no IPv4
        network (0.0.0.0/0, flanneld's zero value) to check; else the underlay needs an
        IPv4 address."""
        underlay = self.node.underlay
        if not config.enable_ipv4:
            return
        if underlay.address.is_unspecified:
            raise Fatal(
                f"{underlay.iface} has no IPv4 address and {source} is IPv4 (EnableIPv4): "
                "give the interface one, or make the network IPv6 only (EnableIPv4: false, "
                "EnableIPv6: true)"
            )
        for address in {underlay.address, underlay.public_ip}:
            if address in config.network:
                raise Fatal(
                    f"{source} {config.network} contains this node's underlay address "
                    f"{address} ({underlay.iface}): the overlay must not overlap the "
                    "underlay"
                )

    def check_ipv6(self, config: NetworkConfig, key: str) -> None:
        """What the IPv6 half of the config needs of this node: an IPv6 address to
        publish, outside IPv6Network."""
        underlay = self.node.underlay
        ipv6 = config.ipv6
        if ipv6 is None:
            return
        for address in {underlay.address6, underlay.public_ipv6} - {None}:
            if address in ipv6.network:
                raise Fatal(
                    f"the registry's IPv6Network {ipv6.network} contains this node's "
                    f"underlay address {address} ({underlay.iface}): the overlay must not "
                    "overlap the underlay"
                )

    def check_ipv6_address(self, config: NetworkConfig) -> None:
        """EnableIPv6 needs an IPv6 address to publish (checked after the backend, so a
        backend that cannot carry IPv6 says that first)."""
        underlay = self.node.underlay
        if config.ipv6 is not None and underlay.public_ipv6 is None:
            raise Fatal(
                f"EnableIPv6: {underlay.iface} has no IPv6 address to publish: give it "
                "one, or pass --public-ipv6"
            )

    async def _backend(self, config: NetworkConfig) -> Backend:
        """The backend the config names, its complaints about the config said."""
        node = self.node
        node.peers = PeerTable(config.backend.port)
        ctx = Context(
            node.options.datapath,
            node.underlay,
            config,
            node.counters,
            node.peers,
            self.log,
            node.options.log,
        )
        backend = await make_backend(ctx)
        for warning in backend.config_warnings():
            fields = dict(warning)
            event = fields.pop("event")
            if event == "config_key_ignored":
                fields["key"] = node.manager.config_key
            self.log.warning(event, **fields)
        node.peers.prefix_for = backend.prefix_for
        node.peers.prefix6_for = backend.prefix6_for
        return backend

    async def start(self) -> Backend:
        node = self.node
        self.log.info("registry", **node.monitor.info)
        # The registry's own checks (the file registry: its directory, lock and
        # content), at once.
        await self.retrying("checking the registry file", node.kv.check)
        node.config = config = await self.network_config()
        node.backend = backend = await self._backend(config)
        self.check_ipv6_address(config)
        if node.options.datapath.impairment:  # refused at once by a kernel datapath
            backend.impair(node.options.datapath.impairment)
        iptables = node.iptables.command(config.enable_nftables)
        backend.prepare()  # the TUN, before any lease: a permission error leaves nothing
        node.manager.backend_type = backend.lease_type
        node.manager.backend_data = backend.lease_data()
        node.manager.backend_v6_data = backend.lease_v6_data()
        subnet_file = node.options.subnet_file
        previous = await asyncio.to_thread(read_previous, subnet_file)
        previous_v6 = previous.ipv6_subnet if previous is not None else None
        node.lease = lease = await self.retrying(
            "acquiring a lease",
            lambda: node.manager.acquire(
                config,
                previous.subnet.network if previous and previous.subnet else None,
                previous_v6.network if previous_v6 is not None else None,
            ),
        )
        node.readiness.registry.answered()
        if lease.has_ttl:
            node.monitor.lease_renewed(node.manager.ttl)
        node.readiness.step("lease")
        await backend.start(lease)
        node.readiness.step("datapath")
        ipv6 = None
        if config.ipv6 is not None and lease.ipv6_subnet is not None:
            ipv6 = (config.ipv6.network, lease.ipv6_subnet)
        if iptables is not None:
            ipv4 = (config.network, lease.subnet) if config.enable_ipv4 else None
            await node.iptables.install(iptables, ipv4, previous, ipv6)
        if node.options.blackhole_route:
            await self._blackhole_routes(lease)
        try:
            await asyncio.to_thread(write_subnet_env, subnet_file, node.subnet_env())
        except SubnetFileError as e:
            raise Fatal(str(e)) from None
        node.readiness.step("subnet_env")
        self._log_started(backend)
        return backend

    async def _blackhole_routes(self, lease: Lease) -> None:
        """--ip-blackhole-route: one for each of the lease's subnets (as flanneld)."""
        subnets: list[IPv4Network | IPv6Network] = [lease.subnet] if lease.has_ipv4 else []
        if lease.ipv6_subnet is not None:
            subnets.append(lease.ipv6_subnet)
        try:
            added = await asyncio.to_thread(add_blackhole_routes, subnets)
        except KernelError as e:
            raise Fatal(f"--ip-blackhole-route: {e.strerror}") from None
        if added:
            self.log.info("blackhole_routes_added", subnets=added)

    def _log_started(self, backend: Backend) -> None:
        node = self.node
        assert node.lease is not None and node.config is not None
        shown = backend.status()
        for detail in ("workers", "kernel", "programmed", "repairs"):
            shown.pop(detail, None)  # in `overlay status`
        self.log.info(
            "started",
            subnet=node.lease.name,
            network=" ".join(map(str, node.config.overlay_networks)),
            backend=backend.name,
            iface=node.underlay.iface,
            public_ip=str(
                node.underlay.public_ip if node.config.enable_ipv4 else node.underlay.public_ipv6
            ),
            mtu=backend.mtu,
            registry=node.monitor.info["kind"],
            ip_masq=node.options.iptables.ip_masq,
            **shown,
        )
