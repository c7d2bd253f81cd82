"""The `overlay` program: one front end per command.

Each command's module is imported only when that command runs, so `overlay status` does
not pay for the daemon's imports. `overlay bench` hands the process over to the benchmark
program (``python -m bench``), which sits on top of everything and is imported by nothing.
"""

from __future__ import annotations

import os
import sys

from overlay.observe.version import version

USAGE = """usage: overlay <command> [options]

commands:
  run       the per-node daemon (flanneld's flags; see `overlay run --help`)
  status    what a running daemon knows: lease, registry, peers, counters (--json, --watch)
  trace     capture what crosses a running daemon as pcapng (tcpdump-like; see --help)
  impair    delay, lose, duplicate, corrupt, reorder, rate-limit its packets, as netem would
  testbed   build/tear down a network-namespace testbed (up|down|status|exec)
  bench     the benchmark matrix -> bench/results/ (see `overlay bench --help`)
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run":
        from overlay.cli import run

        return run.main(rest)
    if command == "status":
        from overlay.cli import status

        return status.main(rest)
    if command == "trace":
        from overlay.cli import trace

        return trace.main(rest)
    if command == "impair":
        from overlay.cli import impair

        return impair.main(rest)
    if command == "testbed":
        from overlay.cli import testbed

        return testbed.main(rest)
    if command == "bench":
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "bench", *rest])
    if command in ("--version", "-version", "version"):
        print(f"overlay {version()}")
        return 0
    sys.stderr.write(f"overlay: error: unknown command {command!r} (see `overlay --help`)\n")
    return 2
