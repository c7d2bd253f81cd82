"""`overlay impair`: show or change what a running daemon's dataplane does to packets,
in netem's words, through its status socket (root only, like the rest of it)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from overlay.cli.parser import OneLineParser
from overlay.impair.rules import CHOICES, Change
from overlay.impair.spec import ImpairError
from overlay.observe.status_socket import ask, default_path

PROG = "overlay impair"
EXAMPLES = """examples:
  overlay impair delay 20ms 5ms distribution normal loss 1%   every peer, what we send
  overlay impair --peer 198.18.3.0/24 rate 100mbit limit 500  one peer
  overlay impair --direction in loss gemodel 1% 30%           bursts, what we receive
  overlay impair --clear                                      back to no impairment
  overlay impair                                              the rules in force
"""


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Impair a running daemon's userspace datapath as netem would (delay, "
        "jitter, loss, duplicate, corrupt, reorder, rate, limit), per peer or for all, "
        "without the kernel's netem. Flags go before the netem words.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--status-socket",
        default=os.environ.get("FLANNELD_STATUS_SOCKET") or str(default_path()),
        help="the daemon's status socket (default: this network namespace's)",
    )
    p.add_argument(
        "--peer",
        metavar="SUBNET",
        help="only this peer (its lease, as `overlay status` lists it); default every peer "
        "without a rule of its own",
    )
    p.add_argument(
        "--direction",
        choices=CHOICES,
        help="out: what we send to the peer (default, as netem on egress); in: what we "
        "receive from it; both",
    )
    p.add_argument(
        "--clear",
        action="store_true",
        help="remove the rules (of --peer, of --direction; default every rule)",
    )
    p.add_argument("--json", action="store_true", help="print the rules in force as JSON")
    p.add_argument("netem", nargs=argparse.REMAINDER, help="netem's words (see tc-netem(8))")
    return p


def format_rules(rules: list[dict[str, Any]]) -> str:
    if not rules:
        return "no impairment"
    lines = [f"{'PEER':<18} {'DIRECTION':<9} NETEM"]
    for rule in rules:
        lines.append(f"{rule['peer'] or 'all':<18} {rule['direction']:<9} {rule['netem']}")
    return "\n".join(lines)


def _request(args: argparse.Namespace) -> str:
    """The request line's JSON ("" to ask for the rules in force); ImpairError if the
    flags and words say nothing coherent."""
    if args.clear and args.netem:
        raise ImpairError("--clear takes no netem words")
    if not args.clear and not args.netem:
        if args.peer or args.direction:
            raise ImpairError("--peer and --direction need netem words or --clear")
        return ""
    change = Change.make(args.peer, args.direction, None if args.clear else " ".join(args.netem))
    return json.dumps(change.to_json())


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        request = _request(args)
    except ImpairError as e:
        parser.error(str(e))
    try:
        answer = ask(args.status_socket, f"impair {request}".rstrip()).decode(errors="replace")
    except OSError as e:
        sys.stderr.write(f"{PROG}: error: no daemon answers on {args.status_socket} ({e})\n")
        return 1
    if not answer.startswith("{"):
        sys.stderr.write(f"{PROG}: {answer.strip() or 'error: no answer'}\n")
        return 1
    try:
        rules = json.loads(answer)["impairment"]
    except (ValueError, KeyError):
        sys.stderr.write(f"{PROG}: error: the daemon sent a broken answer\n")
        return 1
    print(json.dumps(rules, indent=2) if args.json else format_rules(rules))
    return 0
