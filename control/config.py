"""The network config (``<prefix>/config``) with flannel's defaults and validation rules."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

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
# Keys flanneld reads that we ignore, and why (a warning); EnableIPv6 is an error instead.
_IGNORED_KEYS = {
    "ipv6network": "ignored without EnableIPv6, as flanneld does",
    "ipv6subnetlen": "ignored without EnableIPv6, as flanneld does",
    "ipv6subnetmin": "ignored without EnableIPv6, as flanneld does",
    "ipv6subnetmax": "ignored without EnableIPv6, as flanneld does",
    "enablenftables": "ip-masq and FORWARD rules are installed with the iptables command "
    "(iptables-nft where the machine has it), not in flanneld's own nftables tables",
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
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Network
    subnet_max: IPv4Network
    backend: BackendConfig
    # Keys that are understood but not acted on, one line each, for the daemon to log.
    warnings: tuple[str, ...] = ()

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


def _subnet_at(value: Any, name: str, network: IPv4Network, subnet_len: int) -> IPv4Network:
    try:
        address = IPv4Address(str(value).split("/")[0])
    except ValueError:
        raise ConfigError(f"{name}: {clip(value)} is not an IPv4 address") from None
    if address not in network:
        raise ConfigError(f"{name}: {address} is outside Network {network}")
    if int(address) % (1 << (32 - subnet_len)):
        raise ConfigError(f"{name}: {address} is not on a /{subnet_len} subnet boundary")
    return IPv4Network((address, subnet_len))


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


def _bool_field(raw: dict[str, Any], key: str, name: str) -> bool:
    value = raw.get(key, False)
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
    if fields.get("enableipv4", True) is False:
        raise ConfigError("EnableIPv4: false is not supported (IPv4 is required)")
    if fields.pop("enableipv6", False) is not False:
        raise ConfigError(
            "EnableIPv6: dual stack is not supported (IPv4 only: pods on this node would "
            "get no IPv6 address); set it false or keep flanneld on this node"
        )
    warnings = [
        f"{_display(raw, key)}: {_IGNORED_KEYS[key]}"
        for key in sorted(fields)
        if key in _IGNORED_KEYS and fields[key] not in (None, False, "", [])
    ]
    warnings += [
        f"{_display(raw, key)}: unknown key, ignored"
        for key in sorted(fields)
        if key not in _KNOWN_KEYS and key not in _IGNORED_KEYS
    ]
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
    size = 1 << (32 - subnet_len)
    base = int(network.network_address)
    default_min = IPv4Network((base + size, subnet_len))
    default_max = IPv4Network((base + network.num_addresses - size, subnet_len))
    subnet_min = (
        _subnet_at(fields["subnetmin"], "SubnetMin", network, subnet_len)
        if "subnetmin" in fields
        else default_min
    )
    subnet_max = (
        _subnet_at(fields["subnetmax"], "SubnetMax", network, subnet_len)
        if "subnetmax" in fields
        else default_max
    )
    if subnet_min.network_address > subnet_max.network_address:
        raise ConfigError(f"SubnetMin: {subnet_min} is above SubnetMax {subnet_max}")
    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend=(backend := parse_backend(fields.get("backend"))),
        warnings=(*warnings, *backend.warnings),
    )


def _display(raw: dict[str, Any], key: str) -> str:
    """A config key as the operator wrote it (``key`` is lowercased), cut to a few words."""
    return shorten(next((str(k) for k in raw if str(k).lower() == key), key))


def config_json(
    network: IPv4Network, backend_type: str = "udp", direct_routing: bool = False
) -> str:
    """The config JSON an operator would write to seed a registry."""
    backend: dict[str, Any] = {"Type": backend_type}
    if direct_routing:
        backend["DirectRouting"] = True
    return json.dumps({"Network": str(network), "Backend": backend})
