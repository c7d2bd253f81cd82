"""The network config (``<prefix>/config``) with flannel's defaults and validation rules."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any, TypeVar

from control.lease import NO_IPV4
from control.text import clip, shorten

SUPPORTED_BACKENDS = ("udp", "vxlan", "host-gw")
DEFAULT_PORTS = {"udp": 8285, "vxlan": 8472}
# Options each backend reads (lowercased); any other is warned about, not silently dropped.
BACKEND_OPTIONS = {
    "udp": {"type", "port"},
    "vxlan": {"type", "vni", "port", "directrouting", "mtu", "gbp", "learning"},
    "host-gw": {"type"},
}
_KNOWN_KEYS = {"network", "subnetlen", "subnetmin", "subnetmax", "backend", "enableipv4"}
_KNOWN_KEYS |= {"enablenftables"}
_IPV6_KEYS = {"ipv6network", "ipv6subnetlen", "ipv6subnetmin", "ipv6subnetmax"}
# Keys flanneld reads that we ignore, and why (a warning).
_IGNORED_KEYS = {
    **{key: "ignored without EnableIPv6, as flanneld does" for key in _IPV6_KEYS},
    "networks": "flanneld's multi-CIDR list (Kubernetes only) is ignored; Network is used",
    "ipv6networks": "flanneld's multi-CIDR list (Kubernetes only) is ignored",
}
# Ranges an overlay network must not touch: routing them into the TUN breaks the node
# ("this network", loopback) or cannot carry unicast traffic (multicast, class E and the
# limited broadcast).
FORBIDDEN_NETWORKS = {
    IPv4Network("0.0.0.0/8"): "the 'this network' range",
    IPv4Network("127.0.0.0/8"): "loopback",
    IPv4Network("224.0.0.0/4"): "multicast",
    IPv4Network("240.0.0.0/4"): "reserved (class E and broadcast)",
}
# An IPv6 overlay network is a unique local (ULA) or a global unicast range: anything
# else is loopback, link-local, multicast, IPv4-mapped or reserved, which a route into
# the overlay would break or which cannot carry unicast traffic between nodes.
IPV6_UNICAST_RANGES = (IPv6Network("fc00::/7"), IPv6Network("2000::/3"))


Net = TypeVar("Net", IPv4Network, IPv6Network)


class ConfigError(ValueError):
    """An invalid network config; the message names the field and what is wrong."""


@dataclass(frozen=True)
class BackendConfig:
    type: str = "udp"
    port: int = 8285
    vni: int = 1
    direct_routing: bool = False
    mtu: int | None = None  # vxlan: the device MTU instead of underlay - 50
    learning: bool = False  # vxlan: the kernel device's learning (userspace ignores it)
    # Every option as given (lowercased keys), so nothing flanneld wrote is lost.
    options: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class IPv6Config:
    """The IPv6 half of a dual-stack or IPv6-only config (EnableIPv6)."""

    network: IPv6Network
    subnet_len: int
    subnet_min: IPv6Network
    subnet_max: IPv6Network


@dataclass(frozen=True)
class NetworkConfig:
    # With EnableIPv4 false (IPv6 only) these hold flanneld's zero values: NO_IPV4, 0.
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Network
    subnet_max: IPv4Network
    backend: BackendConfig
    # Keys that are understood but not acted on, one line each, for the daemon to log.
    warnings: tuple[str, ...] = ()
    enable_ipv4: bool = True
    ipv6: IPv6Config | None = None  # None: EnableIPv6 is false
    # flanneld's ip-masq and FORWARD rules in its own nftables tables, not iptables chains.
    enable_nftables: bool = False

    @property
    def overlay_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """The overlay network of each enabled family (IPv6 only: IPv6Network alone)."""
        networks: list[IPv4Network | IPv6Network] = [self.network] if self.enable_ipv4 else []
        if self.ipv6 is not None:
            networks.append(self.ipv6.network)
        return tuple(networks)

    @property
    def subnet_size(self) -> int:
        return 1 << (32 - self.subnet_len)

    def subnets(self) -> list[IPv4Network]:
        """Every subnet from SubnetMin to SubnetMax, in order."""
        first = int(self.subnet_min.network_address)
        last = int(self.subnet_max.network_address)
        return [
            IPv4Network((address, self.subnet_len))
            for address in range(first, last + 1, self.subnet_size)
        ]


def _lower_keys(raw: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in raw.items()}


def _subnet_at(value: Any, name: str, network: Net, subnet_len: int) -> Net:
    """A SubnetMin/SubnetMax (or IPv6) value: an address of the network's family, inside
    it, on a subnet boundary."""
    network_name = "Network" if network.version == 4 else "IPv6Network"
    try:
        address = ip_address(str(value).split("/")[0])
    except ValueError:
        address = None
    if address is None or address.version != network.version:
        raise ConfigError(f"{name}: {clip(value)} is not an IPv{network.version} address")
    if not int(network.network_address) <= int(address) <= int(network.broadcast_address):
        raise ConfigError(f"{name}: {address} is outside {network_name} {network}")
    if int(address) % (1 << (network.max_prefixlen - subnet_len)):
        raise ConfigError(f"{name}: {address} is not on a /{subnet_len} subnet boundary")
    return type(network)((int(address), subnet_len))


def _bounds(
    fields: dict[str, Any], names: tuple[str, str], network: Net, subnet_len: int
) -> tuple[Net, Net]:
    """SubnetMin and SubnetMax (or their IPv6 pair) as given, else (absent or null)
    flanneld's defaults: the second subnet (the first is skipped) and the last."""
    size = 1 << (network.max_prefixlen - subnet_len)
    base = int(network.network_address)
    defaults = (base + size, base + network.num_addresses - size)
    low, high = (
        _subnet_at(fields[name.lower()], name, network, subnet_len)
        if fields.get(name.lower()) is not None
        else type(network)((default, subnet_len))
        for name, default in zip(names, defaults, strict=True)
    )
    if low.network_address > high.network_address:
        raise ConfigError(f"{names[0]}: {low} is above {names[1]} {high}")
    return low, high


def _int_field(raw: dict[str, Any], key: str, name: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: {clip(value)} is not an integer")
    return value


def parse_backend(raw: Any) -> BackendConfig:
    if raw is None:
        return BackendConfig()
    if not isinstance(raw, dict):
        raise ConfigError(f"Backend: expected an object, got {type(raw).__name__}")
    options = _lower_keys(raw)
    kind = options.get("type", "udp")
    if not isinstance(kind, str) or kind not in SUPPORTED_BACKENDS:
        supported = ", ".join(SUPPORTED_BACKENDS)
        raise ConfigError(f"Backend.Type: {clip(kind)} is not supported (use one of {supported})")
    port = _int_field(options, "port", "Backend.Port", 0) or DEFAULT_PORTS.get(kind, 0)
    if kind != "host-gw" and not 1 <= port <= 65535:
        raise ConfigError(f"Backend.Port: {port} is not a UDP port (1-65535)")
    vni = _int_field(options, "vni", "Backend.VNI", 1)
    if not 0 <= vni < (1 << 24):
        raise ConfigError(f"Backend.VNI: {vni} does not fit in 24 bits")
    direct = _bool_field(options, "directrouting", "Backend.DirectRouting")
    if _bool_field(options, "gbp", "Backend.GBP"):
        raise ConfigError(
            "Backend.GBP: true is not supported (the VXLAN group policy extension changes "
            "the wire format)"
        )
    learning = _bool_field(options, "learning", "Backend.Learning")
    mtu: int | None = None
    if "mtu" in options:
        mtu = _int_field(options, "mtu", "Backend.MTU", 0)
        if not 68 <= mtu <= 65535:
            raise ConfigError(f"Backend.MTU: {mtu} is not an IPv4 MTU (68-65535)")
    warnings = tuple(
        f"Backend.{shorten(key)}: not a {kind} option, ignored"
        for key in sorted(set(options) - BACKEND_OPTIONS[kind])
    )
    return BackendConfig(
        type=kind,
        port=port,
        vni=vni,
        direct_routing=direct,
        mtu=mtu,
        learning=learning,
        options=options,
        warnings=warnings,
    )


def _bool_field(raw: dict[str, Any], key: str, name: str, default: bool = False) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: {clip(value)} is not true or false")
    return value


def parse_config(data: bytes | str | dict[str, Any]) -> NetworkConfig:
    """Parse and validate a config as flanneld writes it (field names in any case)."""
    if isinstance(data, dict):
        raw: Any = data
    else:
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        except RecursionError:
            raise ConfigError("config is not valid JSON: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError("config must be a JSON object")
    fields = _lower_keys(raw)
    enable_ipv4 = _bool_field(fields, "enableipv4", "EnableIPv4", default=True)
    enable_ipv6 = _bool_field(fields, "enableipv6", "EnableIPv6")
    if not enable_ipv4 and not enable_ipv6:
        raise ConfigError("EnableIPv4 and EnableIPv6 are both false: enable one of them")
    known = _KNOWN_KEYS | {"enableipv6"} | (_IPV6_KEYS if enable_ipv6 else set())
    warnings = [
        f"{_display(raw, key)}: {_IGNORED_KEYS[key]}"
        for key in sorted(fields)
        if key not in known and key in _IGNORED_KEYS and fields[key] not in (None, False, "", [])
    ]
    warnings += [
        f"{_display(raw, key)}: unknown key, ignored"
        for key in sorted(fields)
        if key not in known and key not in _IGNORED_KEYS
    ]
    if enable_ipv4:
        network, subnet_len, subnet_min, subnet_max = _parse_ipv4(fields)
    else:  # flanneld leaves the IPv4 half at Go's zero values and never reads it
        network, subnet_len, subnet_min, subnet_max = NO_IPV4, 0, NO_IPV4, NO_IPV4
    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend=(backend := parse_backend(fields.get("backend"))),
        warnings=(*warnings, *backend.warnings),
        enable_ipv4=enable_ipv4,
        ipv6=_parse_ipv6(fields) if enable_ipv6 else None,
        enable_nftables=_bool_field(fields, "enablenftables", "EnableNFTables"),
    )


def _parse_ipv4(fields: dict[str, Any]) -> tuple[IPv4Network, int, IPv4Network, IPv4Network]:
    """Network, SubnetLen, SubnetMin, SubnetMax with flanneld's defaults and rules."""
    if "network" not in fields:
        raise ConfigError('Network: missing (e.g. "Network": "10.244.0.0/16")')
    try:
        network = IPv4Network(str(fields["network"]), strict=False)
    except ValueError:
        raise ConfigError(f"Network: {clip(fields['network'])} is not an IPv4 CIDR") from None
    if network.prefixlen > 28:
        raise ConfigError(f"Network: {network} is smaller than /28")
    for forbidden, what in FORBIDDEN_NETWORKS.items():
        if network.overlaps(forbidden):
            raise ConfigError(f"Network: {network} overlaps {forbidden} ({what})")
    default_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
    subnet_len = _int_field(fields, "subnetlen", "SubnetLen", default_len)
    if subnet_len > 30:
        raise ConfigError(f"SubnetLen: {subnet_len} is larger than 30")
    if subnet_len < network.prefixlen + 2:
        raise ConfigError(
            f"SubnetLen: {subnet_len} is smaller than the network prefix + 2 "
            f"(/{network.prefixlen + 2} for Network {network})"
        )
    subnet_min, subnet_max = _bounds(fields, ("SubnetMin", "SubnetMax"), network, subnet_len)
    return network, subnet_len, subnet_min, subnet_max


def _parse_ipv6(fields: dict[str, Any]) -> IPv6Config:
    """IPv6Network, IPv6SubnetLen, IPv6SubnetMin, IPv6SubnetMax with flanneld's defaults
    (a /64 per node when the network is a /62 or larger, else prefix + 2) and rules."""
    value = fields.get("ipv6network")
    if not value:
        raise ConfigError(
            'IPv6Network: missing with EnableIPv6 (e.g. "IPv6Network": "fd00:10::/56")'
        )
    try:
        network = IPv6Network(str(value), strict=False)
    except ValueError:
        raise ConfigError(f"IPv6Network: {clip(value)} is not an IPv6 CIDR") from None
    if not any(network.subnet_of(r) for r in IPV6_UNICAST_RANGES):
        raise ConfigError(
            f"IPv6Network: {network} is not a unique local (fc00::/7) or global unicast "
            "(2000::/3) range"
        )
    if network.prefixlen > 124:
        raise ConfigError(f"IPv6Network: {network} is smaller than /124")
    default_len = 64 if network.prefixlen <= 62 else network.prefixlen + 2
    subnet_len = _int_field(fields, "ipv6subnetlen", "IPv6SubnetLen", 0) or default_len
    if subnet_len > 126:
        raise ConfigError(f"IPv6SubnetLen: {subnet_len} is larger than 126")
    if subnet_len < network.prefixlen + 2:
        raise ConfigError(
            f"IPv6SubnetLen: {subnet_len} is smaller than the network prefix + 2 "
            f"(/{network.prefixlen + 2} for IPv6Network {network})"
        )
    names = ("IPv6SubnetMin", "IPv6SubnetMax")
    subnet_min, subnet_max = _bounds(fields, names, network, subnet_len)
    return IPv6Config(network, subnet_len, subnet_min, subnet_max)


def _display(raw: dict[str, Any], key: str) -> str:
    """A config key as the operator wrote it (``key`` is lowercased), cut to a few words."""
    return shorten(next((str(k) for k in raw if str(k).lower() == key), key))


def config_json(
    network: IPv4Network | None,
    backend_type: str = "udp",
    direct_routing: bool = False,
    ipv6_network: IPv6Network | None = None,
) -> str:
    """The config JSON an operator would write to seed a registry: dual stack with an
    ``ipv6_network``, IPv6 only without a ``network`` (EnableIPv4 false)."""
    backend: dict[str, Any] = {"Type": backend_type}
    if direct_routing:
        backend["DirectRouting"] = True
    config: dict[str, Any] = {"Network": str(network)} if network else {"EnableIPv4": False}
    if ipv6_network is not None:
        config |= {"EnableIPv6": True, "IPv6Network": str(ipv6_network)}
    return json.dumps({**config, "Backend": backend})
