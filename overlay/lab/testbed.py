"""``overlay testbed``: nodes as network namespaces on underlay bridges (one per L2
segment, a router namespace between them), a daemon per node, and pods attached through
the CNI plugin the way a kubelet would. What is made comes from ``overlay.lab.plan``.

Everything a run creates carries its prefix, so ``down`` can find and remove it from the
names alone (plus the pid files), also after a crash or ``kill -9``, without touching any
other run: namespaces ``{P}-ul`` (the underlay switch), ``{P}-rt`` (the router),
``{P}-n{i}`` and ``{P}-n{i}-p{j}``, and the state directory (default
``/run/overlay-testbed/{P}``).

The underlay bridges live in their own namespace, not the root one: the root namespace
then routes nothing into or out of the testbed, the machine's own addresses can overlap
the underlay range (192.0.2.0/24 is this sandbox's LAN), and the root namespace's
netfilter (br_netfilter hooks bridged frames into it) never sees testbed traffic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path
from types import TracebackType
from typing import Any

from control.config import SUPPORTED_BACKENDS, config_json
from control.file_registry import FileRegistry
from control.subnet_env import SubnetEnvError, parse_subnet_env
from overlay.lab.errors import TestbedError
from overlay.lab.etcd import MAX_MEMBERS, EtcdCluster
from overlay.lab.events import EventLog
from overlay.lab.netns import (
    create_netns,
    create_netns_all,
    entered,
    ip_batch,
    list_netns,
    log_tail,
    netns_exists,
    netns_pids_all,
    pid_alive,
    pid_cmdline,
    remove_netns_all,
    sysctl_in,
    terminate,
)
from overlay.lab.plan import make_plan
from overlay.lab.progress import Progress
from overlay.lab.starter import ForkedDaemon, StartServer
from overlay.lab.topology import (
    DEFAULT_NETWORK,
    DEFAULT_SEGMENT,
    DEFAULT_UNDERLAY,
    IP_FAMILIES,
    REGISTRIES,
    NodeSpec,
    Segment,
    Topology,
    family_problem,
    network_problem,
    room,
)
from tun.rtnl import IPRoute, NetlinkError

STATE_ROOT = Path("/run/overlay-testbed")
# An IPv6 underlay address as the testbed adds it: a /64, usable at once (IFA_F_NODAD).
NODAD_64: dict[str, int] = {"prefixlen": 64, "flags": 0x02}
DEFAULT_PREFIX = "ovl"
CONFIG_KEY = "/coreos.com/network/config"
DAEMON_START_TIMEOUT = 15.0
DAEMON_STOP_TIMEOUT = 5.0
CNI_TIMEOUT = 60.0
CNI_PARALLEL = 8  # CNI plugin runs at once (each waits on its own exec and netlink)
CNI_VERSION = "1.0.0"
CNI_PATH = "/usr/lib/cni"
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: overlay/lab/ is two below
# How daemons start: "fork" (the default: a start server that imported the daemon once
# forks each one, overlay.lab.starter; a 200-node bed pays the imports once) or "exec"
# (`ip netns exec NS python -m overlay run ...`, a fresh interpreter each).
DAEMON_STARTS = ("fork", "exec")

DaemonProcess = subprocess.Popen[bytes] | ForkedDaemon

_PREFIX = re.compile(r"^[a-z0-9]{1,8}$")
_MEMBER = re.compile(r"^n(\d+)(?:-p(\d+))?$")


def validate_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise TestbedError(
            f"testbed prefix {prefix!r} is invalid: use 1-8 characters a-z, 0-9 "
            "(it starts every namespace and interface name of the run)"
        )
    return prefix


def _parse_cidr(text: str, what: str) -> IPv4Network:
    try:
        return IPv4Network(str(text), strict=False)
    except ValueError:
        raise TestbedError(f"{what} {text!r} is not an IPv4 CIDR (e.g. 192.0.2.0/24)") from None


def _pointer(prefix: str) -> Path:
    """Where ``up`` records a non-default state dir, so ``down --prefix`` still finds it."""
    return STATE_ROOT / f"{prefix}.state-dir"


def _state_dir_for(prefix: str, state_dir: Path | str | None) -> Path:
    """The given dir, else the one ``up`` recorded for this prefix, else the default."""
    if state_dir:
        return Path(state_dir).resolve()
    try:
        recorded = Path(_pointer(prefix).read_text().strip())
    except OSError:
        recorded = None
    if recorded and (recorded / "testbed.json").exists():
        return recorded
    return STATE_ROOT / prefix


class Testbed:
    """One testbed run, addressed by its prefix. Use as a context manager to always tear
    down: ``with Testbed("demo") as bed: bed.up(); ...``. The arguments are the quick
    form (one segment, one backend); ``Testbed.from_topology`` builds a bed described in
    a file (``overlay.lab.topology``)."""

    __test__ = False

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        nodes: int = 3,
        pods_per_node: int = 2,
        backend: str = "udp",
        registry: str = "etcd",
        underlay: str = str(DEFAULT_UNDERLAY),
        network: str = str(DEFAULT_NETWORK),
        state_dir: Path | str | None = None,
        kernel_nodes: tuple[int, ...] = (),
        daemon_args: tuple[str, ...] = (),
        direct_routing: bool = False,
        etcd_members: int = 1,
        ip_family: str = "ipv4",
    ) -> None:
        validate_prefix(prefix)
        if ip_family not in IP_FAMILIES:
            raise TestbedError(f"ip family {ip_family!r} is not one of {', '.join(IP_FAMILIES)}")
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise TestbedError(f"nodes must be a positive integer, not {nodes!r}")
        if isinstance(pods_per_node, bool) or not isinstance(pods_per_node, int):
            raise TestbedError(f"pods per node must be an integer, not {pods_per_node!r}")
        if pods_per_node < 0:
            raise TestbedError(f"pods per node must be 0 or more, not {pods_per_node}")
        if backend not in SUPPORTED_BACKENDS:
            raise TestbedError(
                f"backend {backend!r} is not supported (use {', '.join(SUPPORTED_BACKENDS)})"
            )
        if registry not in REGISTRIES:
            raise TestbedError(f"registry {registry!r} is unknown (use etcd or file)")
        if isinstance(etcd_members, bool) or not isinstance(etcd_members, int):
            raise TestbedError(f"etcd members must be an integer, not {etcd_members!r}")
        if not 1 <= etcd_members <= MAX_MEMBERS:
            raise TestbedError(f"etcd members must be 1 to {MAX_MEMBERS}, not {etcd_members}")
        if etcd_members > 1 and registry != "etcd":
            raise TestbedError("--etcd-members needs --registry etcd")
        bad = [i for i in kernel_nodes if not 1 <= i <= nodes]
        if bad:
            raise TestbedError(f"kernel nodes {bad} are not among nodes 1..{nodes}")
        if direct_routing and backend != "vxlan":
            raise TestbedError("direct routing is a vxlan option: use --backend vxlan")
        if kernel_nodes and backend != "vxlan":
            raise TestbedError("kernel nodes need --backend vxlan (they use flannel.<VNI>)")
        kernel = set(kernel_nodes)
        topology = Topology(
            segments=(Segment(DEFAULT_SEGMENT, _parse_cidr(underlay, "underlay")),),
            nodes=tuple(
                NodeSpec(DEFAULT_SEGMENT, "kernel-vxlan" if i in kernel else backend, pods_per_node)
                for i in range(1, nodes + 1)
            ),
            network=_parse_cidr(network, "network"),
            registry=registry,
            etcd_members=etcd_members,
            direct_routing=direct_routing,
            ip_family=ip_family,
        )
        problem = family_problem(ip_family, topology.network6, topology.nodes)
        if problem:
            raise TestbedError(f"--{problem[0]}: {problem[1]}")
        self._adopt(prefix, topology, state_dir, daemon_args)

    @classmethod
    def from_topology(
        cls,
        topology: Topology,
        prefix: str | None = None,
        state_dir: Path | str | None = None,
        daemon_args: tuple[str, ...] = (),
    ) -> Testbed:
        """A bed described in a file; ``prefix`` defaults to the file's ``name``."""
        bed = cls.__new__(cls)
        if prefix is None:
            prefix = topology.name or DEFAULT_PREFIX
        bed._adopt(prefix, topology, state_dir, daemon_args)
        return bed

    def _adopt(
        self,
        prefix: str,
        topology: Topology,
        state_dir: Path | str | None,
        daemon_args: tuple[str, ...],
    ) -> None:
        self.prefix = validate_prefix(prefix)
        if topology.registry == "etcd" and shutil.which("etcd") is None:
            raise TestbedError("registry etcd needs the etcd binary: `make setup` installs it")
        self.topology = topology
        self.plan = make_plan(topology, self.prefix)
        self._check_addressing()
        # Extra `overlay run` flags for every daemon (e.g. --no-offload for a benchmark).
        self.daemon_args = tuple(daemon_args)
        self.state_dir = _state_dir_for(self.prefix, state_dir)
        self._procs: dict[int, DaemonProcess] = {}
        self.daemon_start = DAEMON_STARTS[0]
        self._starter: StartServer | None = None
        # What `up` and `down` are doing, for a terminal (the CLI sets one; silent here).
        self.progress = Progress.off()
        # Seconds each stage of the last up/down took (bench.bed_scale reports them).
        self.timings: dict[str, float] = {}

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - started, 2)

    # -- what the topology says -------------------------------------------------------

    @property
    def nodes(self) -> int:
        return len(self.topology.nodes)

    @property
    def backend(self) -> str:
        """The network's Backend.Type (udp, vxlan or host-gw)."""
        return self.topology.backend_type

    @property
    def registry(self) -> str:
        return self.topology.registry

    @property
    def etcd_members(self) -> int:
        return self.topology.etcd_members

    @property
    def direct_routing(self) -> bool:
        return self.topology.direct_routing

    @property
    def network(self) -> IPv4Network:
        return self.topology.network

    @property
    def underlay(self) -> IPv4Network:
        """The first segment (the only one of a quick-form bed)."""
        return self.topology.segments[0].cidr

    @property
    def kernel_nodes(self) -> tuple[int, ...]:
        """Nodes whose vxlan datapath is the kernel's vxlan device (the others: userspace)."""
        return tuple(n.number for n in self.plan.nodes if n.spec.backend == "kernel-vxlan")

    def pods_of(self, i: int) -> int:
        return self.plan.node(i).spec.pods

    def up_steps(self) -> int:
        """How many steps ``up`` reports to ``progress``."""
        router = 1 if self.plan.legs else 0
        return 2 + router + sum(3 + node.spec.pods for node in self.plan.nodes)

    def _check_addressing(self) -> None:
        """The quick form's flags against the room they leave (a file's own keys are
        checked, and named, by ``overlay.lab.topology``)."""
        for segment in self.topology.segments:
            here = sum(1 for n in self.topology.nodes if n.segment == segment.name)
            if here > room(self.topology, segment):
                kept = segment.cidr.num_addresses - 2 - room(self.topology, segment)
                raise TestbedError(
                    f"underlay {segment.cidr} has room for {room(self.topology, segment)} "
                    f"nodes ({kept} address(es) kept for the registry and router), not "
                    f"{here}: use a larger --underlay"
                )
            if segment.cidr.overlaps(self.network):
                raise TestbedError(
                    f"underlay {segment.cidr} overlaps the overlay network {self.network}: "
                    "they must be disjoint"
                )
        problem = network_problem(self.network, self.backend, self.nodes)
        if problem:
            raise TestbedError(f"network {self.network}: {problem}")

    # -- names and addresses ------------------------------------------------------------

    @property
    def underlay_ns(self) -> str:
        """The namespace holding the segments' bridges and the etcd registry host."""
        return self.plan.underlay_ns

    @property
    def router_ns(self) -> str:
        """The router between the segments (only with several segments)."""
        return self.plan.router_ns

    bridge = "br0"  # the first segment's bridge, inside underlay_ns

    def veth(self, i: int) -> str:
        """The switch-side end of node i's link, inside underlay_ns."""
        return f"n{i}"

    def node_ns(self, i: int) -> str:
        return self.plan.node_ns(i)

    def pod_ns(self, i: int, j: int) -> str:
        return self.plan.pod_ns(i, j)

    def node_ip(self, i: int) -> IPv4Address:
        return self.plan.node(i).address

    @property
    def cni_network_name(self) -> str:
        return f"overlay-{self.prefix}"

    def node_dir(self, i: int) -> Path:
        return self.state_dir / f"n{i}"

    def subnet_file(self, i: int) -> Path:
        return self.node_dir(i) / "subnet.env"

    def pid_file(self, i: int) -> Path:
        return self.state_dir / f"n{i}.pid"

    def log_file(self, i: int) -> Path:
        return self.state_dir / f"n{i}.log"

    @property
    def registry_file(self) -> Path:
        return self.state_dir / "registry.json"

    @property
    def events(self) -> EventLog:
        """The bed's event log: up, down, every fault and its undoing (JSON lines)."""
        return EventLog(self.state_dir / "events.jsonl")

    @property
    def etcd(self) -> EtcdCluster:
        """The run's etcd (its members are driven through it: start, stop, freeze...)."""
        return EtcdCluster(
            self.prefix,
            self.etcd_members,
            self.underlay_ns,
            # IPv6 only: etcd listens on the segment's IPv6 /64 (the nodes have no IPv4).
            self.topology.cidr6(self.plan.etcd_segment)
            if self.topology.ip_family == "ipv6"
            else self.plan.etcd_segment.cidr,
            self.state_dir,
        )

    def _node_re(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.prefix)}-n(\d+)$")

    def _pod_re(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.prefix)}-n(\d+)-p(\d+)$")

    def _our_netns(self) -> tuple[list[str], list[str]]:
        """(node namespaces, pod namespaces) of this prefix that exist now."""
        names = list_netns()
        return (
            [n for n in names if self._node_re().match(n)],
            [n for n in names if self._pod_re().match(n)],
        )

    def node_number(self, name: str) -> int:
        """The number of a node given as "n2" (or its full netns name)."""
        match = _MEMBER.match(name.removeprefix(f"{self.prefix}-"))
        if not match or match.group(2) is not None or not 1 <= int(match.group(1)) <= self.nodes:
            raise TestbedError(
                f"{name!r} is not a node of testbed {self.prefix} (n1..n{self.nodes})"
            )
        return int(match.group(1))

    def status_socket(self, i: int) -> Path:
        """The status socket of node ``i``'s daemon."""
        return self.node_dir(i) / "status.sock"

    def resolve(self, name: str) -> str:
        """The namespace of a node ("n1") or pod ("n1-p2"); the full netns name also works."""
        short = name.removeprefix(f"{self.prefix}-")
        if not _MEMBER.match(short):
            raise TestbedError(
                f"{name!r} is not a node (n1) or pod (n1-p2) name of testbed {self.prefix}"
            )
        ns = f"{self.prefix}-{short}"
        if not netns_exists(ns):
            raise TestbedError(
                f"{short} does not exist in testbed {self.prefix} (no netns {ns}); "
                f"see `overlay testbed status --prefix {self.prefix}`"
            )
        return ns

    # -- up -------------------------------------------------------------------------------

    def up(self) -> Testbed:
        """Build the whole run; on any failure (or Ctrl-C) everything made is removed."""
        self._refuse_leftovers()
        self.timings = {}
        try:
            self._write_state()
            self._build_underlay()
            with self._stage("registry"):
                self._seed_registry()
            self._start_daemons()
            self._ready_then_pods(self._numbers())
            self._impair_links()
            self.events.record("up", nodes=self.nodes, pods=self._pod_count())
        except BaseException:
            try:
                self.down()
            except TestbedError as cleanup:
                sys.stderr.write(f"overlay testbed: cleanup after failed up: {cleanup}\n")
            raise
        return self

    def _refuse_leftovers(self) -> None:
        nodes, pods = self._our_netns()
        found = nodes + pods + [ns for ns in list_netns() if ns == self.underlay_ns]
        if self.state_dir.is_dir() and any(self.state_dir.iterdir()):
            found.append(str(self.state_dir))
        if found:
            shown = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
            raise TestbedError(
                f"testbed {self.prefix} already exists ({shown}): run "
                f"`overlay testbed down --prefix {self.prefix}` first or pick another --prefix"
            )

    def _write_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.state_dir.resolve() != (STATE_ROOT / self.prefix).resolve():
            STATE_ROOT.mkdir(parents=True, exist_ok=True)
            _pointer(self.prefix).write_text(f"{self.state_dir.resolve()}\n")
        else:
            _pointer(self.prefix).unlink(missing_ok=True)  # a stale one from a lost run
        params = {
            "prefix": self.prefix,
            "nodes": self.nodes,
            "backend": self.backend,
            "registry": self.registry,
            "network": str(self.network) if self.topology.ipv4 else None,
            "ip_family": self.topology.ip_family,
            "network6": str(self.topology.network6) if self.topology.ipv6 else None,
            "state_dir": str(self.state_dir),
            "daemon_args": list(self.daemon_args),
            "topology": self.topology.to_json(),
        }
        (self.state_dir / "testbed.json").write_text(json.dumps(params, indent=2) + "\n")

    def _build_underlay(self) -> None:
        """Every namespace of the bed (switch, nodes, pods) in one ``ip -batch``, the
        bridges in another, the router if there are several segments, then the nodes'
        links: a stage costs a process, not a process per node."""
        self.progress.step("underlay bridge")
        with self._stage("namespaces"), _as_testbed_error("creating the namespaces"):
            create_netns_all([self.underlay_ns, *self._member_namespaces(self._numbers())])
        with self._stage("bridges and router"), _as_testbed_error("making the bridges"):
            ip_batch(
                [
                    command
                    for name, _ in self.plan.bridges
                    for command in (f"link add {name} type bridge", f"link set {name} up")
                ],
                netns=self.underlay_ns,
            )
            if self.plan.legs:
                with IPRoute(netns=self.underlay_ns, flags=0) as ipr:
                    bridges = {
                        name: ipr.link_lookup(ifname=name)[0] for name, _ in self.plan.bridges
                    }
                    self._build_router(ipr, bridges)
        self._build_nodes(self._numbers())

    def _numbers(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    def _member_namespaces(self, numbers: list[int]) -> list[str]:
        """The namespaces of these nodes and of their pods."""
        return [
            ns
            for i in numbers
            for ns in (self.node_ns(i), *(self.pod_ns(i, j) for j in range(1, self.pods_of(i) + 1)))
        ]

    def _build_router(self, ipr: IPRoute, bridges: dict[str, int]) -> None:
        """The router namespace: a leg on every segment's bridge, forwarding between them
        (``ipr`` is in the underlay ns)."""
        self.progress.step("router between the segments")
        create_netns(self.router_ns)
        for leg in self.plan.legs:
            ipr.link(
                "add",
                ifname=leg.outside,
                kind="veth",
                peer={"ifname": leg.inside, "net_ns_fd": self.router_ns},
            )
            (outside,) = ipr.link_lookup(ifname=leg.outside)
            ipr.link("set", index=outside, master=bridges[leg.bridge], state="up")
        with IPRoute(netns=self.router_ns, flags=0) as router:
            for leg in self.plan.legs:
                (inside,) = router.link_lookup(ifname=leg.inside)
                self._add_addresses(router, inside, leg.segment, leg.address, leg.address6)
                router.link("set", index=inside, state="up")
        sysctl_in(self.router_ns, "net.ipv4.ip_forward", "1")
        if self.topology.ipv6:
            sysctl_in(self.router_ns, "net.ipv6.conf.all.forwarding", "1")

    def _add_addresses(
        self,
        ipr: IPRoute,
        index: int,
        segment: Segment,
        address: IPv4Address,
        address6: IPv6Address | None,
    ) -> None:
        """An underlay interface's addresses on ``segment``: the IPv4 one (unless the bed
        is IPv6 only) and the IPv6 one (an IPv6 or dual-stack bed)."""
        if self.topology.ipv4:
            ipr.addr("add", index=index, address=str(address), prefixlen=segment.cidr.prefixlen)
        if address6 is not None:
            ipr.addr("add", index=index, address=str(address6), **NODAD_64)

    def _build_nodes(self, numbers: list[int]) -> None:
        """Each node's eth0, a veth whose other end is on its segment's bridge (one
        ``ip -batch`` in the underlay ns for all of them), then its address, routes and
        forwarding, set from inside the node."""
        with self._stage("node links"), _as_testbed_error("linking the nodes"):
            commands = []
            for i in numbers:
                veth, ns = self.veth(i), self.node_ns(i)
                commands.append(f"link add {veth} type veth peer name eth0 netns {ns}")
                commands.append(f"link set {veth} master {self.plan.node(i).bridge} up")
            ip_batch(commands, netns=self.underlay_ns)
        with self._stage("node addresses"), _as_testbed_error("addressing the nodes"):
            for i in numbers:
                self._configure_node(i)

    def _configure_node(self, i: int) -> None:
        """Node i's eth0 address, a route to each other segment via the router, and
        forwarding on (/proc/sys/net is the namespace of the thread that opens it)."""
        self.progress.step(f"n{i}: namespace and eth0")
        plan = self.plan.node(i)
        with entered(self.node_ns(i)), IPRoute() as node:
            (eth0,) = node.link_lookup(ifname="eth0")
            self._add_addresses(node, eth0, plan.segment, plan.address, plan.address6)
            node.link("set", index=eth0, state="up")
            for cidr, via in plan.routes if self.topology.ipv4 else ():
                node.route("add", dst=str(cidr), gateway=str(via))
            for cidr6, via6 in plan.routes6:
                node.route("add", dst=str(cidr6), gateway=str(via6))
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            if self.topology.ipv6:
                Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("1\n")
        # Kernel-datapath nodes keep eth0's default offloads (tx checksumming on, as a
        # veth or virtio NIC has): their inner checksums arrive partial, as in a real
        # cluster, and the userspace nodes must cope (encap.gso.drop_reason).

    def _seed_registry(self) -> None:
        self.progress.step(f"registry ({self.registry})")
        t = self.topology
        config = config_json(
            t.network if t.ipv4 else None,
            self.backend,
            self.direct_routing,
            t.network6 if t.ipv6 else None,
        )
        if self.registry == "file":
            FileRegistry(self.registry_file).put_sync(CONFIG_KEY, config.encode(), None)
            return
        with IPRoute(netns=self.underlay_ns, flags=0) as ipr:
            (bridge,) = ipr.link_lookup(ifname=self.plan.etcd_bridge)
            prefix = {"prefixlen": self.etcd.underlay.prefixlen}
            if t.ip_family == "ipv6":
                prefix = NODAD_64
            for m in range(1, self.etcd_members + 1):
                ipr.addr("add", index=bridge, address=str(self.etcd.member_ip(m)), **prefix)
            for cidr, via in self.plan.etcd_routes() if t.ipv4 else ():  # back to the nodes
                ipr.route("add", dst=str(cidr), gateway=str(via))
            for cidr6, via6 in self.plan.etcd_routes6() if t.ip_family == "ipv6" else ():
                ipr.route("add", dst=str(cidr6), gateway=str(via6))
        self.etcd.start()
        self.etcd.etcdctl("put", CONFIG_KEY, config)

    def child_env(self) -> dict[str, str]:
        """Our environment, with this checkout importable even if it is not installed."""
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{PROJECT_ROOT}{os.pathsep}{path}" if path else str(PROJECT_ROOT)
        return env

    def daemon_argv(self, i: int) -> list[str]:
        node_dir = self.node_dir(i)
        return [
            "ip",
            "netns",
            "exec",
            self.node_ns(i),
            sys.executable,
            "-m",
            "overlay",
            "run",
            *(
                ["--registry-file", str(self.registry_file)]
                if self.registry == "file"
                else ["--etcd-endpoints", ",".join(self.etcd.endpoints)]
            ),
            # The config the registry was seeded with; IPv6 only, it has no Network.
            *(["--network", str(self.network)] if self.topology.ipv4 else []),
            "--backend",
            self.backend,
            "--iface",
            "eth0",
            *(["--public-ip", str(self.node_ip(i))] if self.topology.ipv4 else []),
            *(["--public-ipv6", str(address6)] if (address6 := self.plan.node(i).address6) else []),
            "--subnet-file",
            str(node_dir / "subnet.env"),
            "--status-socket",
            str(self.status_socket(i)),
            "--log-format",
            "json",
            *(["--kernel-vxlan"] if i in self.kernel_nodes else []),
            *(["--impair", impair] if (impair := self.plan.node(i).spec.impair) else []),
            *self.daemon_args,
        ]

    def datapath(self, i: int) -> str:
        return self.plan.node(i).datapath

    def _start_daemons(self) -> None:
        """Every daemon at once; ``_ready_then_pods`` waits for them all together."""
        with self._stage("daemons started"):
            self.start_daemons(self._numbers())

    def start_daemon(self, i: int) -> DaemonProcess:
        """Start node i's daemon (again, after a test stopped it): ``status`` and
        ``down`` know it by its pid file."""
        return self.start_daemons([i])[0]

    def start_daemons(self, numbers: list[int]) -> list[DaemonProcess]:
        """Start these nodes' daemons. Forked by the start server, all in one request,
        when ``daemon_start`` is fork and ``daemon_argv`` is ``ip netns exec NS <python>
        -m overlay ARGS`` (the same CLI entry with the same ARGS); else run each."""
        argvs = {}
        for i in numbers:
            if (previous := self._procs.get(i)) is not None:
                previous.poll()  # reaped if it has exited
            self.node_dir(i).mkdir(parents=True, exist_ok=True)
            argvs[i] = self.daemon_argv(i)
        forked = {
            i: args
            for i, argv in argvs.items()
            if self.daemon_start == "fork" and (args := _overlay_args(argv)) is not None
        }
        if forked:
            starts = [(ns, args, self.log_file(i)) for i, (ns, args) in forked.items()]
            self._procs.update(zip(forked, self._start_server().start(starts), strict=True))
        for i in numbers:
            if i not in forked:
                with open(self.log_file(i), "ab") as log:
                    self._procs[i] = subprocess.Popen(
                        argvs[i],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        env=self.child_env(),
                    )
            self.pid_file(i).write_text(f"{self._procs[i].pid}\n")
            self.progress.step(f"n{i}: daemon started")
        return [self._procs[i] for i in numbers]

    def _start_server(self) -> StartServer:
        """The bed's start server, started at the first daemon; ``down`` ends it. Its
        command line names the state dir, which ``_daemon_pid`` checks."""
        if self._starter is None:
            self._starter = StartServer(
                [sys.executable, "-m", "overlay.start_server", str(self.state_dir)]
                + (["--etcd"] if self.registry == "etcd" else []),
                self.child_env(),
                self.state_dir / "start-server.log",
            )
        return self._starter

    def start_server_pid(self) -> int | None:
        """The running start server's pid (None: none runs), for a bed's memory figures."""
        return None if self._starter is None else self._starter.proc.pid

    def stop_daemon(self, i: int) -> int | None:
        """SIGTERM node i's daemon (started by this object) and wait for it; its exit
        status (None: it was not running). ``start_daemon`` brings it back."""
        proc = self._procs.get(i)
        if proc is None or proc.poll() is not None:
            return None
        proc.terminate()
        try:
            return proc.wait(timeout=DAEMON_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _wait_daemons(
        self, nodes: list[int] | None = None, on_ready: Callable[[int], None] | None = None
    ) -> None:
        """Until each daemon of ``nodes`` (default all) has written its subnet.env, calling
        ``on_ready`` for each as it does; the first that exits or stays silent for
        DAEMON_START_TIMEOUT after the last one came up is an error."""
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        waiting = set(nodes or self._numbers())
        while waiting:
            for i in sorted(waiting):
                if self.subnet_file(i).exists():
                    waiting.discard(i)
                    self.progress.step(f"n{i}: daemon up")
                    # From the last one up: 200 daemons starting at once share the CPU.
                    deadline = time.monotonic() + DAEMON_START_TIMEOUT
                    if on_ready is not None:
                        on_ready(i)
                    continue
                code = self._procs[i].poll()
                if code is not None:
                    raise TestbedError(
                        f"daemon of n{i} exited with code {code} before writing "
                        f"{self.subnet_file(i)}: {log_tail(self.log_file(i))}"
                    )
            if not waiting:
                break
            if time.monotonic() > deadline:
                i = min(waiting)
                raise TestbedError(
                    f"daemon of n{i} wrote no {self.subnet_file(i)} within "
                    f"{DAEMON_START_TIMEOUT:.0f} s: {log_tail(self.log_file(i))}"
                )
            time.sleep(0.05)

    def _ready_then_pods(self, numbers: list[int]) -> None:
        """Wait for these nodes' daemons all together, and start the CNI ADDs of a node's
        pods as soon as its daemon holds its lease (CNI_PARALLEL plugin runs at a time):
        the first nodes' pods come up while the last daemons still start. The pods'
        namespaces exist already (``_build_underlay``)."""
        for i in numbers:
            (self.node_dir(i) / "pods").mkdir(exist_ok=True)
        pool = ThreadPoolExecutor(CNI_PARALLEL)
        adds: list[Future[None]] = []

        def add_pods_of(i: int) -> None:
            for add in adds:
                if add.done() and add.exception() is not None:
                    add.result()  # a failed ADD stops the wait (up rolls back)
            adds.extend(pool.submit(self._add_pod, i, j) for j in range(1, self.pods_of(i) + 1))

        try:
            with self._stage("daemons up"):
                self._wait_daemons(numbers, on_ready=add_pods_of)
            with self._stage("pods after the last daemon"):
                for add in adds:
                    add.result()  # the first failure raises here
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def cni_config(self, i: int) -> dict[str, Any]:
        node_dir = self.node_dir(i)
        return {
            "cniVersion": CNI_VERSION,
            "name": self.cni_network_name,
            "type": "overlay-cni",
            "subnetFile": str(node_dir / "subnet.env"),
            "dataDir": str(node_dir / "cni"),
            "ipamDataDir": str(node_dir / "ipam"),
            "delegate": {"ipMasq": False},
        }

    def _cni(self, command: str, i: int, container: str) -> subprocess.CompletedProcess[str]:
        """Run the plugin inside node ``i``'s namespace, as a kubelet on that node would."""
        env = self.child_env()
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=container,
            CNI_IFNAME="eth0",
            CNI_PATH=CNI_PATH,
        )
        if netns_exists(container):
            env["CNI_NETNS"] = f"/run/netns/{container}"
        argv = ["ip", "netns", "exec", self.node_ns(i), sys.executable, "-m", "overlay.cni"]
        return subprocess.run(
            argv,
            input=json.dumps(self.cni_config(i)),
            env=env,
            capture_output=True,
            text=True,
            timeout=CNI_TIMEOUT,
            check=False,
        )

    def _add_pod(self, i: int, j: int) -> None:
        proc = self._cni("ADD", i, self.pod_ns(i, j))
        try:
            result = json.loads(proc.stdout)
        except ValueError:
            result = None
        if proc.returncode != 0 or not isinstance(result, dict):
            reason = result.get("msg", proc.stdout) if isinstance(result, dict) else proc.stdout
            detail = str(reason).strip() or proc.stderr.strip()[-300:]
            raise TestbedError(f"CNI ADD of pod n{i}-p{j} failed: {detail}")
        pod_file = self.node_dir(i) / "pods" / f"n{i}-p{j}.json"
        pod_file.write_text(json.dumps(result, indent=2) + "\n")
        self.progress.step(f"pod n{i}-p{j}: CNI ADD")

    def add_node(self) -> int:
        """Join one more node to the running testbed (on the first segment, with the
        network's backend and node 1's pod count: namespace, daemon, pods); returns its
        number. ``down`` removes it with the rest."""
        first = self.topology.nodes[0]
        spec = NodeSpec(self.topology.segments[0].name, self.backend, first.pods)
        grown = replace(self.topology, nodes=(*self.topology.nodes, spec))
        before = (self.topology, self.plan)
        self.topology, self.plan = grown, make_plan(grown, self.prefix)
        try:
            self._check_addressing()
        except TestbedError:
            self.topology, self.plan = before
            raise
        i = self.nodes
        self._write_state()  # records the new node, so status/load/down see it
        with _as_testbed_error(f"creating n{i}'s namespaces"):
            create_netns_all(self._member_namespaces([i]))
        self._build_nodes([i])
        self.start_daemon(i)
        self._ready_then_pods([i])
        return i

    def _impair_links(self) -> None:
        """Each link's impairment, at both ends, toward the other end's lease (known only
        now): through `overlay impair` on the node's status socket."""
        for link in self.topology.links:
            for here, there in (link.ends, link.ends[::-1]):
                self.progress.step(f"n{here}: impair toward n{there}", advance=False)
                self.impair(here, link.impair, peer=there)

    def impair(self, i: int, words: str | None, peer: int | None = None) -> str:
        """Impair what node i's daemon sends (to every peer, or to node ``peer``) with
        netem's words; None clears it. Returns what `overlay impair` printed."""
        argv = [sys.executable, "-m", "overlay", "impair"]
        argv += ["--status-socket", str(self.status_socket(i))]
        if peer is not None:
            argv += ["--peer", self.subnet_of(peer)]
        argv += ["--clear"] if words is None else words.split()
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=self.child_env(), timeout=30, check=False
        )
        if proc.returncode != 0:
            reason = (proc.stderr or proc.stdout).strip().splitlines()
            raise TestbedError(
                f"impairing n{i}{f' toward n{peer}' if peer else ''}: "
                f"{reason[-1] if reason else f'exit {proc.returncode}'}"
            )
        return proc.stdout

    def subnet_of(self, i: int) -> str:
        """Node i's lease, from its subnet.env."""
        subnets = self._subnets(i)
        if isinstance(subnets, str):
            raise TestbedError(f"n{i} holds no lease yet ({self.subnet_file(i)}: {subnets})")
        return subnets[0]  # IPv6 only: the IPv6 subnet

    def _subnets(self, i: int) -> list[str] | str:
        """Node i's lease, each family's subnet (IPv4 first), from its subnet.env; or why
        it cannot be read."""
        try:
            env = parse_subnet_env(self.subnet_file(i).read_text())
        except (OSError, SubnetEnvError) as e:
            return str(e)
        return [str(s.network) for s in (env.subnet, env.ipv6_subnet) if s is not None]

    def _pod_count(self) -> int:
        return sum(node.spec.pods for node in self.plan.nodes)

    # -- status / exec ----------------------------------------------------------------------

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX, state_dir: Path | str | None = None) -> Testbed:
        """The testbed ``up`` recorded under this prefix (for status/exec from the CLI)."""
        validate_prefix(prefix)
        path = _state_dir_for(prefix, state_dir) / "testbed.json"
        try:
            params = json.loads(path.read_text())
        except FileNotFoundError:
            raise TestbedError(
                f"testbed {prefix} is not up (no {path}): "
                f"`overlay testbed up --prefix {prefix}` builds it"
            ) from None
        except (OSError, ValueError) as e:
            raise TestbedError(f"{path} is unreadable: {e}") from None
        try:
            topology = Topology.from_json(params["topology"])
            daemon_args = tuple(str(a) for a in params.get("daemon_args", []))
        except (KeyError, TypeError, ValueError) as e:
            raise TestbedError(
                f"{path} holds no topology ({e!r}): made by an older version? "
                f"`overlay testbed down --prefix {prefix}` still removes it"
            ) from None
        return cls.from_topology(topology, prefix, path.parent, daemon_args)

    def _daemon_pid(self, i: int) -> int | None:
        """The pid in n{i}.pid if that process is alive and really our daemon."""
        try:
            pid = int(self.pid_file(i).read_text().strip())
        except (OSError, ValueError):
            return None
        if i in self._procs and self._procs[i].pid == pid and self._procs[i].poll() is not None:
            return None
        if not pid_alive(pid):
            return None
        cmdline = " ".join(pid_cmdline(pid))
        if "overlay" not in cmdline or str(self.state_dir) not in cmdline:
            return None  # the pid was reused by something else: never signal it
        return pid

    def status(self) -> dict[str, Any]:
        nodes: list[dict[str, Any]] = []
        pods: list[dict[str, Any]] = []
        for node in self.plan.nodes:
            i = node.number
            found = self._subnets(i)
            subnets = found if isinstance(found, list) else []
            subnet = subnets[0] if subnets else None
            pid = self._daemon_pid(i)
            nodes.append(
                {
                    "name": node.name,
                    "netns": self.node_ns(i),
                    "segment": node.segment.name,
                    "underlay_ip": str(node.address) if self.topology.ipv4 else None,
                    "underlay_ip6": str(node.address6) if node.address6 else None,
                    "subnet": subnet,
                    "subnets": subnets,
                    "backend": node.datapath,
                    "impair": node.spec.impair,
                    "pid": pid,
                    "running": pid is not None,
                }
            )
            for j in range(1, node.spec.pods + 1):
                pods.append(
                    {
                        "name": f"n{i}-p{j}",
                        "netns": self.pod_ns(i, j),
                        "node": node.name,
                        "ip": self._pod_address(i, j),
                        "ips": self._pod_addresses(i, j),
                    }
                )
        bridges = ", ".join(name for name, _ in self.plan.bridges)
        return {
            "prefix": self.prefix,
            "source": self.topology.source,
            "backend": self.backend,
            "direct_routing": self.direct_routing,
            "registry": self.registry,
            "etcd_endpoints": self.etcd.endpoints if self.registry == "etcd" else [],
            "underlay": " ".join(
                str(c)
                for c, on in (
                    (self.underlay, self.topology.ipv4),
                    (self.topology.cidr6(self.topology.segments[0]), self.topology.ipv6),
                )
                if on
            ),
            "bridge": f"{bridges} in netns {self.underlay_ns}",
            "segments": [
                {
                    "name": segment.name,
                    "cidr": str(segment.cidr),
                    "cidr6": str(self.topology.cidr6(segment)) if self.topology.ipv6 else None,
                    "bridge": bridge,
                }
                for bridge, segment in self.plan.bridges
            ],
            "router": self.router_ns if self.plan.legs else None,
            "links": [
                {"between": [f"n{a}", f"n{b}"], "impair": link.impair}
                for link in self.topology.links
                for a, b in [link.ends]
            ],
            "network": str(self.network) if self.topology.ipv4 else None,
            "ip_family": self.topology.ip_family,
            "network6": str(self.topology.network6) if self.topology.ipv6 else None,
            "state_dir": str(self.state_dir),
            "nodes": nodes,
            "pods": pods,
        }

    def _pod_addresses(self, i: int, j: int) -> list[str]:
        """Every address the CNI result gave the pod (a dual-stack pod: IPv4, then IPv6)."""
        try:
            result = json.loads((self.node_dir(i) / "pods" / f"n{i}-p{j}.json").read_text())
            return [str(ip["address"]).split("/")[0] for ip in result["ips"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _pod_address(self, i: int, j: int, version: int | None = None) -> str | None:
        """The pod's first address (of IP ``version``, when given)."""
        addresses = self._pod_addresses(i, j)
        if version is not None:
            addresses = [a for a in addresses if (":" in a) == (version == 6)]
        return addresses[0] if addresses else None

    def pod_ip(self, name: str, version: int | None = None) -> str:
        """Pod ``name``'s address: its first, or the one of IP ``version`` (4 or 6)."""
        match = _MEMBER.match(name.removeprefix(f"{self.prefix}-"))
        if not match or match.group(2) is None:
            raise TestbedError(f"{name!r} is not a pod name (e.g. n1-p2)")
        address = self._pod_address(int(match.group(1)), int(match.group(2)), version)
        if address is None:
            family = f"IPv{version} address" if version else "address"
            raise TestbedError(f"pod {name} of testbed {self.prefix} has no {family} (is it up?)")
        return address

    def exec(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside node/pod ``name``'s namespace (subprocess.run semantics)."""
        return subprocess.run(["ip", "netns", "exec", self.resolve(name), *argv], **kwargs)

    def popen(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside node/pod ``name``'s namespace; ``down`` kills it if still up."""
        return subprocess.Popen(["ip", "netns", "exec", self.resolve(name), *argv], **kwargs)

    # -- down -------------------------------------------------------------------------------

    def down(self) -> dict[str, list[str]]:
        """Remove everything of this prefix that exists; safe to repeat and after a crash.

        Returns what was removed. Raises TestbedError only if something could not be
        removed, after trying everything else.
        """
        removed: dict[str, list[str]] = {"pods": [], "processes": [], "netns": []}
        self.timings = {}
        node_names, pod_names = self._our_netns()
        # The router, then the underlay namespace last (its veths and bridges go with it).
        node_names += [ns for ns in (self.router_ns, self.underlay_ns) if netns_exists(ns)]

        # 1. The daemons, by pid file (checked to still be ours), all at once, then 2.
        # anything else running in our namespaces (servers a test started, a daemon
        # without pid file). No CNI DEL: all that a DEL undoes (the pod's veth, the
        # bridge's port, host-local's reservation) lives in the namespaces and the state
        # directory removed below, as when a node is switched off (the DELs, a plugin
        # process each, were most of the time a 200-node bed took to go: README).
        with self._stage("daemons stopped"):
            daemons = []
            for pid_file in sorted(self.state_dir.glob("n*.pid")):
                match = re.fullmatch(r"n(\d+)\.pid", pid_file.name)
                if match and (pid := self._daemon_pid(int(match[1]))) is not None:
                    daemons.append(pid)
            self.progress.step(f"stopping {len(daemons)} daemons", advance=False)
            terminate(daemons, DAEMON_STOP_TIMEOUT)
            for proc in self._procs.values():
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            self._procs.clear()
            if self._starter is not None:
                self._starter.close()
                self._starter = None
        with self._stage("other processes stopped"):
            ours = set(_ancestors())
            strays = [pid for pid in netns_pids_all(pod_names + node_names) if pid not in ours]
            terminate(strays, 2.0)
        removed["processes"] = [str(pid) for pid in daemons + strays]

        # 3. The namespaces, pods first (their links go with them).
        with self._stage("namespaces deleted"):
            self.progress.step(f"deleting {len(pod_names + node_names)} namespaces", advance=False)
            errors = remove_netns_all(pod_names + node_names)
            gone = [ns for ns in pod_names + node_names if not netns_exists(ns)]
            removed["netns"] = gone
            removed["pods"] = [ns for ns in pod_names if ns in gone]

        # 4. The state directory.
        with self._stage("state removed"):
            errors.extend(self._remove_state())
        if errors:
            raise TestbedError(f"down of testbed {self.prefix} left things: {'; '.join(errors)}")
        return removed

    def _remove_state(self) -> list[str]:
        """Remove the files a run makes; a custom state dir is emptied of ours only."""
        errors: list[str] = []
        state = self.state_dir
        pointer = _pointer(self.prefix)
        if state.is_dir():
            if state.resolve() == (STATE_ROOT / self.prefix).resolve():
                shutil.rmtree(state, ignore_errors=True)
            else:
                ours = re.compile(
                    r"^(testbed\.json|registry\.json(\.lock)?|\.registry\.json\..*"
                    r"|n\d+\.(pid|log)|n\d+|etcd\d*|etcd\d*\.(pid|log)|events\.jsonl|start-server\.log)$"
                )
                for entry in state.iterdir():
                    if not ours.match(entry.name):
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                try:
                    state.rmdir()
                except OSError:
                    left = sorted(e.name for e in state.iterdir())
                    if left:
                        sys.stderr.write(
                            f"overlay testbed: left {state} in place, it holds files not made "
                            f"by the testbed: {', '.join(left[:5])}\n"
                        )
            if state.exists() and (state / "testbed.json").exists():
                errors.append(f"could not remove {state}")
        pointer.unlink(missing_ok=True)
        return errors

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.down()
        except TestbedError as e:
            if exc is None:
                raise
            sys.stderr.write(f"overlay testbed: {e}\n")


@contextmanager
def _as_testbed_error(doing: str) -> Iterator[None]:
    """An iproute2 or netlink failure while building, as the one-line error of up."""
    try:
        yield
    except (OSError, NetlinkError) as e:
        raise TestbedError(f"{doing}: {e}") from None


def _overlay_args(argv: list[str]) -> tuple[str, list[str]] | None:
    """(namespace, ARGS) of ``ip netns exec NS <this python> -m overlay ARGS``: what the
    start server can run in a fork; None for any other command (a test's stand-in)."""
    if argv[:3] != ["ip", "netns", "exec"] or argv[4:7] != [sys.executable, "-m", "overlay"]:
        return None
    return argv[3], argv[7:]


def _ancestors() -> list[int]:
    """This process and its parents: never killed, even if run inside a testbed netns."""
    pids = []
    pid = os.getpid()
    while pid > 1:
        pids.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids
