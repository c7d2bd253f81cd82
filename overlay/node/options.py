"""Everything `overlay run` was asked to do, as typed options (built once by the front
end, ``overlay.cli.run``, from flanneld's flags and FLANNELD_* variables): one group per
part of the node that consumes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from overlay.backends.base import DatapathOptions
from overlay.node.iptables import IptablesOptions
from overlay.node.registry import RegistryOptions
from overlay.node.underlay import UnderlayOptions
from overlay.observe.log import LogOptions
from overlay.observe.status_socket import default_path

# Per-peer series for at most this many peers by default (`--metrics-peer-limit`): every
# node exports its peers, so a cluster of N nodes holds N x N of each per-peer family;
# beyond the limit, the busiest peers (README, "Health and metrics").
PEER_SERIES = 100


@dataclass(frozen=True)
class NodeOptions:
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    underlay: UnderlayOptions = field(default_factory=UnderlayOptions)
    datapath: DatapathOptions = field(default_factory=DatapathOptions)
    iptables: IptablesOptions = field(default_factory=IptablesOptions)
    log: LogOptions = field(default_factory=LogOptions)
    subnet_file: Path = Path("/run/flannel/subnet.env")
    status_socket: Path = field(default_factory=default_path)  # per network namespace
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0  # 0: no health server
    metrics_peer_limit: int = PEER_SERIES  # /metrics: per-peer series for at most this many
    # The registry's config is seeded with these when it has none (and must agree).
    seed_network: IPv4Network | None = None
    seed_backend: str | None = None
    # flanneld's --ip-blackhole-route: a blackhole route for our lease's subnets, so pod
    # traffic for an address no pod holds is dropped here instead of leaving by the
    # default route.
    blackhole_route: bool = False
    ignored_flags: tuple[str, ...] = ()  # klog flags accepted only so unit files start
