"""`overlay testbed up|down|status|exec`: the front end of the namespace testbed
(``overlay.lab.testbed``); errors are one line on stderr, exit 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from control.config import SUPPORTED_BACKENDS
from overlay.cli.parser import OneLineParser
from overlay.cli.status import add_output_flags, show
from overlay.lab.errors import TestbedError
from overlay.lab.etcd import MAX_MEMBERS
from overlay.lab.progress import Progress
from overlay.lab.testbed import (
    DEFAULT_NETWORK,
    DEFAULT_PREFIX,
    DEFAULT_UNDERLAY,
    REGISTRIES,
    Testbed,
)


def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog="overlay testbed",
        description="Network-namespace testbed: nodes on an underlay bridge, one overlay "
        "daemon per node, pods attached through the CNI plugin.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--prefix",
            default=DEFAULT_PREFIX,
            help=f"name prefix of the run, 1-8 of [a-z0-9] (default {DEFAULT_PREFIX})",
        )
        p.add_argument(
            "--state-dir",
            default=None,
            help="pid files, logs, registry, subnet.env files "
            "(default /run/overlay-testbed/PREFIX)",
        )

    up = sub.add_parser("up", help="build nodes, start daemons, add pods")
    common(up)
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--pods-per-node", type=int, default=2, help="pods per node (default 2)")
    up.add_argument("--backend", default="udp", choices=SUPPORTED_BACKENDS)
    up.add_argument(
        "--registry",
        default="etcd",
        choices=REGISTRIES,
        help="etcd (default: a real etcd in the underlay namespace) or file",
    )
    up.add_argument(
        "--etcd-members",
        type=int,
        default=1,
        help=f"etcd cluster size, 1 to {MAX_MEMBERS} (default 1); every daemon is given "
        "every member's endpoint",
    )
    up.add_argument(
        "--kernel-nodes",
        type=_node_list,
        default=[],
        help="vxlan only: comma-separated node numbers whose datapath is the kernel's "
        "vxlan device (e.g. 2 or 2,3); the others run the userspace datapath",
    )
    up.add_argument(
        "--direct-routing",
        action="store_true",
        help="vxlan only: seed the config with DirectRouting (plain routes between nodes "
        "on one L2 segment, encapsulation otherwise)",
    )
    up.add_argument("--underlay", default=DEFAULT_UNDERLAY, help=f"default {DEFAULT_UNDERLAY}")
    up.add_argument("--network", default=DEFAULT_NETWORK, help=f"default {DEFAULT_NETWORK}")

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
    return parser


def _node_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of node numbers") from None


def format_status(st: dict[str, Any]) -> str:
    lines = [
        f"testbed {st['prefix']}: underlay {st['underlay']} on {st['bridge']}, "
        f"network {st['network']}, {st['backend']} backend, "
        f"{st['registry']} registry, state in {st['state_dir']}",
        "",
        f"{'NODE':<6} {'NETNS':<14} {'UNDERLAY':<16} {'SUBNET':<18} {'BACKEND':<12} DAEMON",
    ]
    for n in st["nodes"]:
        daemon = f"pid {n['pid']}" if n["pid"] else "not running"
        lines.append(
            f"{n['name']:<6} {n['netns']:<14} {n['underlay_ip']:<16} {n['subnet'] or '-':<18} "
            f"{n['backend']:<12} {daemon}"
        )
    if st["pods"]:
        lines += ["", f"{'POD':<8} {'NETNS':<16} {'NODE':<6} IP"]
        for p in st["pods"]:
            lines.append(f"{p['name']:<8} {p['netns']:<16} {p['node']:<6} {p['ip'] or '-'}")
    return "\n".join(lines)


def show_node(bed: Testbed, args: argparse.Namespace) -> int:
    """`overlay status` for one node of the testbed (its daemon's status socket)."""
    return show(bed.status_socket(bed.node_number(args.node)), args, "overlay testbed status")


def _up(args: argparse.Namespace) -> int:
    bed = Testbed(
        args.prefix,
        nodes=args.nodes,
        pods_per_node=args.pods_per_node,
        backend=args.backend,
        registry=args.registry,
        underlay=args.underlay,
        network=args.network,
        state_dir=args.state_dir,
        kernel_nodes=tuple(args.kernel_nodes),
        direct_routing=args.direct_routing,
        etcd_members=args.etcd_members,
    )
    bed.progress = Progress(f"overlay testbed up {bed.prefix}", bed.up_steps())
    try:
        bed.up()
    finally:
        bed.progress.done()
    print(format_status(bed.status()))
    print(f"\ntear down with: overlay testbed down --prefix {bed.prefix}")
    return 0


def _down(args: argparse.Namespace) -> int:
    bed = Testbed(args.prefix, state_dir=args.state_dir)
    bed.progress = Progress(f"overlay testbed down {bed.prefix}")
    try:
        removed = bed.down()
    finally:
        bed.progress.done()
    what = ", ".join(f"{len(v)} {k}" for k, v in removed.items() if v) or "nothing left"
    print(f"testbed {args.prefix} is down ({what})")
    return 0


def _status(args: argparse.Namespace) -> int:
    bed = Testbed.load(args.prefix, args.state_dir)
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
    bed = Testbed(args.prefix, state_dir=args.state_dir)
    try:
        return bed.exec(args.name, cmd).returncode
    except FileNotFoundError as e:
        raise TestbedError(f"cannot run {cmd[0]!r}: {e.strerror}") from None


COMMANDS = {"up": _up, "down": _down, "status": _status, "exec": _exec}


def main(argv: list[str]) -> int:
    """``overlay testbed up|down|status|exec``; errors are one line on stderr, exit 1."""
    try:
        args = _parser().parse_args(argv)
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
