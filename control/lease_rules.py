"""Which registry records become peers: nothing from the registry is forwarded to before
it passes these rules (pure: no I/O, no logging; the subnet manager reports).

A lease is valid when

- its key parses and its IPv4 part is written as flanneld writes it (``10.244.3.0-24``:
  no ``-024`` or ``- 24`` aliases of another key's subnet);
- its subnet lies within the network config's Network and has exactly SubnetLen, so it
  is never the whole network nor a /25 inside another node's /24 (SubnetMin/SubnetMax
  are not applied to other nodes: they bound where *we* allocate, and may change under
  running nodes);
- its PublicIP is a unicast address a peer can be: not in 0.0.0.0/8, loopback
  127.0.0.0/8, multicast 224.0.0.0/4 or 240.0.0.0/4 (class E and the limited broadcast
  255.255.255.255). Link-local 169.254.0.0/16 is accepted: it is unicast on the link,
  and a cluster may run its underlay there. Nor may it be this node's own public IP
  (only our own lease carries that): we would send pods' traffic to ourselves;
- with EnableIPv6, its IPv6 part (when it has one; a lease without it is a peer for
  IPv4 only) lies within IPv6Network with exactly IPv6SubnetLen, and it carries a
  PublicIPv6 that is a unique local or global unicast address and not ours. IPv6 only
  (EnableIPv4 false): the IPv4 part is ``0.0.0.0-0`` as flanneld writes it, PublicIP is
  not looked at, and the IPv6 part is required;
- it overlaps neither this node's lease nor an older valid lease, in either family.
  "Older" is the lower create revision: etcd's ``create_revision`` (kept while a lease
  is renewed, new when a key is created again), and the same counter recorded by the
  file registry. Ties (keys created in one etcd transaction share a revision) go to the
  lower key in byte order. When the older lease goes, the newer one becomes valid.

A node's traffic is accepted for every valid lease that carries its PublicIP
(``PeerTable.sources_of``); ``PeerTable.by_public_ip`` gives the oldest.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from control.config import FORBIDDEN_NETWORKS, IPV6_UNICAST_RANGES, NetworkConfig
from control.lease import NO_IPV4, Lease, LeaseError, parse_lease
from control.text import clip

# Distinct rejected records remembered per key, so each is reported once (a key
# rewritten with ever new bad values is reported per value, up to this many at a time).
REMEMBERED = 8


@dataclass(frozen=True)
class Record:
    """One key under ``<prefix>/subnets/`` as the registry holds it."""

    key: str
    value: bytes
    has_ttl: bool = True
    create_revision: int = 0


@dataclass(frozen=True)
class Rejection:
    """A record that is not used, and why (the key is clipped; the value never shown)."""

    key: str
    reason: str


def public_ip_problem(address: IPv4Address) -> str | None:
    """Why ``address`` cannot be a peer's PublicIP, or None."""
    for network, what in FORBIDDEN_NETWORKS.items():
        if address in network:
            return f"PublicIP {address} is not a unicast address ({what})"
    return None


def public_ipv6_problem(address: IPv6Address) -> str | None:
    """Why ``address`` cannot be a peer's PublicIPv6, or None."""
    if not any(address in network for network in IPV6_UNICAST_RANGES):
        return f"PublicIPv6 {address} is not a unique local or global unicast address"
    return None


def lease_problem(
    lease: Lease,
    config: NetworkConfig | None,
    own_ip: IPv4Address | None = None,
    own_ipv6: IPv6Address | None = None,
) -> str | None:
    """Why ``lease`` is invalid on its own (without looking at other leases), or None."""
    if config is not None and not config.enable_ipv4:
        if lease.subnet != NO_IPV4:
            return f"subnet {lease.subnet}: EnableIPv4 is false (IPv6-only keys start 0.0.0.0-0)"
        if lease.ipv6_subnet is None:
            return "no IPv6 subnet in an IPv6-only network"
    else:
        if config is not None:
            if not lease.subnet.subnet_of(config.network):
                return f"subnet {lease.subnet} is outside Network {config.network}"
            if lease.subnet.prefixlen != config.subnet_len:
                return f"subnet {lease.subnet} is not a /{config.subnet_len} (SubnetLen)"
        problem = public_ip_problem(lease.public_ip)
        if problem is not None:
            return problem
        if own_ip is not None and lease.public_ip == own_ip:
            return f"PublicIP {lease.public_ip} is this node's own"
    if config is not None and config.ipv6 is not None and lease.ipv6_subnet is not None:
        return _ipv6_problem(lease, config, own_ipv6)
    return None


def _ipv6_problem(lease: Lease, config: NetworkConfig, own_ipv6: IPv6Address | None) -> str | None:
    """The IPv6 half's rules (EnableIPv6, and the lease has an IPv6 part)."""
    assert config.ipv6 is not None and lease.ipv6_subnet is not None
    subnet6, ipv6 = lease.ipv6_subnet, config.ipv6
    if not subnet6.subnet_of(ipv6.network):
        return f"IPv6 subnet {subnet6} is outside IPv6Network {ipv6.network}"
    if subnet6.prefixlen != ipv6.subnet_len:
        return f"IPv6 subnet {subnet6} is not a /{ipv6.subnet_len} (IPv6SubnetLen)"
    if lease.public_ipv6 is None:
        return f"IPv6 subnet {subnet6} has no PublicIPv6"
    problem = public_ipv6_problem(lease.public_ipv6)
    if problem is not None:
        return problem
    if own_ipv6 is not None and lease.public_ipv6 == own_ipv6:
        return f"PublicIPv6 {lease.public_ipv6} is this node's own"
    return None


@dataclass(frozen=True)
class _Checked:
    """A record with the outcome of the rules that look at it alone (done once per put)."""

    record: Record
    digest: bytes
    lease: Lease | None  # None: rejected for ``problem``
    problem: str


class LeaseBook:
    """Every record under the subnets prefix, and the valid leases among them.

    ``reset`` (after a list), ``apply`` (a batch of watch events: records put, keys
    deleted), ``put`` and ``delete`` return how the valid set changed, as ``(added or
    changed, removed)``; the leases carry their create revision. ``take_rejections``
    hands over the rejections not reported yet: each distinct record (key and value)
    once per reason.

    A change costs what it touches, not a pass over every record: two leases can only
    conflict when one contains the other, so the candidates are kept in buckets (their
    network at the shortest prefix length among them: with a config, every valid lease
    has SubnetLen, so a bucket is one subnet), and a change re-runs the rules on its
    buckets only. A change of our own subnet, of the shortest length, of the config or of
    our key re-runs them on everything, as a listing does. So does every change of a
    dual-stack or IPv6-only network: a lease's IPv6 half can clash with a lease in any
    IPv4 bucket."""

    def __init__(
        self,
        config: NetworkConfig | None,
        *,
        own_key: str | None = None,
        own_ip: IPv4Address | None = None,
        own_ipv6: IPv6Address | None = None,
        reported_with: LeaseBook | None = None,
    ) -> None:
        """``reported_with``: another book whose memory of what was reported this one
        shares (a one-off listing does not report again what a watch already did)."""
        self.config = config
        self.own_key = own_key
        self.own_ip = own_ip
        self.own_ipv6 = own_ipv6
        self._records: dict[str, _Checked] = {}
        self._valid: dict[_Subnets, Lease] = {}
        self._reported: dict[str, list[tuple[bytes, str]]] = (
            reported_with._reported if reported_with is not None else {}
        )
        self._pending: list[Rejection] = []
        # The index the rules run on, valid for (config, own key) as they were then.
        self._indexed_for: tuple[NetworkConfig | None, str | None] | None = None
        self._own_subnet: IPv4Network | None = None
        self._lengths: Counter[int] = Counter()  # prefix lengths of the candidates
        self._coarse = 32  # the bucket length: the shortest among the candidates
        self._buckets: dict[int, dict[str, _Checked]] = {}
        self._valid_in: dict[int, dict[_Subnets, Lease]] = {}

    # -- changes ----------------------------------------------------------------------

    def reset(self, records: Iterable[Record]) -> tuple[list[Lease], list[Lease]]:
        """After a full listing: what it does not hold is gone, reports about it too."""
        self._records = {record.key: self._check(record) for record in records}
        for key in [k for k in self._reported if k not in self._records]:
            del self._reported[key]
        return self._recompute()

    def put(self, record: Record) -> tuple[list[Lease], list[Lease]]:
        return self.apply([record])

    def delete(self, key: str) -> tuple[list[Lease], list[Lease]]:
        return self.apply([key])

    def apply(self, changes: Iterable[Record | str]) -> tuple[list[Lease], list[Lease]]:
        """A batch of watch events, in order: a Record is put, a key (str) deleted. The
        result is the batch's net change (a lease added and deleted again is none)."""
        # Dual stack and IPv6 only are not bucketed: every batch runs the rules on all.
        full = self._indexed_for != (self.config, self.own_key) or self._families() != (
            True,
            False,
        )
        dirty: set[int] = set()
        for change in changes:
            key = change if isinstance(change, str) else change.key
            old = self._records.pop(key, None)
            if old is not None and not full:
                self._unindex(old, dirty)
            if isinstance(change, str):
                self._reported.pop(key, None)  # if it comes back, it is news again
            else:
                checked = self._records[key] = self._check(change)
                if checked.lease is None and checked.problem:
                    self._reject(checked, checked.problem)
                elif not full:
                    self._index(checked, dirty)
            if key == self.own_key:
                full = full or self._own_now() != self._own_subnet
        if full or min(self._lengths, default=self._coarse) != self._coarse:
            return self._recompute()
        return self._rerun(dirty)

    # -- views ------------------------------------------------------------------------

    def valid(self) -> list[Lease]:
        """The valid leases other than our own, in subnet order."""
        return [self._valid[subnets] for subnets in sorted(self._valid, key=_order)]

    def take_rejections(self) -> list[Rejection]:
        pending, self._pending = self._pending, []
        return pending

    # -- the rules --------------------------------------------------------------------

    def _reject(self, checked: _Checked, reason: str) -> None:
        mark = (checked.digest, reason)
        seen = self._reported.setdefault(checked.record.key, [])
        if mark in seen:
            return
        seen.append(mark)
        del seen[:-REMEMBERED]
        self._pending.append(Rejection(clip(checked.record.key, 120), reason))

    def _check(self, record: Record) -> _Checked:
        digest = hashlib.blake2b(record.value, digest_size=16).digest()
        try:
            lease = parse_lease(
                record.key,
                record.value,
                has_ttl=record.has_ttl,
                create_revision=record.create_revision,
            )
        except LeaseError as e:
            return _Checked(record, digest, None, str(e))
        if record.key == self.own_key:
            return _Checked(record, digest, lease, "")
        if self.own_key is None and self._carries_ours(lease):
            return _Checked(record, digest, None, "")  # ours, before we know which: no peer
        if record.key.rsplit("/", 1)[-1] != lease.key:
            alias = f"key is not written as flanneld writes it ({lease.key})"
            return _Checked(record, digest, None, alias)
        problem = lease_problem(lease, self.config, self.own_ip, self.own_ipv6)
        if problem is not None:
            return _Checked(record, digest, None, f"lease {_name(lease)}: {problem}")
        return _Checked(record, digest, lease, "")

    def _carries_ours(self, lease: Lease) -> bool:
        """Whether ``lease`` carries our public address (IPv4, or IPv6 when IPv6 only)."""
        if self.config is not None and not self.config.enable_ipv4:
            return self.own_ipv6 is not None and lease.public_ipv6 == self.own_ipv6
        return lease.public_ip == self.own_ip

    def _families(self) -> tuple[bool, bool]:
        """Which halves of a lease take part in the overlap rules: (IPv4, IPv6)."""
        if self.config is None:
            return True, False
        return self.config.enable_ipv4, self.config.ipv6 is not None

    def _own_now(self) -> IPv4Network | None:
        own = self._records.get(self.own_key) if self.own_key else None
        return own.lease.subnet if own is not None and own.lease is not None else None

    def _bucket(self, subnet: IPv4Network) -> int:
        return int(subnet.network_address) >> (32 - self._coarse)

    def _index(self, checked: _Checked, dirty: set[int]) -> None:
        """A candidate (a lease that passed the rules of its own, not ours) into its bucket."""
        lease = checked.lease
        if lease is None or checked.record.key == self.own_key:
            return
        self._lengths[lease.subnet.prefixlen] += 1
        bucket = self._bucket(lease.subnet)
        self._buckets.setdefault(bucket, {})[checked.record.key] = checked
        dirty.add(bucket)

    def _unindex(self, checked: _Checked, dirty: set[int]) -> None:
        lease = checked.lease
        if lease is None or checked.record.key == self.own_key:
            return
        self._lengths[lease.subnet.prefixlen] -= 1
        if not self._lengths[lease.subnet.prefixlen]:
            del self._lengths[lease.subnet.prefixlen]
        bucket = self._bucket(lease.subnet)
        members = self._buckets.get(bucket, {})
        members.pop(checked.record.key, None)
        if not members:
            self._buckets.pop(bucket, None)
        dirty.add(bucket)

    def _recompute(self) -> tuple[list[Lease], list[Lease]]:
        """The rules over every record: the index rebuilt, every bucket chosen again."""
        self._indexed_for = (self.config, self.own_key)
        if self._families() != (True, False):
            return self._recompute_families()
        self._own_subnet = self._own_now()
        self._lengths = Counter(
            c.lease.subnet.prefixlen
            for key, c in self._records.items()
            if c.lease is not None and key != self.own_key
        )
        self._coarse = min(self._lengths, default=32)
        self._buckets, self._valid_in = {}, {}
        dirty: set[int] = set()
        for checked in self._records.values():
            if checked.lease is None and checked.problem:
                self._reject(checked, checked.problem)
            self._index(checked, dirty)
        before, self._valid = self._valid, {}
        for bucket in dirty:
            self._valid_in[bucket] = chosen = self._choose(bucket)
            self._valid.update(chosen)
        return self._difference(before)

    def _difference(self, before: dict[_Subnets, Lease]) -> tuple[list[Lease], list[Lease]]:
        """(added or changed, removed) from ``before`` to the valid leases now."""
        changed = [
            lease for subnet, lease in self._valid.items() if not lease.same_as(before.get(subnet))
        ]
        removed = [lease for subnet, lease in before.items() if subnet not in self._valid]
        return changed, removed

    def _rerun(self, dirty: set[int]) -> tuple[list[Lease], list[Lease]]:
        """The rules over the buckets a batch touched; their net change."""
        changed: list[Lease] = []
        removed: list[Lease] = []
        for bucket in dirty:
            before = self._valid_in.pop(bucket, {})
            after = self._choose(bucket)
            if after:
                self._valid_in[bucket] = after
            for subnet, lease in before.items():
                if subnet not in after:
                    del self._valid[subnet]
                    removed.append(lease)
            for subnet, lease in after.items():
                if not lease.same_as(before.get(subnet)):
                    self._valid[subnet] = lease
                    changed.append(lease)
        return changed, removed

    def _by_age(self, checked: Iterable[_Checked]) -> list[_Checked]:
        """Oldest first: create revision, then the key in byte order."""
        return sorted(
            checked,
            key=lambda c: (
                c.record.create_revision,
                c.record.key.encode("utf-8", "surrogateescape"),
            ),
        )

    def _choose(self, bucket: int) -> dict[_Subnets, Lease]:
        """The valid leases of one bucket (IPv4 only): oldest first, each unless it
        overlaps our own subnet or one chosen before it."""
        own_subnet = self._own_subnet
        taken = _Intervals(32)
        valid: dict[_Subnets, Lease] = {}
        for checked in self._by_age(self._buckets.get(bucket, {}).values()):
            lease = checked.lease
            assert lease is not None
            if own_subnet is not None and lease.subnet.overlaps(own_subnet):
                self._reject(checked, f"lease {lease.subnet} overlaps this node's {own_subnet}")
            elif taken.overlaps(lease.subnet):
                self._reject(checked, f"lease {lease.subnet} overlaps an older lease")
            else:
                taken.add(lease.subnet)
                valid[lease.subnet] = lease
        return valid

    def _recompute_families(self) -> tuple[list[Lease], list[Lease]]:
        """Dual stack or IPv6 only: the rules over every record, both families at once (a
        lease's IPv6 half can clash with a lease in any IPv4 bucket, and the older of two
        wins in both families: not split into buckets, every batch runs them all)."""
        own = self._records.get(self.own_key) if self.own_key else None
        own_lease = own.lease if own is not None else None
        use_v4, use_v6 = self._families()
        taken, taken6 = _Intervals(32), _Intervals(128)
        if own_lease is not None:
            if use_v4:
                taken.add(own_lease.subnet)
            if use_v6 and own_lease.ipv6_subnet is not None:
                taken6.add(own_lease.ipv6_subnet)
        candidates: list[_Checked] = []
        for key, checked in self._records.items():
            if key == self.own_key:
                continue
            if checked.lease is None:
                if checked.problem:
                    self._reject(checked, checked.problem)
            else:
                candidates.append(checked)
        before, self._valid = self._valid, {}
        for checked in self._by_age(candidates):
            lease = checked.lease
            assert lease is not None
            subnet6 = lease.ipv6_subnet if use_v6 else None
            clash = (use_v4 and taken.overlaps(lease.subnet)) or (
                subnet6 is not None and taken6.overlaps(subnet6)
            )
            if clash:
                mine = own_lease is not None and (
                    (use_v4 and lease.subnet.overlaps(own_lease.subnet))
                    or _overlap6(subnet6, own_lease.ipv6_subnet)
                )
                whose = "an older lease"
                if mine and own_lease is not None:
                    whose = f"this node's {_name(own_lease)}"
                self._reject(checked, f"lease {_name(lease)} overlaps {whose}")
            else:
                if use_v4:
                    taken.add(lease.subnet)
                if subnet6 is not None:
                    taken6.add(subnet6)
                self._valid[lease.subnet if use_v4 or subnet6 is None else subnet6] = lease
        return self._difference(before)


# What a valid lease is known by: its IPv4 subnet, or its IPv6 one when IPv6 only.
_Subnets = IPv4Network | IPv6Network


def _order(subnet: _Subnets) -> tuple[int, int]:
    return subnet.version, int(subnet.network_address)


def _name(lease: Lease) -> str:
    """A lease's subnets as a log shows them: ``10.244.3.0/24 fd00:10:0:3::/64``."""
    v6 = lease.ipv6_subnet
    if v6 is None:
        return str(lease.subnet)
    return str(v6) if lease.subnet == NO_IPV4 else f"{lease.subnet} {v6}"


def _overlap6(a: IPv6Network | None, b: IPv6Network | None) -> bool:
    return a is not None and b is not None and a.overlaps(b)


class _Intervals:
    """Subnets taken so far, for overlap checks: per prefix length, sorted networks."""

    def __init__(self, bits: int) -> None:
        self.bits = bits  # 32 for IPv4, 128 for IPv6
        self._by_len: dict[int, list[int]] = {}

    def add(self, subnet: IPv4Network | IPv6Network) -> None:
        starts = self._by_len.setdefault(subnet.prefixlen, [])
        address = int(subnet.network_address)
        starts.insert(bisect_left(starts, address), address)

    def overlaps(self, subnet: IPv4Network | IPv6Network) -> bool:
        first = int(subnet.network_address)
        last = int(subnet.broadcast_address)
        for length, starts in self._by_len.items():
            if length <= subnet.prefixlen:  # a taken one as large or larger: contains it?
                size = 1 << (self.bits - length)
                base = first - first % size
                i = bisect_left(starts, base)
                if i < len(starts) and starts[i] == base:
                    return True
            else:  # smaller taken ones: does any start inside it?
                i = bisect_left(starts, first)
                if i < len(starts) and starts[i] <= last:
                    return True
        return False
