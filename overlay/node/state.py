"""What a running node knows, in one place: the parts of the agent (startup, registry
events, what it shows, traces) read and fill it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from control.config import NetworkConfig
from control.kv import KeyValueStore
from control.lease import Lease
from control.peer_table import PeerTable
from control.subnet_env import SubnetEnv
from control.subnet_manager import SubnetManager
from overlay.backends.base import Backend, Underlay
from overlay.dataplane.counters import Counters
from overlay.node.iptables import IptablesKeeper
from overlay.node.options import NodeOptions
from overlay.node.peer_order import PeerOrder
from overlay.node.registry import RegistryMonitor
from overlay.observe.drop_log import Drops
from overlay.observe.health import Readiness

if TYPE_CHECKING:
    from overlay.observe.trace import Captures


@dataclass
class NodeState:
    options: NodeOptions
    underlay: Underlay
    log: Any  # a structlog logger bound to this node
    readiness: Readiness
    monitor: RegistryMonitor
    kv: KeyValueStore
    manager: SubnetManager
    iptables: IptablesKeeper
    drops: Drops = field(default_factory=Drops)  # the counters' drops, by reason
    counters: Counters = field(init=False)
    started: float = field(default_factory=time.time)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Known once startup has got that far:
    config: NetworkConfig | None = None
    peers: PeerTable | None = None
    # The peers by subnet, following each of the table's batches (overlay.node.events).
    peer_order: PeerOrder = field(default_factory=PeerOrder)
    backend: Backend | None = None
    lease: Lease | None = None
    captures: Captures | None = None  # made at the first trace (node.tracing.captures_of)
    mtu_changes: int = 0  # changes of the underlay's MTU followed (overlay.node.mtu)

    def __post_init__(self) -> None:
        self.counters = Counters(drops=self.drops)

    def subnet_env(self) -> SubnetEnv:
        """What subnet.env says for our lease: the network, the lease, the MTU pods get;
        with EnableIPv6, the IPv6 network and the lease's IPv6 subnet too."""
        config, lease = self.config, self.lease
        assert config is not None and lease is not None and self.backend is not None
        ipv6 = None
        if config.ipv6 is not None and lease.ipv6_subnet is not None:
            ipv6 = (config.ipv6.network, lease.ipv6_subnet)
        network = config.network if config.enable_ipv4 else None  # None: IPv6 only
        return SubnetEnv.for_lease(
            network, lease.subnet, self.backend.mtu, self.options.iptables.ip_masq, ipv6
        )
