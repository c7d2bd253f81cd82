"""The small interface every backend implements (flannel's backend/<name> split).

The daemon owns the registry, the lease and the peer table; a backend owns the datapath:
what it publishes in our lease, the MTU it leaves for pods, the devices and sockets it
needs, and what it does when peers come and go.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from control.config import NetworkConfig
from control.lease import Lease
from control.peer_table import PeerTable
from overlay.counters import Counters

if TYPE_CHECKING:
    from overlay.reconcile import KernelState


class BackendError(Exception):
    """This backend cannot run with this config or interface; the message is the one line."""


@dataclass(frozen=True)
class Underlay:
    iface: str
    address: IPv4Address  # where our socket binds
    public_ip: IPv4Address  # what peers send to (differs behind NAT)
    mtu: int


@dataclass
class Context:
    args: argparse.Namespace
    underlay: Underlay
    config: NetworkConfig
    counters: Counters
    peers: PeerTable
    log: Any  # a bound structlog logger


class Backend:
    """Defaults for a backend with no devices of its own; subclasses override."""

    # BackendType published in our lease and required of peers' leases.
    lease_type = ""
    name = "base"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        # The kernel objects it programs, kept true (overlay.reconcile); None: it has none.
        self.kernel: KernelState | None = None

    def lease_data(self) -> dict[str, Any] | None:
        """BackendData published in our lease (None: the field is omitted)."""
        return None

    @property
    def mtu(self) -> int:
        """The MTU pods get (FLANNEL_MTU)."""
        return self.ctx.underlay.mtu

    def prefix_for(self, lease: Lease) -> bytes:
        """Per-peer encapsulation prefix the peer table precomputes (none by default)."""
        return b""

    def accepts(self, lease: Lease) -> bool:
        return lease.backend_type == self.lease_type

    def prepare(self) -> None:
        """Create what can fail for lack of permission, before any lease is taken."""

    async def start(self, lease: Lease) -> None:
        """Bring the datapath up for our ``lease``."""

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        """Peers were added (or changed) and removed; the peer table is already updated."""

    def status(self) -> dict[str, Any]:
        return {}

    async def stop(self) -> None:
        """Release sockets and file descriptors. Kernel routes are left, as flanneld does
        (the TUN goes with its file descriptor, and its routes with it)."""
