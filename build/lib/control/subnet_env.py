"""``subnet.env``: what the daemon tells the CNI plugin (flannel's exact format)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network


class SubnetEnvError(ValueError):
    """A subnet.env file that is missing a variable or has a malformed one."""


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network
    subnet: IPv4Interface  # the lease with the gateway address: 10.244.3.1/24
    mtu: int
    ip_masq: bool = False

    def render(self) -> str:
        return (
            f"FLANNEL_NETWORK={self.network}\n"
            f"FLANNEL_SUBNET={self.subnet}\n"
            f"FLANNEL_MTU={self.mtu}\n"
            f"FLANNEL_IPMASQ={'true' if self.ip_masq else 'false'}\n"
        )

    @classmethod
    def for_lease(
        cls, network: IPv4Network, lease_subnet: IPv4Network, mtu: int, ip_masq: bool = False
    ) -> SubnetEnv:
        gateway = IPv4Interface((int(lease_subnet.network_address) + 1, lease_subnet.prefixlen))
        return cls(network=network, subnet=gateway, mtu=mtu, ip_masq=ip_masq)


def parse_subnet_env(text: str) -> SubnetEnv:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise SubnetEnvError(f"subnet.env: line {line!r} is not NAME=VALUE")
        values[name.strip()] = value.strip()
    try:
        return SubnetEnv(
            network=IPv4Network(values["FLANNEL_NETWORK"], strict=False),
            subnet=IPv4Interface(values["FLANNEL_SUBNET"]),
            mtu=int(values["FLANNEL_MTU"]),
            ip_masq=values.get("FLANNEL_IPMASQ", "false").lower() == "true",
        )
    except KeyError as e:
        raise SubnetEnvError(f"subnet.env: {e.args[0]} is missing") from None
    except ValueError as e:
        raise SubnetEnvError(f"subnet.env: {e}") from None
