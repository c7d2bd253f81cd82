"""``subnet.env``: what the daemon tells the CNI plugin (flannel's exact format)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network


class SubnetEnvError(ValueError):
    """A subnet.env file that is missing a variable or has a malformed one."""


@dataclass(frozen=True)
class SubnetEnv:
    # IPv6 only (EnableIPv4 false): None, and the file has no FLANNEL_NETWORK and
    # FLANNEL_SUBNET lines, as flanneld's WriteSubnetFile writes it.
    network: IPv4Network | None
    subnet: IPv4Interface | None  # the lease with the gateway address: 10.244.3.1/24
    mtu: int
    ip_masq: bool = False
    # Dual stack (EnableIPv6): FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET.
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Interface | None = None  # fd00:10:0:34::1/64

    def render(self) -> str:
        """flanneld's order: the IPv4 lines (unless IPv6 only), the IPv6 lines, MTU,
        IPMASQ."""
        lines = []
        if self.network is not None and self.subnet is not None:
            lines += [f"FLANNEL_NETWORK={self.network}", f"FLANNEL_SUBNET={self.subnet}"]
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            lines += [
                f"FLANNEL_IPV6_NETWORK={self.ipv6_network}",
                f"FLANNEL_IPV6_SUBNET={self.ipv6_subnet}",
            ]
        lines += [f"FLANNEL_MTU={self.mtu}", f"FLANNEL_IPMASQ={str(self.ip_masq).lower()}"]
        return "".join(f"{line}\n" for line in lines)

    @classmethod
    def for_lease(
        cls,
        network: IPv4Network | None,
        lease_subnet: IPv4Network,
        mtu: int,
        ip_masq: bool = False,
        ipv6: tuple[IPv6Network, IPv6Network] | None = None,
    ) -> SubnetEnv:
        """``ipv6``: (IPv6Network, the lease's IPv6 subnet) with EnableIPv6; ``network``
        None: IPv6 only (no IPv4 lines)."""
        gateway = None
        if network is not None:
            gateway = IPv4Interface((int(lease_subnet.network_address) + 1, lease_subnet.prefixlen))
        ipv6_network = ipv6_gateway = None
        if ipv6 is not None:
            ipv6_network, subnet6 = ipv6
            ipv6_gateway = IPv6Interface((int(subnet6.network_address) + 1, subnet6.prefixlen))
        return cls(network, gateway, mtu, ip_masq, ipv6_network, ipv6_gateway)


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
        ipv6_network = values.get("FLANNEL_IPV6_NETWORK")
        ipv6_subnet = values.get("FLANNEL_IPV6_SUBNET")
        # IPv6 only: no IPv4 lines, but then both IPv6 ones.
        v4_required = not (ipv6_network and ipv6_subnet) or "FLANNEL_NETWORK" in values
        network = values["FLANNEL_NETWORK"] if v4_required else None
        subnet = values["FLANNEL_SUBNET"] if v4_required else None
        return SubnetEnv(
            network=IPv4Network(network, strict=False) if network else None,
            subnet=IPv4Interface(subnet) if subnet else None,
            mtu=int(values["FLANNEL_MTU"]),
            ip_masq=values.get("FLANNEL_IPMASQ", "false").lower() == "true",
            ipv6_network=IPv6Network(ipv6_network, strict=False) if ipv6_network else None,
            ipv6_subnet=IPv6Interface(ipv6_subnet) if ipv6_subnet else None,
        )
    except KeyError as e:
        raise SubnetEnvError(f"subnet.env: {e.args[0]} is missing") from None
    except ValueError as e:
        raise SubnetEnvError(f"subnet.env: {e}") from None
