"""Choosing a free subnet the way flanneld does: random among the first free ones."""

from __future__ import annotations

import random
from collections.abc import Iterable
from ipaddress import IPv4Network

from control.config import NetworkConfig

# flanneld collects up to 100 free subnets from SubnetMin and picks one at random, so that
# concurrent joiners rarely race for the same key.
CANDIDATES = 100


def free_subnets(
    config: NetworkConfig, taken: Iterable[IPv4Network], limit: int = CANDIDATES
) -> list[IPv4Network]:
    """Up to ``limit`` subnets in [SubnetMin, SubnetMax] that overlap nothing in ``taken``."""
    used = [(int(n.network_address), int(n.broadcast_address)) for n in taken]
    size = config.subnet_size
    free: list[IPv4Network] = []
    start = int(config.subnet_min.network_address)
    for address in range(start, int(config.subnet_max.network_address) + 1, size):
        end = address + size - 1
        if any(lo <= end and address <= hi for lo, hi in used):
            continue
        free.append(IPv4Network((address, config.subnet_len)))
        if len(free) >= limit:
            break
    return free


def choose_subnet(
    config: NetworkConfig, taken: Iterable[IPv4Network], rng: random.Random | None = None
) -> IPv4Network | None:
    """A random free subnet among the first free ones, or None when the network is full."""
    candidates = free_subnets(config, taken)
    if not candidates:
        return None
    return (rng or random.Random()).choice(candidates)
