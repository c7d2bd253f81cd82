"""`overlay testbed up|down|status|exec|fault|events|graph|capture|scale`: the front end of
the namespace testbed (``overlay.lab``); errors are one line on stderr, exit 1."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control.config import SUPPORTED_BACKENDS
from overlay.cli.parser import OneLineParser, integer, seconds
from overlay.cli.status import add_output_flags, show
from overlay.lab import capture, graph
from overlay.lab.errors import TestbedError
from overlay.lab.etcd import MAX_MEMBERS
from overlay.lab.faults import Event, Faults
from overlay.lab.guard import Guard
from overlay.lab.plan import describe
from overlay.lab.progress import Progress
from overlay.lab.scale_probe import PINGS, ScaleOptions, report, run, write_json
from overlay.lab.testbed import DAEMON_STARTS, DEFAULT_PREFIX, Testbed
from overlay.lab.topology import (
    DEFAULT_NETWORK,
    DEFAULT_NETWORK6,
    DEFAULT_UNDERLAY,
    IP_FAMILIES,
    REGISTRIES,
    UNDERLAY6,
    Topology,
    load_topology,
)
from overlay.observe import status_socket

# The quick form's flags, which a topology file replaces (given with -f: an error).
SHAPE_FLAGS: dict[str, tuple[str, Any]] = {
    "nodes": ("--nodes", 3),
    "pods_per_node": ("--pods-per-node", 2),
    "backend": ("--backend", "udp"),
    "registry": ("--registry", "etcd"),
    "etcd_members": ("--etcd-members", 1),
    "kernel_nodes": ("--kernel-nodes", []),
    "direct_routing": ("--direct-routing", False),
    "underlay": ("--underlay", str(DEFAULT_UNDERLAY)),
    "network": ("--network", str(DEFAULT_NETWORK)),
    "ip_family": ("--ip-family", "ipv4"),
}


def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog="overlay testbed",
        description="Network-namespace testbed: nodes on underlay bridges (one per segment, "
        "a router between them), one overlay daemon per node, pods attached through the "
        "CNI plugin; faults on demand, a picture of it, captures.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--prefix",
            default=None,
            help="name prefix of the run, 1-8 of [a-z0-9] (default: the file's name, "
            f"else {DEFAULT_PREFIX})",
        )
        p.add_argument(
            "-f",
            "--file",
            default=None,
            metavar="TOPOLOGY",
            help="a topology file (YAML: see README, 'Topology files'); for the commands "
            "after up, it names the bed (its name)",
        )
        p.add_argument(
            "--state-dir",
            default=None,
            help="pid files, logs, registry, subnet.env files, the event log "
            "(default /run/overlay-testbed/PREFIX)",
        )

    _up_parser(sub.add_parser("up", help="build nodes, start daemons, add pods"), common)

    down = sub.add_parser("down", help="remove everything of the prefix (also after a crash)")
    common(down)

    status = sub.add_parser("status", help="nodes, leases, daemons and pods")
    common(status)
    status.add_argument(
        "--node",
        default=None,
        help="what one node's daemon knows (n1, ...): as `overlay status` on its socket",
    )
    add_output_flags(status)

    run = sub.add_parser("exec", help="run a command in a node (n1) or pod (n1-p2)")
    common(run)
    run.add_argument("name", help="n1, n1-p2, ...")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    _fault_parser(
        sub.add_parser("fault", help="cut links, stop daemons, freeze etcd, impair"), common
    )

    events = sub.add_parser("events", help="the bed's event log (up, every fault, its undoing)")
    common(events)
    events.add_argument("--json", action="store_true", help="one JSON object per line")

    picture = sub.add_parser("graph", help="the bed as a picture: SVG (Graphviz) and Mermaid")
    common(picture)
    picture.add_argument(
        "-o", "--output", default=None, help="the picture (.svg or .png; default PREFIX.svg)"
    )
    picture.add_argument(
        "--mermaid", default=None, help="Mermaid text too, to this file ('-': stdout)"
    )
    picture.add_argument(
        "--interval", type=seconds, default=1.0, help="seconds the rates are measured over (1)"
    )

    cap = sub.add_parser("capture", help="one pcapng of nodes' eth0 and overlay devices")
    common(cap)
    cap.add_argument(
        "--nodes", default="all", help="comma-separated nodes (n1,n3; default all of them)"
    )
    cap.add_argument("-w", "--write", required=True, help="the pcapng file (created 0600)")
    cap.add_argument(
        "-i",
        "--interfaces",
        default=None,
        help="comma-separated (default eth0 and the overlay device)",
    )
    cap.add_argument("--seconds", type=seconds, default=10.0, help="how long (default 10)")
    cap.add_argument("-c", "--count", type=int, default=None, help="stop after COUNT packets")
    cap.add_argument("-s", "--snaplen", type=int, default=262144, help="bytes kept per packet")
    cap.add_argument("filter", nargs="*", help="a tcpdump (BPF) filter, e.g. icmp")

    scale = sub.add_parser(
        "scale",
        help="the scale probe: one daemon, thousands of leases in a real etcd, churn "
        "(a bed of its own, removed at the end; heavy)",
    )
    add_scale_flags(scale)
    return parser


def add_scale_flags(parser: argparse.ArgumentParser) -> None:
    """The scale probe's flags (``overlay testbed scale`` and ``python -m bench.scale``)."""
    count = integer("a whole number", "(a count)", 0)
    parser.add_argument("--leases", type=count, default=10000, help="fake leases (10000)")
    parser.add_argument("--churn", type=count, default=1000, help="changes in the burst (1000)")
    parser.add_argument("--backend", default="udp", choices=("udp", "vxlan", "host-gw"))
    parser.add_argument("--kernel-vxlan", action="store_true", help="vxlan, kernel datapath")
    parser.add_argument("--live", type=count, default=4, help="peers that answer pings (4)")
    parser.add_argument(
        "--pings", type=count, default=PINGS, help=f"pings idle and during scrapes ({PINGS})"
    )
    parser.add_argument("--no-observe", action="store_true", help="skip status/metrics/ping")
    parser.add_argument(
        "--reconcile-peers",
        default="20,1000,5000",
        help="kernel datapaths: peer counts of the in-process reconcile measurement",
    )
    parser.add_argument(
        "--prefix", default=None, help="the probe's bed prefix (default sc + 5 random hex)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")


def scale_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ScaleOptions:
    """The probe's options from its flags; a wrong combination is a usage error."""
    try:
        peers = tuple(int(n) for n in args.reconcile_peers.split(",") if n.strip())
        return ScaleOptions(
            leases=args.leases,
            churn=args.churn,
            backend=args.backend,
            kernel_vxlan=args.kernel_vxlan,
            live=args.live,
            pings=args.pings,
            observe=not args.no_observe,
            reconcile_peers=peers,
            prefix=args.prefix or "sc" + uuid.uuid4().hex[:5],
        )
    except ValueError as e:
        parser.error(str(e) if "--" in str(e) else f"--reconcile-peers: {e}")


def _up_parser(up: argparse.ArgumentParser, common: Any) -> None:
    common(up)
    up.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be made (namespaces, segments, addresses, routes, backends) "
        "and make nothing",
    )
    up.add_argument("--nodes", type=int, default=None, help="number of nodes (default 3)")
    up.add_argument("--pods-per-node", type=int, default=None, help="pods per node (default 2)")
    up.add_argument("--backend", default=None, choices=SUPPORTED_BACKENDS, help="default udp")
    up.add_argument(
        "--registry",
        default=None,
        choices=REGISTRIES,
        help="etcd (default: a real etcd in the underlay namespace) or file",
    )
    up.add_argument(
        "--etcd-members",
        type=int,
        default=None,
        help=f"etcd cluster size, 1 to {MAX_MEMBERS} (default 1); every daemon is given "
        "every member's endpoint",
    )
    up.add_argument(
        "--kernel-nodes",
        type=_node_list,
        default=None,
        help="vxlan only: comma-separated node numbers whose datapath is the kernel's "
        "vxlan device (e.g. 2 or 2,3); the others run the userspace datapath",
    )
    up.add_argument(
        "--direct-routing",
        action="store_true",
        default=None,
        help="vxlan only: seed the config with DirectRouting (plain routes between nodes "
        "on one L2 segment, encapsulation otherwise)",
    )
    up.add_argument(
        "--daemon-start",
        default=DAEMON_STARTS[0],
        choices=DAEMON_STARTS,
        help="fork (default): one start server imports the daemon once and forks each "
        "node's `overlay run` into its namespace; exec: `ip netns exec NS overlay run` "
        "per node, a fresh interpreter each",
    )
    up.add_argument("--underlay", default=None, help=f"default {DEFAULT_UNDERLAY}")
    up.add_argument("--network", default=None, help=f"default {DEFAULT_NETWORK}")
    up.add_argument(
        "--ip-family",
        default=None,
        choices=IP_FAMILIES,
        help="ipv4 (default); ipv6: EnableIPv4 false, an IPv6-only underlay in "
        f"{UNDERLAY6}, IPv6Network {DEFAULT_NETWORK6}; dual: both",
    )


def _fault_parser(fault: argparse.ArgumentParser, common: Any) -> None:
    kinds = fault.add_subparsers(dest="kind", required=True, parser_class=OneLineParser)

    def held(p: argparse.ArgumentParser) -> None:
        common(p)
        p.add_argument(
            "--for",
            dest="hold",
            type=seconds,
            default=None,
            metavar="S",
            help="undo it S seconds later (link up, daemon started, etcd thawed or "
            "started, impairment cleared); both are logged",
        )

    link = kinds.add_parser("link", help="a node's underlay link down (cable pulled) or up")
    held(link)
    link.add_argument("action", choices=("down", "up"))
    link.add_argument("node", help="n1, n2, ...")

    node = kinds.add_parser("node", help="a node's daemon: stop (SIGTERM), kill (-9), start")
    held(node)
    node.add_argument("action", choices=("stop", "kill", "start", "restart"))
    node.add_argument("node", help="n1, n2, ...")

    etcd = kinds.add_parser("etcd", help="etcd members: freeze (SIGSTOP), thaw, kill, start")
    held(etcd)
    etcd.add_argument("action", choices=("freeze", "thaw", "kill", "start"))
    etcd.add_argument("--member", type=int, default=None, help="one member (default: all)")

    impair = kinds.add_parser(
        "impair", help="a node's impairment in netem's words (`overlay impair` on its socket)"
    )
    held(impair)
    impair.add_argument("node", help="n1, n2, ...")
    impair.add_argument("--peer", default=None, help="only what goes to this node (n3, ...)")
    impair.add_argument("--clear", action="store_true", help="remove the impairment")
    impair.add_argument("netem", nargs=argparse.REMAINDER, help="e.g. delay 20ms 5ms loss 1%%")


def _node_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of node numbers") from None


def format_status(st: dict[str, Any]) -> str:
    routing = " with DirectRouting" if st.get("direct_routing") else ""
    source = f" (from {st['source']})" if st.get("source") else ""
    family = st.get("ip_family", "ipv4")
    networks = " ".join(n for n in (st.get("network"), st.get("network6")) if n)
    lines = [
        f"testbed {st['prefix']}{source}: underlay {st['underlay']} on {st['bridge']}, "
        f"{family} network {networks}, {st['backend']} backend{routing}, "
        f"{st['registry']} registry, state in {st['state_dir']}",
    ]
    if st.get("router"):
        segments = ", ".join(f"{s['name']} {s['cidr']}" for s in st["segments"])
        lines.append(f"segments {segments}; router {st['router']}")
    lines += [
        "",
        f"{'NODE':<6} {'NETNS':<14} {'SEGMENT':<10} {'UNDERLAY':<16} {'SUBNET':<18} "
        f"{'BACKEND':<12} DAEMON",
    ]
    for n in st["nodes"]:
        daemon = f"pid {n['pid']}" if n["pid"] else "not running"
        underlay = " ".join(a for a in (n["underlay_ip"], n.get("underlay_ip6")) if a) or "-"
        lines.append(
            f"{n['name']:<6} {n['netns']:<14} {n.get('segment', '-'):<10} "
            f"{underlay:<16} {n['subnet'] or '-':<18} {n['backend']:<12} {daemon}"
        )
    if st["pods"]:
        lines += ["", f"{'POD':<8} {'NETNS':<16} {'NODE':<6} IP"]
        for p in st["pods"]:
            ips = " ".join(p.get("ips") or ([p["ip"]] if p["ip"] else [])) or "-"
            lines.append(f"{p['name']:<8} {p['netns']:<16} {p['node']:<6} {ips}")
    return "\n".join(lines)


def show_node(bed: Testbed, args: argparse.Namespace) -> int:
    """`overlay status` for one node of the testbed (its daemon's status socket)."""
    return show(bed.status_socket(bed.node_number(args.node)), args, "overlay testbed status")


def _topology(args: argparse.Namespace) -> Topology | None:
    if args.file is None:
        return None
    path = Path(args.file)
    try:
        text = path.read_text()
    except OSError as e:
        raise TestbedError(f"cannot read topology file {args.file}: {e.strerror}") from None
    return load_topology(text, path.name)


def _prefix(args: argparse.Namespace) -> str:
    """--prefix, else the topology file's name, else the default."""
    if args.prefix is not None:
        return str(args.prefix)
    topology = _topology(args)
    return (topology.name if topology else None) or DEFAULT_PREFIX


def _bed(args: argparse.Namespace) -> Testbed:
    """The running bed the command names."""
    return Testbed.load(_prefix(args), args.state_dir)


def _new_bed(args: argparse.Namespace) -> Testbed:
    """The bed ``up`` builds: from the file, or from the quick form's flags."""
    topology = _topology(args)
    if topology is not None:
        given = [flag for key, (flag, _) in SHAPE_FLAGS.items() if getattr(args, key) is not None]
        if given:
            raise TestbedError(
                f"{given[0]} cannot be combined with -f {args.file}: the file describes "
                "the bed (edit it, or drop -f for the quick form)"
            )
        return Testbed.from_topology(topology, args.prefix, args.state_dir)
    shape: dict[str, Any] = {
        key: default if getattr(args, key) is None else getattr(args, key)
        for key, (_, default) in SHAPE_FLAGS.items()
    }
    shape["kernel_nodes"] = tuple(shape["kernel_nodes"])
    prefix = DEFAULT_PREFIX if args.prefix is None else args.prefix
    return Testbed(prefix, state_dir=args.state_dir, **shape)


def _up(args: argparse.Namespace) -> int:
    bed = _new_bed(args)
    if args.dry_run:
        endpoints = bed.etcd.endpoints if bed.registry == "etcd" else []
        print(describe(bed.plan, endpoints))
        return 0
    bed.daemon_start = args.daemon_start
    bed.progress = Progress(f"overlay testbed up {bed.prefix}", bed.up_steps())
    guard = Guard(bed.prefix, bed.state_dir, bed.child_env())
    try:
        bed.up()
    except BaseException:
        guard.abandon()
        raise
    else:
        guard.built()
    finally:
        bed.progress.done()
    print(format_status(bed.status()))
    print(f"\ntear down with: overlay testbed down --prefix {bed.prefix}")
    return 0


def _down(args: argparse.Namespace) -> int:
    prefix = _prefix(args)
    bed = Testbed(prefix, state_dir=args.state_dir, registry="file")
    bed.progress = Progress(f"overlay testbed down {bed.prefix}")
    try:
        removed = bed.down()
    finally:
        bed.progress.done()
    what = ", ".join(f"{len(v)} {k}" for k, v in removed.items() if v) or "nothing left"
    print(f"testbed {prefix} is down ({what})")
    return 0


def _status(args: argparse.Namespace) -> int:
    bed = _bed(args)
    if args.node is not None:
        return show_node(bed, args)
    if args.watch is not None:
        raise TestbedError("--watch shows one node: add --node n1 (or n2, ...)")
    st = bed.status()
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def _exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        sys.stderr.write("overlay testbed exec: error: no command given (NAME -- CMD...)\n")
        return 2
    bed = Testbed(_prefix(args), state_dir=args.state_dir, registry="file")
    try:
        return bed.exec(args.name, cmd).returncode
    except FileNotFoundError as e:
        raise TestbedError(f"cannot run {cmd[0]!r}: {e.strerror}") from None


def _fault(args: argparse.Namespace) -> int:
    bed = _bed(args)
    faults = Faults(bed)
    do, undo = _fault_steps(bed, faults, args)
    events = [do()] if args.hold is None else faults.for_a_while(args.hold, do, undo)
    for event in events:
        print(format_event(event))
    return 0


def _fault_steps(
    bed: Testbed, faults: Faults, args: argparse.Namespace
) -> tuple[Callable[[], Event], Callable[[], Event]]:
    """(the fault, what undoes it) as the command line asks."""
    if args.kind == "etcd":
        undo_action = {"freeze": "thaw", "kill": "start"}.get(args.action)
        return (
            lambda: faults.etcd(args.action, args.member),
            lambda: faults.etcd(_undoable(undo_action, args), args.member),
        )
    i = bed.node_number(args.node)
    if args.hold is not None and getattr(args, "action", None) in ("up", "start", "restart"):
        raise TestbedError(f"--for undoes a fault: {args.kind} {args.action} is not one")
    if args.kind == "link":
        return lambda: faults.link(i, args.action == "up"), lambda: faults.link(i, True)
    if args.kind == "node":
        start = {
            "stop": lambda: faults.node_stop(i),
            "kill": lambda: faults.node_stop(i, kill=True),
            "start": lambda: faults.node_start(i),
            "restart": lambda: _restart(faults, i),
        }[args.action]
        return start, lambda: faults.node_start(i)
    peer = bed.node_number(args.peer) if args.peer else None
    if args.clear == bool(args.netem):
        raise TestbedError("fault impair: give netem's words (e.g. delay 20ms) or --clear")
    words = None if args.clear else " ".join(args.netem)
    return lambda: faults.impair(i, words, peer), lambda: faults.impair(i, None, peer)


def _undoable(action: str | None, args: argparse.Namespace) -> str:
    if action is None:
        raise TestbedError(f"--for undoes a fault: etcd {args.action} is not one")
    return action


def _restart(faults: Faults, i: int) -> Event:
    faults.node_stop(i)
    return faults.node_start(i)


def format_event(event: Event) -> str:
    """``2026-12-07T07:12:03.123456Z link_down node=n2 port=n2@x-ul``"""
    rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "unix", "event"))
    return f"{event['time']} {event['event']} {rest}".rstrip()


def _events(args: argparse.Namespace) -> int:
    bed = _bed(args)
    for event in bed.events.read():
        print(json.dumps(event) if args.json else format_event(event))
    return 0


def _graph(args: argparse.Namespace) -> int:
    bed = _bed(args)
    status = bed.status()
    before = _snapshots(bed, status)
    time.sleep(args.interval)
    found = graph.flows(status, before, _snapshots(bed, status), args.interval)
    if args.mermaid == "-":
        print(graph.mermaid(status, found), end="")
    elif args.mermaid:
        Path(args.mermaid).write_text(graph.mermaid(status, found))
    output = Path(args.output or f"{bed.prefix}.svg")
    fmt = output.suffix.lstrip(".")
    if fmt not in ("svg", "png", "dot"):
        raise TestbedError(f"graph: {output} is not .svg, .png or .dot")
    text = graph.dot(status, found)
    if fmt == "dot":
        output.write_text(text)
    elif shutil.which("dot") is None:
        output = output.with_suffix(".dot")
        output.write_text(text)
        sys.stderr.write(
            f"overlay testbed graph: no Graphviz `dot` here (apt-get install graphviz): "
            f"wrote {output}\n"
        )
    else:
        drawn = subprocess.run(
            ["dot", f"-T{fmt}", "-o", str(output)], input=text.encode(), capture_output=True
        )
        if drawn.returncode != 0:
            raise TestbedError(f"dot failed: {drawn.stderr.decode(errors='replace').strip()}")
    if args.mermaid != "-":
        print(f"wrote {output}" + (f" and {args.mermaid}" if args.mermaid else ""))
    return 0


def _snapshots(bed: Testbed, status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each running daemon's status, by node name (a daemon that does not answer: none)."""
    found = {}
    for node in status["nodes"]:
        if node["running"]:
            try:
                snapshot = status_socket.query(
                    bed.status_socket(bed.node_number(node["name"])), timeout=2.0
                )
            except (OSError, ValueError):
                continue
            found[node["name"]] = {**snapshot, "sampled_at": time.monotonic()}
    return found


def _capture(args: argparse.Namespace) -> int:
    bed = _bed(args)
    names = (
        [f"n{i}" for i in range(1, bed.nodes + 1)] if args.nodes == "all" else args.nodes.split(",")
    )
    wanted = tuple(args.interfaces.split(",")) if args.interfaces else None
    points = [
        point for name in names for point in capture.interfaces_of(name, bed.resolve(name), wanted)
    ]
    capture.capture(points, args.seconds, args.count, args.snaplen, args.filter)
    data, count = capture.to_pcapng(points, args.count, args.snaplen)
    capture.write_private(Path(args.write), data)
    shown = ", ".join(f"{p.name} {len(p.packets)}" for p in points)
    print(f"wrote {args.write}: {count} packets ({shown})")
    return 0


def _scale(args: argparse.Namespace) -> int:
    options = scale_options(OneLineParser(prog="overlay testbed scale"), args)
    command = "overlay testbed " + " ".join(args.argv)
    try:
        figures = run(options, command)
    except RuntimeError as e:  # a phase that did not finish in time: said in one line
        raise TestbedError(str(e)) from None
    print(report(figures))
    if args.json:
        write_json(figures, args.json)
    return 0


COMMANDS = {
    "up": _up,
    "down": _down,
    "status": _status,
    "exec": _exec,
    "fault": _fault,
    "events": _events,
    "graph": _graph,
    "capture": _capture,
    "scale": _scale,
}


def main(argv: list[str]) -> int:
    """``overlay testbed <command>``; errors are one line on stderr, exit 1."""
    try:
        args = _parser().parse_args(argv)
        args.argv = list(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        return COMMANDS[args.command](args)
    except TestbedError as e:
        sys.stderr.write(f"overlay testbed {args.command}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"overlay testbed {args.command}: interrupted\n")
        return 130
    except BrokenPipeError:  # `status | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
