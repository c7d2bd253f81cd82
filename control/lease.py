"""Subnet leases: the registry key format and the JSON value, byte for byte as flanneld."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from control.text import clip

DEFAULT_PREFIX = "/coreos.com/network"
# flanneld's IPv4 half of an IPv6-only lease (EnableIPv4 false): Go's zero IP4Net, which
# its keys spell ``0.0.0.0-0``.
NO_IPV4 = IPv4Network("0.0.0.0/0")

# What a lease is known by among the valid ones (control.lease_rules): its IPv4 subnet,
# or its IPv6 one when it has no IPv4 half (IPv6 only: every key starts ``0.0.0.0-0``).
LeaseId = IPv4Network | IPv6Network


class LeaseError(ValueError):
    """A lease key or value that does not parse; the message says which and why."""


@dataclass(frozen=True)
class Lease:
    subnet: IPv4Network
    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: dict[str, Any] | None = None
    ipv6_subnet: IPv6Network | None = None
    public_ipv6: IPv6Address | None = None
    backend_v6_data: dict[str, Any] | None = None  # vxlan: VNI and VtepMAC of flannel-v6.<VNI>
    # False for a reservation (a key written without a TTL): it must never be taken.
    has_ttl: bool = True
    # The registry revision that created the key (control.kv.Entry): lower is older, and
    # the older of two conflicting leases wins (control.lease_rules). 0: not known. Not
    # part of equality (a lease is its record's content); same_as() includes it.
    create_revision: int = field(default=0, compare=False)

    def same_as(self, other: Lease | None) -> bool:
        """Equal, and of the same age."""
        return other is not None and self == other and self.create_revision == other.create_revision

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def has_ipv4(self) -> bool:
        """Whether the lease has an IPv4 half (not an IPv6-only ``0.0.0.0-0&...`` one)."""
        return self.subnet != NO_IPV4

    @property
    def ident(self) -> LeaseId:
        """The lease's identity among valid leases: unique, since their subnets never
        overlap (the IPv4 one; the IPv6 one for an IPv6-only lease)."""
        if self.subnet == NO_IPV4 and self.ipv6_subnet is not None:
            return self.ipv6_subnet
        return self.subnet

    @property
    def name(self) -> str:
        """How logs and status name the lease: ``10.244.3.0/24``, or its IPv6 subnet
        when it has no IPv4 half."""
        return str(self.ident)

    def value_json(self) -> str:
        return lease_value_json(self)


def subnet_key(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    """``10.244.3.0-24``, or ``10.244.3.0-24&fc00::-64`` for a dual-stack lease, or
    ``0.0.0.0-0&fc00::-64`` for an IPv6-only one (flanneld keys it with Go's zero IP4Net)."""
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


def parse_subnet_key(key: str) -> tuple[IPv4Network, IPv6Network | None]:
    """Parse the last path element of a lease key (a full etcd key is accepted too)."""
    name = key.rsplit("/", 1)[-1]
    v4_part, _, v6_part = name.partition("&")
    try:
        address, prefix = v4_part.rsplit("-", 1)
        subnet = IPv4Network(f"{address}/{int(prefix)}")
    except ValueError:
        raise LeaseError(f"lease key {clip(key)}: expected e.g. 10.244.3.0-24") from None
    ipv6 = None
    if v6_part:
        try:
            address6, prefix6 = v6_part.rsplit("-", 1)
            ipv6 = IPv6Network(f"{address6}/{int(prefix6)}")
        except ValueError:
            raise LeaseError(f"lease key {clip(key)}: bad IPv6 part") from None
    return subnet, ipv6


def ident_of_key(key: str) -> LeaseId:
    """``Lease.ident`` of the lease under ``key`` (its IPv6 subnet when the key's IPv4
    part is ``0.0.0.0-0``)."""
    subnet, ipv6_subnet = parse_subnet_key(key)
    return ipv6_subnet if subnet == NO_IPV4 and ipv6_subnet is not None else subnet


def lease_value_json(lease: Lease) -> str:
    """The value flanneld writes: Go's encoding/json of LeaseAttrs (field order, no spaces)."""
    value: dict[str, Any] = {
        "PublicIP": str(lease.public_ip),
        "PublicIPv6": str(lease.public_ipv6) if lease.public_ipv6 is not None else None,
    }
    if lease.backend_type:
        value["BackendType"] = lease.backend_type
    if lease.backend_data is not None:
        value["BackendData"] = lease.backend_data
    if lease.backend_v6_data is not None:
        value["BackendV6Data"] = lease.backend_v6_data
    return json.dumps(value, separators=(",", ":"))


def parse_lease(
    key: str, value: bytes | str, *, has_ttl: bool = True, create_revision: int = 0
) -> Lease:
    """A lease from its registry key and JSON value; field names matched in any case."""
    subnet, ipv6_subnet = parse_subnet_key(key)
    try:
        raw = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise LeaseError(f"lease {subnet}: value is not JSON") from None
    if not isinstance(raw, dict):
        raise LeaseError(f"lease {subnet}: value must be a JSON object")
    fields = {str(k).lower(): v for k, v in raw.items()}
    try:
        public_ip = IPv4Address(str(fields.get("publicip", "")))
    except ValueError:
        raise LeaseError(
            f"lease {subnet}: PublicIP {clip(fields.get('publicip'))} is invalid"
        ) from None
    public_ipv6 = None
    if fields.get("publicipv6") is not None:
        try:
            public_ipv6 = IPv6Address(str(fields["publicipv6"]))
        except ValueError:
            raise LeaseError(
                f"lease {subnet}: PublicIPv6 {clip(fields['publicipv6'])} is invalid"
            ) from None
    backend_type = fields.get("backendtype") or ""
    if not isinstance(backend_type, str):
        raise LeaseError(f"lease {subnet}: BackendType must be a string")
    backend_data = fields.get("backenddata")
    if backend_data is not None and not isinstance(backend_data, dict):
        raise LeaseError(f"lease {subnet}: BackendData must be an object")
    backend_v6_data = fields.get("backendv6data")
    if backend_v6_data is not None and not isinstance(backend_v6_data, dict):
        raise LeaseError(f"lease {subnet}: BackendV6Data must be an object")
    return Lease(
        subnet=subnet,
        public_ip=public_ip,
        backend_type=backend_type,
        backend_data=backend_data,
        ipv6_subnet=ipv6_subnet,
        public_ipv6=public_ipv6,
        backend_v6_data=backend_v6_data,
        has_ttl=has_ttl,
        create_revision=create_revision,
    )
