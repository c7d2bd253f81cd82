"""The interface every backend implements (flannel's backend/<name> split).

The node owns the registry, the lease and the peer table; a backend owns the datapath:
what it publishes in our lease, the MTU it leaves for pods, the devices and sockets it
needs, and what it does when peers come and go. The node asks this interface what it
needs to know (does the datapath run in this process, which kernel link counts its
traffic), never a backend's concrete type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from control.config import NetworkConfig
from control.lease import Lease
from control.peer_table import PeerTable
from overlay.dataplane.counters import Counters
from overlay.dataplane.udp import UdpDataplane
from overlay.dataplane.workers import Workers
from overlay.impair.rules import Rules
from overlay.kernel.reconcile import KernelState
from overlay.observe.log import LogOptions


class BackendError(Exception):
    """This backend cannot run with this config or interface; the message is the one line."""


@dataclass(frozen=True)
class Underlay:
    """The interface for inter-node traffic (flannel's ExternalInterface)."""

    iface: str
    address: IPv4Address  # where our socket binds; 0.0.0.0: the interface has none (IPv6 only)
    public_ip: IPv4Address  # what peers send to (differs behind NAT)
    mtu: int
    # The interface's IPv6 address (flanneld's rule: its first global unicast one, else
    # its first link-local one) and the one peers send to (--public-ipv6); None: none.
    address6: IPv6Address | None = None
    public_ipv6: IPv6Address | None = None

    @property
    def name(self) -> str:
        """How logs name this node: its public IP, or its public IPv6 address when the
        interface has no IPv4 one (an IPv6-only underlay)."""
        if self.public_ip.is_unspecified and self.public_ipv6 is not None:
            return str(self.public_ipv6)
        return str(self.public_ip)


@dataclass(frozen=True)
class DatapathOptions:
    """How the operator wants the datapath run (``overlay run``'s datapath flags)."""

    tun_name: str = "flannel0"
    vxlan_datapath: str = "userspace"  # vxlan only: userspace, kernel or auto
    offload: bool = True  # UDP GSO/GRO and the TUN's offloads, where the kernel has them
    tun_tso: bool = True  # TCP super-packets from the TUN, cut into segments here
    workers: int = 1  # forwarding processes, one per queue of a multi-queue TUN
    impairment: Rules = field(default_factory=Rules)  # --impair: netem's rules at start
    busy_poll_us: int = 0  # after a wake-up, keep polling TUN and socket this long (0: off)


@dataclass
class Context:
    """What the node hands every backend."""

    options: DatapathOptions
    underlay: Underlay
    config: NetworkConfig
    counters: Counters
    peers: PeerTable
    log: Any  # a bound structlog logger
    log_options: LogOptions = field(default_factory=LogOptions)  # for its worker processes


@dataclass(frozen=True)
class KernelLink:
    """A kernel link whose statistics count a backend's traffic."""

    name: str
    overlay_only: bool  # False: the underlay's own link, all of its traffic (host-gw)


class Backend:
    """Defaults for a backend with no devices of its own; subclasses override."""

    # BackendType published in our lease and required of peers' leases.
    lease_type = ""
    name = "base"
    # True: packets cross this process (a TUN and a socket), so it counts and traces them.
    in_process = False
    # Why this backend cannot carry IPv6 with EnableIPv6 (one line), or "" when it can.
    ipv6_refusal = "this backend carries IPv4 only"

    def __init__(self, ctx: Context) -> None:
        if ctx.config.ipv6 is not None and self.ipv6_refusal:
            raise BackendError(f"EnableIPv6: {self.ipv6_refusal}")
        self.ctx = ctx
        # The kernel objects it programs, kept true (overlay.kernel.reconcile); None: none.
        self.kernel: KernelState | None = None
        # In-process datapaths: the dataplane of this process and its --workers processes.
        self.dataplane: UdpDataplane | None = None
        self.workers: Workers | None = None

    def lease_data(self) -> dict[str, Any] | None:
        """BackendData published in our lease (None: the field is omitted)."""
        return None

    def lease_v6_data(self) -> dict[str, Any] | None:
        """BackendV6Data published in a dual-stack lease (None: the field is omitted)."""
        return None

    @property
    def mtu(self) -> int:
        """The MTU pods get (FLANNEL_MTU)."""
        return self.mtu_for(self.ctx.underlay)

    def mtu_for(self, underlay: Underlay) -> int:
        """The MTU pods get over ``underlay`` (host-gw: the underlay's own)."""
        return underlay.mtu

    async def follow_underlay(self, underlay: Underlay) -> None:
        """The underlay's MTU changed (``underlay`` is the new one): what depends on it
        follows, the MTU of the devices and of the datapath this backend runs."""
        self.ctx.underlay = underlay

    def config_warnings(self) -> list[dict[str, Any]]:
        """What in the network config this backend cannot honour (one log line each)."""
        return []

    def kernel_link(self) -> KernelLink | None:
        """The link whose kernel statistics count this backend's traffic (None: it counts
        its own, in this process)."""
        return None

    def kernel_link6(self) -> KernelLink | None:
        """The link whose kernel statistics count this backend's IPv6 traffic when it is
        not ``kernel_link``'s (kernel vxlan: flannel-v6.<VNI>); None: none of its own."""
        return None

    def prefix_for(self, lease: Lease) -> bytes:
        """Per-peer encapsulation prefix the peer table precomputes (none by default)."""
        return b""

    def prefix6_for(self, lease: Lease) -> bytes:
        """The same for a dual-stack peer's IPv6 half (userspace vxlan with EnableIPv6)."""
        return b""

    def accepts(self, lease: Lease) -> bool:
        return lease.backend_type == self.lease_type

    def prepare(self) -> None:
        """Create what can fail for lack of permission, before any lease is taken."""

    async def start(self, lease: Lease) -> None:
        """Bring the datapath up for our ``lease``."""

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        """Peers were added (or changed) and removed; the peer table is already updated."""

    @property
    def impairment(self) -> Rules:
        """The impairment rules in force (overlay.impair)."""
        return Rules()

    def impair(self, rules: Rules) -> None:
        """Impair the datapath as ``rules`` say from now on; only a datapath in this
        process can (the message says why not)."""
        raise BackendError(
            f"impairment needs a datapath in this process (the udp backend, or vxlan's "
            f"userspace datapath): this node's {self.name} datapath forwards in the kernel"
        )

    def status(self) -> dict[str, Any]:
        return {}

    async def stop(self) -> None:
        """Release sockets and file descriptors. Kernel routes are left, as flanneld does
        (the TUN goes with its file descriptor, and its routes with it)."""
