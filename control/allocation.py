"""Choosing a free subnet the way flanneld does: random among the first free ones, for
each family on its own (flanneld draws the IPv4 and the IPv6 subnet independently)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network
from typing import TypeVar

from control.config import IPv6Config, NetworkConfig

# flanneld collects up to 100 free subnets from SubnetMin and picks one at random, so that
# concurrent joiners rarely race for the same key.
CANDIDATES = 100

Net = TypeVar("Net", IPv4Network, IPv6Network)


def _free(first: Net, last: Net, taken: Iterable[Net], limit: int) -> list[Net]:
    """Up to ``limit`` subnets of ``first``'s size from ``first`` to ``last`` that
    overlap nothing in ``taken``."""
    used = [(int(n.network_address), int(n.broadcast_address)) for n in taken]
    size = first.num_addresses
    kind = type(first)
    free: list[Net] = []
    for address in range(int(first.network_address), int(last.network_address) + 1, size):
        end = address + size - 1
        if any(lo <= end and address <= hi for lo, hi in used):
            continue
        free.append(kind((address, first.prefixlen)))
        if len(free) >= limit:
            break
    return free


def free_subnets(
    config: NetworkConfig, taken: Iterable[IPv4Network], limit: int = CANDIDATES
) -> list[IPv4Network]:
    """Up to ``limit`` subnets in [SubnetMin, SubnetMax] that overlap nothing in ``taken``."""
    return _free(config.subnet_min, config.subnet_max, taken, limit)


def free_ipv6_subnets(
    ipv6: IPv6Config, taken: Iterable[IPv6Network], limit: int = CANDIDATES
) -> list[IPv6Network]:
    """Up to ``limit`` subnets in [IPv6SubnetMin, IPv6SubnetMax] overlapping nothing taken."""
    return _free(ipv6.subnet_min, ipv6.subnet_max, taken, limit)


def choose_subnet(
    config: NetworkConfig, taken: Iterable[IPv4Network], rng: random.Random | None = None
) -> IPv4Network | None:
    """A random free subnet among the first free ones, or None when the network is full."""
    candidates = free_subnets(config, taken)
    if not candidates:
        return None
    return (rng or random.Random()).choice(candidates)


def choose_ipv6_subnet(
    ipv6: IPv6Config, taken: Iterable[IPv6Network], rng: random.Random | None = None
) -> IPv6Network | None:
    """The same for the IPv6 half, or None when IPv6Network is full."""
    candidates = free_ipv6_subnets(ipv6, taken)
    if not candidates:
        return None
    return (rng or random.Random()).choice(candidates)
