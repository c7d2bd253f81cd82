"""Lease acquisition, renewal and the lease watch, written once against KeyValueStore.

This is flanneld's subnet manager: the same acquire order, the same create-if-absent
race handling, and a watch that re-lists after compaction or a broken stream (with a
content diff, which flanneld lacks) and backs off instead of hot-looping.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Literal

from control.allocation import choose_ipv6_subnet, choose_subnet
from control.config import NetworkConfig, parse_config
from control.kv import Entry, Event, KeyValueStore, RegistryError, RevisionCompacted
from control.lease import (
    DEFAULT_PREFIX,
    NO_IPV4,
    Lease,
    LeaseError,
    LeaseId,
    parse_lease,
    parse_subnet_key,
)
from control.lease_rules import LeaseBook, Record

LEASE_TTL = 24 * 3600
RENEW_MARGIN = 3600
RENEW_RETRY = 60.0
ACQUIRE_ATTEMPTS = 10
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
# A watch that stayed up this long was a good reconnect: its next failure is retried
# from BACKOFF_MIN again (one that fails sooner keeps doubling: no hot loop).
STABLE = BACKOFF_MAX

# (event, fields) -> None: how the manager reports what happened, without logging itself.
Notify = Callable[..., None]


class LeaseLost(Exception):
    """Our own lease was deleted or taken over; the daemon must exit so it is restarted."""


class NetworkFull(RegistryError):
    """No free subnet is left between SubnetMin and SubnetMax."""


@dataclass(frozen=True)
class LeaseEvent:
    kind: Literal["added", "removed"]
    subnet: LeaseId  # the lease's ident (its IPv6 subnet when it has no IPv4 half)
    lease: Lease | None  # None for "removed"


def _quiet(event: str, **fields: Any) -> None:
    return None


class SubnetManager:
    def __init__(
        self,
        kv: KeyValueStore,
        *,
        public_ip: IPv4Address,
        public_ipv6: IPv6Address | None = None,
        backend_type: str = "",
        backend_data: dict[str, Any] | None = None,
        backend_v6_data: dict[str, Any] | None = None,
        prefix: str = DEFAULT_PREFIX,
        ttl: int = LEASE_TTL,
        renew_margin: float = RENEW_MARGIN,
        notify: Notify = _quiet,
        rng: random.Random | None = None,
    ) -> None:
        self.kv = kv
        self.public_ip = public_ip
        self.public_ipv6 = public_ipv6
        self.backend_type = backend_type
        self.backend_data = backend_data
        self.backend_v6_data = backend_v6_data
        self.prefix = prefix.rstrip("/")
        self.ttl = ttl
        self.renew_margin = renew_margin
        self.notify = notify
        self.rng = rng or random.Random()
        # The watch's view: every record under the subnets prefix and which of them are
        # valid peers; remembers what was reported, so each rejected record is reported
        # once (list_leases shares that memory).
        self.book = LeaseBook(None, own_ip=public_ip, own_ipv6=public_ipv6)
        # The registry revision the watch has seen (for `overlay status`); None before it.
        self.watch_revision: int | None = None

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config"

    @property
    def subnets_prefix(self) -> str:
        return f"{self.prefix}/subnets/"

    def key_of(self, lease: Lease) -> str:
        """The full registry key of a lease: ``<prefix>/subnets/10.244.3.0-24``."""
        return f"{self.subnets_prefix}{lease.key}"

    # -- config --------------------------------------------------------------------------

    async def read_config(self) -> NetworkConfig | None:
        """The validated network config, or None when the key does not exist yet."""
        entry = await self.kv.get(self.config_key)
        return None if entry is None else parse_config(entry.value)

    async def wait_for_config(self, retry: float = 1.0) -> NetworkConfig:
        """Poll until ``<prefix>/config`` exists (flanneld does the same), noting it once."""
        noted = False
        last_error = ""
        while True:
            try:
                config = await self.read_config()
            except RegistryError as e:
                if str(e) != last_error:  # once per distinct error, not every second
                    self.notify("registry_unavailable", error=str(e))
                    last_error = str(e)
                config = None
            if config is not None:
                return config
            if not noted:
                self.notify("config_missing", key=self.config_key)
                noted = True
            await asyncio.sleep(retry)

    # -- leases --------------------------------------------------------------------------

    def _lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> Lease:
        """Our lease for these subnets, with the attributes flanneld writes: the IPv4
        ones only for an IPv4 subnet, the IPv6 ones only for an IPv6 subnet (so an
        IPv6-only lease says "PublicIP":"0.0.0.0" and has no BackendData, as flanneld's)."""
        v4 = subnet != NO_IPV4
        v6 = ipv6_subnet is not None
        return Lease(
            subnet=subnet,
            public_ip=self.public_ip if v4 else IPv4Address(0),
            backend_type=self.backend_type,
            backend_data=self.backend_data if v4 else None,
            ipv6_subnet=ipv6_subnet,
            public_ipv6=self.public_ipv6 if v6 else None,
            backend_v6_data=self.backend_v6_data if v6 else None,
        )

    def _is_ours(self, lease: Lease, config: NetworkConfig | None) -> bool:
        """Whether a lease carries our public address: the IPv4 one (flanneld's rule),
        or the IPv6 one when IPv6 only (flanneld compares PublicIP, 0.0.0.0 on every
        IPv6-only node, and so would take another node's lease: we do not)."""
        if config is not None and not config.enable_ipv4:
            return self.public_ipv6 is not None and lease.public_ipv6 == self.public_ipv6
        return lease.public_ip == self.public_ip

    async def _snapshot(
        self,
    ) -> tuple[list[Lease], list[IPv4Network], list[IPv6Network], int]:
        """(parseable leases, every subnet with a key - broken records too - of each
        family, revision)."""
        entries, revision = await self.kv.list_prefix(self.subnets_prefix)
        leases: list[Lease] = []
        taken: list[IPv4Network] = []
        taken6: list[IPv6Network] = []
        for entry in entries:
            try:
                lease = parse_lease(
                    entry.key,
                    entry.value,
                    has_ttl=entry.has_ttl,
                    create_revision=entry.create_revision,
                )
            except LeaseError:
                try:
                    subnet, subnet6 = parse_subnet_key(entry.key)
                except LeaseError:
                    continue  # a key that names no subnet blocks nothing
                lease = Lease(subnet, IPv4Address(0), ipv6_subnet=subnet6)
            else:
                leases.append(lease)
            if lease.subnet != NO_IPV4:
                taken.append(lease.subnet)
            if lease.ipv6_subnet is not None:
                taken6.append(lease.ipv6_subnet)
        return leases, taken, taken6, revision

    async def list_leases(self, config: NetworkConfig | None = None) -> tuple[list[Lease], int]:
        """The valid leases (control.lease_rules, with ``config``'s rules when given) of
        other nodes, and the revision; each rejected record is reported once."""
        entries, revision = await self.kv.list_prefix(self.subnets_prefix)
        book = LeaseBook(
            config, own_ip=self.public_ip, own_ipv6=self.public_ipv6, reported_with=self.book
        )
        book.reset(_record(entry) for entry in entries)
        self._report_rejections(book)
        return book.valid(), revision

    def _report_rejections(self, book: LeaseBook) -> None:
        for rejection in book.take_rejections():
            self.notify("lease_record_invalid", key=rejection.key, error=rejection.reason)

    @staticmethod
    def _fits(
        config: NetworkConfig, subnet: IPv4Network, subnet6: IPv6Network | None = None
    ) -> bool:
        """flanneld's isSubnetConfigCompat and isIPv6SubnetConfigCompat: each half fits
        its range and length; an IPv6 half exactly when EnableIPv6."""
        if not config.enable_ipv4:
            fits4 = subnet == NO_IPV4
        else:
            fits4 = (
                subnet.prefixlen == config.subnet_len
                and subnet.subnet_of(config.network)
                and config.subnet_min.network_address
                <= subnet.network_address
                <= config.subnet_max.network_address
            )
        ipv6 = config.ipv6
        if ipv6 is None or subnet6 is None:
            return fits4 and ipv6 is None and subnet6 is None
        return (
            fits4
            and subnet6.prefixlen == ipv6.subnet_len
            and ipv6.subnet_min.network_address
            <= subnet6.network_address
            <= ipv6.subnet_max.network_address
        )

    async def _claim_ours(self, config: NetworkConfig, leases: list[Lease]) -> Lease | None:
        """Step 1 of flanneld's order: a lease (or reservation) that carries our public IP.

        A reservation is rewritten with our backend attributes but keeps having no TTL; a
        lease of ours that no longer fits the config is deleted, as flanneld does.
        """
        for lease in leases:
            if not self._is_ours(lease, config):
                continue
            if not self._fits(config, lease.subnet, lease.ipv6_subnet):
                if lease.has_ttl:
                    await self.kv.delete(self.key_of(lease))
                    self.notify("lease_dropped", subnet=str(lease.subnet), reason="misfit")
                continue
            mine = replace(self._lease(lease.subnet, lease.ipv6_subnet), has_ttl=lease.has_ttl)
            ttl = self.ttl if lease.has_ttl else None
            await self.kv.put(self.key_of(mine), mine.value_json().encode(), ttl)
            self.notify("lease_reserved" if ttl is None else "lease_reused", **_subnets(mine))
            return mine
        return None

    async def acquire(
        self,
        config: NetworkConfig,
        previous: IPv4Network | None = None,
        previous_ipv6: IPv6Network | None = None,
    ) -> Lease:
        """Acquire a lease in flanneld's order; retried when another node wins a race.

        ``previous`` and ``previous_ipv6``: the subnets of our last subnet.env
        (FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET), taken again together when both are free."""
        for _attempt in range(ACQUIRE_ATTEMPTS):
            leases, taken, taken6, _ = await self._snapshot()
            mine = await self._claim_ours(config, leases)
            if mine is not None:
                return mine
            # What is left of ours (with a TTL) did not fit and was just deleted.
            dropped = [x for x in leases if self._is_ours(x, config) and x.has_ttl]
            taken = [t for t in taken if t not in {x.subnet for x in dropped}]
            taken6 = [t for t in taken6 if t not in {x.ipv6_subnet for x in dropped}]
            subnets = self._previous(config, previous, previous_ipv6, taken, taken6)
            if subnets is None:
                subnets = self._allocate(config, taken, taken6)
            mine = self._lease(*subnets)
            if await self.kv.create(self.key_of(mine), mine.value_json().encode(), self.ttl):
                self.notify("lease_acquired", **_subnets(mine))
                return mine
            self.notify("lease_race_lost", **_subnets(mine))
        raise RegistryError(f"lost the race for a subnet {ACQUIRE_ATTEMPTS} times in a row")

    def _previous(
        self,
        config: NetworkConfig,
        previous: IPv4Network | None,
        previous_ipv6: IPv6Network | None,
        taken: list[IPv4Network],
        taken6: list[IPv6Network],
    ) -> tuple[IPv4Network, IPv6Network | None] | None:
        """Step 2: the subnets of our previous subnet.env, if they fit and are free."""
        if not config.enable_ipv4:
            previous = NO_IPV4  # flanneld skips this step when IPv6 only; we take ours back
        elif previous is None or any(previous.overlaps(t) for t in taken):
            return None
        if config.ipv6 is not None and (
            previous_ipv6 is None or any(previous_ipv6.overlaps(t) for t in taken6)
        ):
            return None
        if not self._fits(config, previous, previous_ipv6 if config.ipv6 else None):
            return None
        return previous, previous_ipv6 if config.ipv6 else None

    def _allocate(
        self, config: NetworkConfig, taken: list[IPv4Network], taken6: list[IPv6Network]
    ) -> tuple[IPv4Network, IPv6Network | None]:
        """Step 3: a random free subnet of each family among the first free ones."""
        subnet = NO_IPV4
        if config.enable_ipv4:
            chosen = choose_subnet(config, taken, self.rng)
            if chosen is None:
                raise NetworkFull(f"no free /{config.subnet_len} left in {config.network}")
            subnet = chosen
        if config.ipv6 is None:
            return subnet, None
        subnet6 = choose_ipv6_subnet(config.ipv6, taken6, self.rng)
        if subnet6 is None:
            ipv6 = config.ipv6
            raise NetworkFull(f"no free /{ipv6.subnet_len} left in IPv6Network {ipv6.network}")
        return subnet, subnet6

    async def renew(self, lease: Lease) -> None:
        await self.kv.put(self.key_of(lease), lease.value_json().encode(), self.ttl)

    async def keep_renewed(self, lease: Lease) -> None:
        """Renew at expiry minus the margin; retry every minute on failure. Runs forever."""
        if not lease.has_ttl:
            await asyncio.Event().wait()  # a reservation never expires
        interval = max(self.ttl - self.renew_margin, 1.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew(lease)
                self.notify("lease_renewed", subnet=str(lease.subnet), ttl=self.ttl)
                interval = max(self.ttl - self.renew_margin, 1.0)
            except RegistryError as e:
                self.notify("lease_renew_failed", subnet=str(lease.subnet), error=str(e))
                interval = RENEW_RETRY

    # -- watch ---------------------------------------------------------------------------

    async def watch(
        self,
        own: Lease,
        on_snapshot: Callable[[list[Lease]], None],
        on_events: Callable[[list[LeaseEvent]], None],
        *,
        config: NetworkConfig | None = None,
        revision: int | None = None,
    ) -> None:
        """Keep the caller's view of the other nodes' valid leases current (the rules of
        control.lease_rules, with ``config``'s when given). Runs until cancelled.

        ``on_snapshot`` gets the full list after every (re-)list, ``on_events`` the
        changes in between, once per watch response (the registry's batch: one etcd
        transaction, or what piled up while we were busy) with its net effect, removals
        first (a change to one record may validate or invalidate another: the newer of
        two overlapping leases becomes valid when the older goes). After a broken
        stream the watch resumes from its revision once a read of the config key
        succeeds (after a compaction it re-lists); the failure is noted once
        ("watch_failed") and the recovery once ("watch_recovered"), however long the
        outage. Raises LeaseLost when our own key is deleted or taken over.
        """
        own_key = self.key_of(own)
        book = self.book
        book.config, book.own_key = config, own_key
        backoff = BACKOFF_MIN
        down_since: float | None = None  # monotonic time of the failure, while down
        up_since = time.monotonic()
        while True:
            try:
                if down_since is not None:
                    await self.kv.get(self.config_key)  # the registry answers again
                    up_since = time.monotonic()
                    self.notify("watch_recovered", down_s=round(up_since - down_since, 1))
                    down_since = None
                if revision is None:
                    entries, revision = await self.kv.list_prefix(self.subnets_prefix)
                    mine = next((e for e in entries if e.key == own_key), None)
                    if own.has_ttl and not _carries(mine, own, config):
                        raise LeaseLost(f"lease {own.subnet} is gone from the registry")
                    book.reset(_record(entry) for entry in entries)
                    up_since = time.monotonic()
                    self._report_rejections(book)
                    on_snapshot(book.valid())
                    self.watch_revision = revision
                async for events in self.kv.watch(self.subnets_prefix, revision + 1):
                    if events:
                        revision = self.watch_revision = events[-1].revision
                    changes = self._apply(events, own, own_key)
                    self._report_rejections(book)
                    if changes:
                        on_events(changes)
                raise RegistryError("the watch stream was closed")
            except RegistryError as e:  # RevisionCompacted too
                if time.monotonic() - up_since >= STABLE:
                    backoff = BACKOFF_MIN  # the first failure after a good stretch
                up_since = math.inf  # until the next good (re)connect
                if isinstance(e, RevisionCompacted):
                    self.notify("watch_compacted", error=str(e))
                    revision = None
                elif down_since is None:
                    self.notify("watch_failed", error=str(e), retry_in=backoff)
                    down_since = time.monotonic()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _apply(self, events: list[Event], own: Lease, own_key: str) -> list[LeaseEvent]:
        """One watch response into the book, as one batch; what it changed."""
        for event in events:
            if event.key == own_key:
                _check_own(event, own, own_key, self.book.config)
        changed, removed = self.book.apply(
            event.key
            if event.kind == "delete"
            else Record(event.key, event.value, event.has_ttl, event.create_revision)
            for event in events
        )
        return [LeaseEvent("removed", lease.ident, None) for lease in removed] + [
            LeaseEvent("added", lease.ident, lease) for lease in changed
        ]


def _check_own(event: Event, own: Lease, own_key: str, config: NetworkConfig | None) -> None:
    """LeaseLost when an event deletes our key or gives it to another node."""
    if event.kind == "delete":
        raise LeaseLost(f"lease {own.subnet} has been revoked (key {own_key} deleted)")
    try:
        lease = parse_lease(event.key, event.value)
    except LeaseError:
        raise LeaseLost(f"lease {own.subnet} was overwritten with a broken record") from None
    if not _same_owner(lease, own, config):
        raise LeaseLost(f"lease {own.subnet} was taken over by {_owner(lease)}")


def _record(entry: Entry) -> Record:
    return Record(entry.key, entry.value, entry.has_ttl, entry.create_revision)


def _carries(entry: Entry | None, own: Lease, config: NetworkConfig | None) -> bool:
    """Whether ``entry`` still holds ``own``: our subnet, with our public IP."""
    if entry is None:
        return False
    try:
        return _same_owner(parse_lease(entry.key, entry.value), own, config)
    except LeaseError:
        return False


def _same_owner(lease: Lease, own: Lease, config: NetworkConfig | None) -> bool:
    """Whether ``lease`` carries our public address (IPv6 when IPv6 only)."""
    if config is not None and not config.enable_ipv4:
        return lease.public_ipv6 == own.public_ipv6
    return lease.public_ip == own.public_ip


def _subnets(lease: Lease) -> dict[str, str]:
    """A lease's subnets as log fields: ``subnet``, and ``ipv6_subnet`` when it has one."""
    fields = {"subnet": str(lease.subnet)} if lease.subnet != NO_IPV4 else {}
    if lease.ipv6_subnet is not None:
        fields["ipv6_subnet"] = str(lease.ipv6_subnet)
    return fields


def _owner(lease: Lease) -> str:
    return str(lease.public_ip if lease.subnet != NO_IPV4 else lease.public_ipv6)
