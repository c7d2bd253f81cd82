"""The scale probe: one daemon against thousands of leases in a real etcd, written by hand.
``overlay testbed scale`` and ``python -m bench.scale`` run it (same flags, same figures:
``--leases 10000 --churn 1000 [--kernel-vxlan | --backend host-gw]``).

A one-node testbed (``overlay.lab``, underlay 198.18.0.0/15, network 10.0.0.0/8: see
``overlay/lab/fake_peers.py``) with a real etcd. The daemon is stopped, ``--leases``
fake leases are written (as flanneld's nodes would write them; ``--live`` of them answer
pings from the underlay namespace), and the daemon started again. Measured:

- **all peers known**: from starting the daemon to its last peer-table log line, checked
  against the registry through its status socket (and RSS then);
- **kernel programmed** (``--kernel-vxlan``, host-gw): from the start until the node's
  routes, neighbours and fdb entries (read with ``ip``/``bridge``) are exactly the leases';
- **status / metrics**: the status socket's answer, ``overlay status`` as a command, and
  one /metrics scrape; ping p50/p99 to a live peer, alone and during a scrape loop;
- **churn**: ``--churn`` single writes (a third adds, deletes, edits) as fast as etcd takes
  them, while every live peer is pinged every 10 ms; the time from the last write's
  acknowledgement to the first status answer whose peer table is the registry's (an upper
  bound, within one answer), and to the kernel holding exactly the new state (both
  watched at once); pings lost, and ``tx_no_route`` drops counted meanwhile (a live
  peer without a route);
- **reconcile pass** (kernel datapaths, ``--reconcile-peers``): the CPU one check of all
  kernel objects costs, in this process, against a scratch namespace with that many peers.

Heavy: run it under ``flock /work/heavy.lock``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from control.lease import Lease
from control.subnet_env import parse_subnet_env
from overlay.kernel.objects import (
    Address,
    KernelObject,
    Link,
    Reachable,
    Route,
    VxlanDevice,
    vxlan_peer,
)
from overlay.kernel.reconcile import NODE, KernelState
from overlay.lab.etcd import EtcdGateway
from overlay.lab.fake_peers import (
    LEASE_TTL,
    SCALE_NETWORK,
    SCALE_UNDERLAY,
    VNI,
    EchoPeers,
    FakePeer,
    FakePeers,
)
from overlay.lab.netns import create_netns, entered, remove_netns, run_in
from overlay.lab.testbed import PROJECT_ROOT, Testbed
from overlay.observe.status_socket import ask, query

PEER_EVENTS = frozenset({"peer_added", "peer_removed", "peers_changed"})
QUIET = 2.0  # no peer-table line for this long: the daemon has caught up (then checked)
SETTLE_TIMEOUT = 900.0
HEALTH_PORT = 9100
PING_INTERVAL = 0.01
PINGS = 400
SPELLS = 4  # quiet and scraped spells of pings, alternating
DEVICE = f"flannel.{VNI}"


@dataclass(frozen=True)
class ScaleOptions:
    """What one probe run does (the flags of ``overlay testbed scale``)."""

    leases: int = 10000
    churn: int = 1000
    backend: str = "udp"  # udp, vxlan or host-gw
    kernel_vxlan: bool = False
    live: int = 4  # peers that answer pings
    pings: int = PINGS
    observe: bool = True  # status, /metrics and the pings
    reconcile_peers: tuple[int, ...] = (20, 1000, 5000)  # kernel datapaths only
    prefix: str = "sc"

    def __post_init__(self) -> None:
        if self.live < 1 or self.leases < self.live:
            raise ValueError("--live must be 1 or more and at most --leases")
        if self.pings < 1:
            raise ValueError("--pings must be 1 or more")
        if any(count < 1 for count in self.reconcile_peers):
            raise ValueError("--reconcile-peers: counts of 1 or more")

    @property
    def datapath(self) -> str:
        if self.kernel_vxlan:
            return "vxlan-kernel"
        return {"vxlan": "vxlan-user"}.get(self.backend, self.backend)


@dataclass
class Figures:
    """What one run measured (seconds, MB, milliseconds as named)."""

    command: str
    commit: str
    leases: int
    churn: int
    datapath: str
    known_s: float | None = None
    rss_known_mb: float | None = None
    kernel_programmed_s: float | None = None
    status_socket_ms: list[float] = field(default_factory=list)
    status_command_ms: list[float] = field(default_factory=list)
    metrics_ms: list[float] = field(default_factory=list)
    metrics_bytes: int | None = None
    ping_idle_us: tuple[float, float] | None = None  # p50, p99
    ping_scraped_us: tuple[float, float] | None = None
    scrapes_during_ping: int = 0
    churn_write_s: float | None = None
    churn_applied_s: float | None = None
    churn_kernel_s: float | None = None
    churn_pings: tuple[int, int] | None = None  # sent, answered
    churn_no_route: int | None = None
    rss_end_mb: float | None = None
    rss_peak_mb: float | None = None
    reconcile_cpu_ms: dict[int, float] = field(default_factory=dict)
    program_s: dict[int, float] = field(default_factory=dict)


# -- the daemon's log and state ---------------------------------------------------------------


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class LogTail:
    """The daemon's JSON log from an offset on: when its peer table last changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.last_change: float | None = None  # wall time, from the daemon's own stamp
        self.seen_at = time.monotonic()

    def read(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        for line in data[:complete].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") in PEER_EVENTS:
                self.last_change = _epoch(event["timestamp"])
                self.seen_at = time.monotonic()


def table_of(st: dict[str, Any]) -> dict[str, str]:
    return {p["subnet"]: p["public_ip"] for p in st.get("peers", [])}


def wanted_table(plan: FakePeers) -> dict[str, str]:
    return {str(s): str(p.public_ip) for s, p in plan.peers.items()}


def settle(bed: Testbed, tail: LogTail, plan: FakePeers) -> float:
    """The wall time of the daemon's last peer-table change, once it has been quiet for
    QUIET seconds and its table equals the registry's."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    wanted = wanted_table(plan)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        tail.read()
        if tail.last_change is None or time.monotonic() - tail.seen_at < QUIET:
            continue
        if table_of(query(bed.status_socket(1), timeout=30)) == wanted:
            return tail.last_change
        tail.seen_at = time.monotonic()  # not there yet: wait for more
    raise RuntimeError(f"the daemon's peer table did not match the registry in {SETTLE_TIMEOUT} s")


def applied(bed: Testbed, plan: FakePeers) -> float:
    """The wall time a status answer first showed the daemon's table equal to the
    registry's: an upper bound on when the last change was applied, within one answer
    (~30 ms at 10,000 peers). Not the log: below ``-v 2`` a burst's changes after its
    first lines are only counted, and said when the burst's window ends."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    wanted = wanted_table(plan)
    while time.monotonic() < deadline:
        if table_of(query(bed.status_socket(1), timeout=30)) == wanted:
            return time.time()
        time.sleep(0.01)
    raise RuntimeError(f"the daemon's peer table did not match the registry in {SETTLE_TIMEOUT} s")


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MB."""
    found = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (int(found["VmRSS"].split()[0]) / 1024, int(found["VmHWM"].split()[0]) / 1024)


# -- the kernel's tables -------------------------------------------------------------------------


def kernel_tables(bed: Testbed, datapath: str) -> set[str]:
    """The node's peer objects as iproute2 prints them, normalised to one string each."""
    ns = bed.node_ns(1)
    network = IPv4Network(SCALE_NETWORK)
    found: set[str] = set()
    routes = run_in(ns, ["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    for line in routes.splitlines():
        words = line.split()
        if "via" in words and IPv4Network(words[0]).subnet_of(network):
            found.add(f"route {words[0]} via {words[words.index('via') + 1]}")
    if datapath != "vxlan-kernel":
        return found
    neigh = ["ip", "neigh", "show", "dev", DEVICE, "nud", "permanent"]
    for line in run_in(ns, neigh, capture_output=True, text=True).stdout.splitlines():
        words = line.split()
        found.add(f"neigh {words[0]} {words[2]}")
    fdb = ["bridge", "fdb", "show", "dev", DEVICE]
    for line in run_in(ns, fdb, capture_output=True, text=True).stdout.splitlines():
        words = line.split()
        if "dst" in words:
            found.add(f"fdb {words[0]} {words[words.index('dst') + 1]}")
    return found


def wanted_kernel(plan: FakePeers, datapath: str) -> set[str]:
    wanted: set[str] = set()
    for peer in plan.peers.values():
        if datapath == "host-gw":
            wanted.add(f"route {peer.subnet} via {peer.public_ip}")
            continue
        vtep = peer.subnet.network_address
        wanted |= {
            f"route {peer.subnet} via {vtep}",
            f"neigh {vtep} {peer.mac}",
            f"fdb {peer.mac} {peer.public_ip}",
        }
    return wanted


def kernel_settled(bed: Testbed, plan: FakePeers, datapath: str, period: float) -> float:
    """The wall time at which the kernel was first seen holding exactly the leases: the
    end of the first read of its tables that found them (an upper bound: a read takes
    ~0.1-0.5 s at thousands of peers, the resolution of this figure)."""
    wanted = wanted_kernel(plan, datapath)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        if kernel_tables(bed, datapath) == wanted:
            return time.time()
        time.sleep(period)
    raise RuntimeError(f"the kernel did not hold the leases' objects in {SETTLE_TIMEOUT} s")


# -- probes: pings, status, metrics --------------------------------------------------------------

_TIME = re.compile(rb"time=([0-9.]+) ms")
_SUMMARY = re.compile(rb"(\d+) packets transmitted, (\d+) received")


def ping_times(bed: Testbed, address: IPv4Address, count: int) -> list[float]:
    """RTTs in microseconds of ``count`` pings, one every PING_INTERVAL."""
    argv = ["ping", "-n", "-i", str(PING_INTERVAL), "-c", str(count), "-W", "1", str(address)]
    out = bed.exec("n1", argv, capture_output=True).stdout
    return [float(t) * 1000 for t in _TIME.findall(out)]


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    if not ordered:
        return (float("nan"), float("nan"))
    return (
        round(statistics.median(ordered), 1),
        round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    )


def fetch_metrics(ns: str) -> tuple[float, int]:
    """One /metrics scrape from inside the node: (milliseconds, bytes)."""
    with entered(ns):
        conn = http.client.HTTPConnection("127.0.0.1", HEALTH_PORT, timeout=30)
        started = time.perf_counter()
        conn.request("GET", "/metrics")
        body = conn.getresponse().read()
    elapsed = (time.perf_counter() - started) * 1000
    conn.close()
    return elapsed, len(body)


def time_status(path: Path) -> float:
    started = time.perf_counter()
    query(path, timeout=30)
    return (time.perf_counter() - started) * 1000


def time_status_command(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "overlay", "status", "--status-socket", str(path)],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return (time.perf_counter() - started) * 1000


def _scrape_loop(ns: str, status_path: Path, stop: Any, active: Any, scrapes: Any) -> None:
    """/metrics and the status socket, one after the other, 100 ms apart, while
    ``active`` is set, until ``stop`` is: in a process of its own (``ScrapeLoop``), at the
    lowest CPU priority, reading each answer whole without parsing it. On 2 vCPUs parsing
    the status answer (~30 ms of CPU at 10,000 peers) took the CPU the daemon, the pinger
    and the echo peers need, and the pings measured the scheduler
    (bench/results/scrape-latency-causes.md), not the daemon; a scraper is normally
    elsewhere."""
    os.nice(19)
    while not stop.wait(0.1):
        if not active.is_set():
            continue
        fetch_metrics(ns)
        ask(status_path, "status", timeout=30)
        with scrapes.get_lock():
            scrapes.value += 2


class ScrapeLoop:
    """``_scrape_loop`` in another process, not a thread of this one: the echo peers
    answer pings from a thread here, and parsing a status answer (2.4 MB of JSON at
    10,000 peers, tens of milliseconds holding the GIL) in this process would delay
    their replies: the ping would measure the probe, not the daemon. It scrapes while
    ``active`` is set, so the probe can alternate quiet and scraped spells."""

    def __init__(self, bed: Testbed) -> None:
        context = multiprocessing.get_context("spawn")
        self.stopped = context.Event()
        self.active = context.Event()
        self._scrapes = context.Value("i", 0)
        self._process = context.Process(
            target=_scrape_loop,
            args=(
                bed.node_ns(1),
                bed.status_socket(1),
                self.stopped,
                self.active,
                self._scrapes,
            ),
            daemon=True,
        )

    @property
    def scrapes(self) -> int:
        return int(self._scrapes.value)

    def start(self) -> None:
        self._process.start()

    def join(self, timeout: float) -> None:
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def observe(bed: Testbed, plan: FakePeers, figures: Figures, pings: int = PINGS) -> None:
    path = bed.status_socket(1)
    figures.status_socket_ms = [round(time_status(path), 1) for _ in range(3)]
    figures.status_command_ms = [round(time_status_command(path), 1) for _ in range(3)]
    scrapes = [fetch_metrics(bed.node_ns(1)) for _ in range(3)]
    figures.metrics_ms = [round(ms, 1) for ms, _ in scrapes]
    figures.metrics_bytes = scrapes[-1][1]
    target = plan.live[0].probe_address()
    idle: list[float] = []
    scraped: list[float] = []
    loop = ScrapeLoop(bed)
    loop.start()
    try:  # quiet and scraped spells alternate: what else runs on the machine hits both
        spells = min(SPELLS, pings)
        for spell in range(spells):
            share = pings // spells + (1 if spell < pings % spells else 0)
            idle += ping_times(bed, target, share)
            loop.active.set()
            scraped += ping_times(bed, target, share)
            loop.active.clear()
    finally:
        loop.stopped.set()
        loop.join(timeout=60)
    figures.ping_idle_us = percentiles(idle)
    figures.ping_scraped_us = percentiles(scraped)
    figures.scrapes_during_ping = loop.scrapes


# -- churn -----------------------------------------------------------------------------------


def _no_route(bed: Testbed) -> int:
    st = query(bed.status_socket(1), timeout=30)
    return int(((st.get("counters") or {}).get("drops") or {}).get("tx_no_route", 0))


def churn(
    bed: Testbed, plan: FakePeers, gateway: EtcdGateway, lease: str, figures: Figures
) -> None:
    """The burst, with every live peer pinged throughout."""
    in_process = figures.datapath in ("udp", "vxlan-user")
    no_route = _no_route(bed) if in_process else 0
    pingers = [
        bed.popen(
            "n1",
            ["ping", "-n", "-q", "-i", str(PING_INTERVAL), str(peer.probe_address())],
            stdout=subprocess.PIPE,
        )
        for peer in plan.live
    ]
    try:
        time.sleep(0.5)
        started = time.time()
        last_write = plan.churn(gateway, figures.churn, lease)
        figures.churn_write_s = round(last_write - started, 3)
        with ThreadPoolExecutor(1) as pool:  # the kernel watched while the table is
            kernel = None
            if figures.datapath in ("vxlan-kernel", "host-gw"):
                kernel = pool.submit(kernel_settled, bed, plan, figures.datapath, 0.0)
            figures.churn_applied_s = round(applied(bed, plan) - last_write, 3)
            if kernel is not None:
                figures.churn_kernel_s = round(kernel.result() - last_write, 3)
    finally:
        sent = answered = 0
        for proc in pingers:
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=10)
            found = _SUMMARY.search(out or b"")
            if found:
                sent, answered = sent + int(found[1]), answered + int(found[2])
    figures.churn_pings = (sent, answered)
    if in_process:
        figures.churn_no_route = _no_route(bed) - no_route


# -- the reconcile pass, in this process ----------------------------------------------------------


def _scratch_leases(count: int, datapath: str) -> list[Lease]:
    plan = FakePeers(
        "vxlan" if datapath == "vxlan-kernel" else "host-gw",
        count,
        own=IPv4Network("10.0.0.0/24"),
    )
    return [Lease(p.subnet, p.public_ip) for p in plan.peers.values()]


def _program_for(datapath: str) -> Any:
    macs: dict[IPv4Address, str] = {}

    def program(lease: Lease, reachable: Reachable) -> list[Any]:
        if datapath == "host-gw":
            return [Route(lease.subnet, gateway=lease.public_ip)]
        mac = macs.setdefault(lease.public_ip, FakePeer(lease.subnet, lease.public_ip).mac)
        return vxlan_peer(DEVICE, lease.subnet, lease.public_ip, mac)

    return program


class _Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def reconcile_cost(prefix: str, count: int, datapath: str) -> tuple[float, float]:
    """(seconds to program ``count`` peers, CPU ms of one check of them: the median of 3),
    with the daemon's KernelState, in a scratch namespace of this process."""
    ns = f"{prefix}-rc"
    create_netns(ns)
    try:
        run_in(ns, ["ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1"], check=True)
        for command in (
            ["ip", "addr", "add", "198.18.0.1/15", "dev", "u0"],
            ["ip", "link", "set", "u0", "up"],
            ["ip", "link", "set", "u1", "up"],
        ):
            run_in(ns, command, check=True)
        with entered(ns):  # the state's worker thread starts in here and stays
            return _reconcile_in(count, datapath)
    finally:
        remove_netns(ns)


def _reconcile_in(count: int, datapath: str) -> tuple[float, float]:
    devices = (DEVICE,) if datapath == "vxlan-kernel" else ()  # host-gw: no device of its own
    state = KernelState(
        _Quiet(),
        program=_program_for(datapath),
        devices=devices,
        networks=(IPv4Network(SCALE_NETWORK),),
    )
    try:
        if datapath == "vxlan-kernel":
            node: list[KernelObject] = [
                VxlanDevice(
                    DEVICE, vni=VNI, local=IPv4Address("198.18.0.1"), underlay="u0", port=8472
                ),
                Link(DEVICE, mtu=1450),
                Address(DEVICE, IPv4Address("10.0.0.0")),
            ]
            state.set(NODE, node).result()
        leases = _scratch_leases(count, datapath)
        started = time.perf_counter()
        state.peers_changed(leases, [])
        state.resync().result()  # in order: after every peer is programmed
        program_s = time.perf_counter() - started
        costs = []
        for _ in range(3):
            cpu = time.process_time()
            state.resync().result()
            costs.append((time.process_time() - cpu) * 1000)
        if state.status()["kernel"]["missing"]:
            raise RuntimeError(f"kernel objects missing after programming {count} peers")
        return program_s, statistics.median(costs)
    finally:
        asyncio.run(state.stop())


# -- the run ------------------------------------------------------------------------------------


def _commit() -> str:
    root = str(PROJECT_ROOT)
    found = subprocess.run(
        ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD"]).returncode
    return found.stdout.strip() + ("+dirty" if dirty else "")


def start(bed: Testbed, plan: FakePeers, figures: Figures) -> int:
    """Start the daemon against the written leases; wait until it knows them all."""
    tail = LogTail(bed.log_file(1))
    started = time.time()
    proc = bed.start_daemon(1)
    figures.known_s = round(settle(bed, tail, plan) - started, 3)
    figures.rss_known_mb = round(rss_mb(proc.pid)[0], 1)
    if figures.datapath in ("vxlan-kernel", "host-gw"):
        done = kernel_settled(bed, plan, figures.datapath, period=0.25)
        figures.kernel_programmed_s = round(done - started, 3)
    return proc.pid


def measure(args: ScaleOptions, figures: Figures) -> None:
    backend = "vxlan" if args.kernel_vxlan else args.backend
    bed = Testbed(
        args.prefix,
        nodes=1,
        pods_per_node=0,
        backend=backend,
        kernel_nodes=(1,) if args.kernel_vxlan else (),
        underlay=SCALE_UNDERLAY,
        network=SCALE_NETWORK,
        daemon_args=("--healthz-port", str(HEALTH_PORT)),
    )
    echo: EchoPeers | None = None
    with bed:
        bed.up()
        own_env = parse_subnet_env(bed.subnet_file(1).read_text())
        assert own_env.subnet is not None  # an IPv4 bed
        own = own_env.subnet.network
        plan = FakePeers(backend, args.leases, own=own, live=args.live)
        gateway = EtcdGateway(bed.underlay_ns, bed.etcd.member_ip(1))
        try:
            bed.stop_daemon(1)
            if args.kernel_vxlan:  # start from an empty kernel: its peers' objects go too
                bed.exec("n1", ["ip", "link", "del", DEVICE], check=True)
            lease = gateway.grant(LEASE_TTL)
            plan.write_all(gateway, lease)
            echo = EchoPeers(bed.underlay_ns, bed.bridge, backend, plan.live)
            echo.start()
            pid = start(bed, plan, figures)
            if args.observe:
                observe(bed, plan, figures, args.pings)
            if args.churn:
                churn(bed, plan, gateway, lease, figures)
            rss, peak = rss_mb(pid)
            figures.rss_end_mb, figures.rss_peak_mb = round(rss, 1), round(peak, 1)
        finally:
            if echo is not None:
                echo.stop()
            gateway.close()


def report(figures: Figures) -> str:
    f = figures
    lines = [
        f"{f.datapath}, {f.leases} leases, {f.churn} changes ({f.commit}; {f.command})",
        f"  all peers known            {f.known_s} s, RSS {f.rss_known_mb} MB",
    ]
    if f.kernel_programmed_s is not None:
        lines.append(f"  kernel programmed          {f.kernel_programmed_s} s after start")
    if f.status_socket_ms:
        lines += [
            f"  status socket answer       {f.status_socket_ms} ms",
            f"  `overlay status` command   {f.status_command_ms} ms",
            f"  /metrics scrape            {f.metrics_ms} ms, {f.metrics_bytes} bytes",
            f"  ping p50/p99 idle          {f.ping_idle_us} us",
            f"  ping p50/p99 scraped       {f.ping_scraped_us} us "
            f"({f.scrapes_during_ping} scrapes)",
        ]
    if f.churn_applied_s is not None:
        lines.append(
            f"  churn applied              {f.churn_applied_s} s after the last write "
            f"(writes took {f.churn_write_s} s)"
        )
    if f.churn_kernel_s is not None:
        lines.append(f"  churn in the kernel        {f.churn_kernel_s} s after the last write")
    if f.churn_pings is not None:
        lines.append(
            f"  live peers during churn    {f.churn_pings[1]}/{f.churn_pings[0]} pings answered, "
            f"tx_no_route {f.churn_no_route if f.churn_no_route is not None else '-'}"
        )
    if f.rss_end_mb is not None:
        lines.append(f"  RSS at the end             {f.rss_end_mb} MB (peak {f.rss_peak_mb} MB)")
    for count, cpu in sorted(f.reconcile_cpu_ms.items()):
        lines.append(
            f"  reconcile pass, {count:>5} peers  {cpu:.1f} ms CPU "
            f"(programming them took {f.program_s[count]:.2f} s)"
        )
    return "\n".join(lines)


def run(options: ScaleOptions, command: str) -> Figures:
    """One probe run (``command``: how it was asked for, kept with the figures)."""
    figures = Figures(command, _commit(), options.leases, options.churn, options.datapath)
    measure(options, figures)
    if options.datapath in ("vxlan-kernel", "host-gw"):
        for count in options.reconcile_peers:
            program_s, cpu_ms = reconcile_cost(options.prefix, count, options.datapath)
            figures.program_s[count], figures.reconcile_cpu_ms[count] = program_s, cpu_ms
    return figures


def write_json(figures: Figures, path: Path) -> None:
    path.write_text(json.dumps(asdict(figures), indent=2) + "\n")
