"""`overlay status`: what a running daemon knows (its status socket), as a table or JSON.

The table is the snapshot the daemon answers (``overlay.observe.status_socket.query``),
laid out for a person; ``--watch`` refreshes it with rates per second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from overlay.cli.parser import OneLineParser
from overlay.observe.status_socket import default_path, query

# -- the table ---------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _count(n: float) -> str:
    if n < 10000:
        return f"{n:.0f}"
    for unit in ("k", "M", "G"):
        n /= 1000
        if n < 1000 or unit == "G":
            return f"{n:.1f}{unit}"
    return f"{n:.1f}G"


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{_duration(seconds)} ago"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    moment = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{moment} (in {_duration(timestamp - time.time())})"


def _registry_line(registry: Any) -> str:
    if not isinstance(registry, dict):  # a plain description, as an older daemon gives
        return str(registry)
    text = f"{registry.get('kind', '?')} {registry.get('address', '')}".strip()
    state = registry.get("state", "?")
    if state != "connected" and registry.get("unreachable_for_s") is not None:
        state += f" for {_duration(registry['unreachable_for_s'])}"
    text += f": {state}"
    details = []
    if registry.get("watch_revision") is not None:
        details.append(f"watch revision {registry['watch_revision']}")
    for key, word in (("watch_events", "events"), ("resyncs", "resyncs")):
        if key in registry:
            details.append(f"{registry[key]} {word}")
    if registry.get("watch_failures"):
        details.append(f"{registry['watch_failures']} watch failures")
    return text + (f"; {', '.join(details)}" if details else "")


def _rate(now: dict[str, Any], before: dict[str, Any] | None, key: str, interval: float) -> float:
    if before is None or interval <= 0:
        return 0.0
    return max(float(now.get(key, 0)) - float(before.get(key, 0)), 0.0) / interval


def format_table(
    st: dict[str, Any], previous: dict[str, Any] | None = None, interval: float = 0.0
) -> str:
    """The snapshot for people; with ``previous`` (taken ``interval`` seconds earlier), the
    per-second rates too."""
    if st.get("state") == "starting":
        return (
            f"node {st.get('node', '?')}: starting ({st.get('ready', {}).get('reason', '')})\n"
            f"registry   {_registry_line(st.get('registry', '?'))}"
        )
    rates = Rates(previous, interval) if previous is not None and interval > 0 else None
    counters = st.get("counters", {})
    lines = [
        *_node_lines(st),
        *_traffic_lines(counters, st.get("kernel_counters"), rates),
        *_ipv6_traffic_lines(st, counters),
        *_worker_lines(st.get("workers")),
        *_impairment_lines(st.get("impairment"), counters),
        "",
        *_peer_lines(st.get("peers", []), rates),
        "",
        *_drop_lines(counters.get("drops") or {}, rates),
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Rates:
    """The snapshot taken ``interval`` seconds before the one shown."""

    previous: dict[str, Any]
    interval: float

    def of(self, now: dict[str, Any], before: dict[str, Any] | None, key: str) -> float:
        return _rate(now, before, key, self.interval)


def _underlay_mtu(st: dict[str, Any]) -> str:
    """The underlay's MTU and how often it changed, once it has (else nothing)."""
    changes = st.get("mtu_changes", 0)
    if not changes:
        return ""
    followed = f"{changes} change{'s' if changes > 1 else ''} followed"
    return f" (underlay {st.get('underlay_mtu', '?')}, {followed})"


def _lease_public(lease: dict[str, Any]) -> str:
    """The lease's public address: PublicIP, or PublicIPv6 for an IPv6-only lease."""
    return str(lease.get("public_ip", lease.get("public_ipv6", "?")))


def _node_lines(st: dict[str, Any]) -> list[str]:
    """Who the node is, its lease, its registry, its offloads and log lines lost."""
    ready = st.get("ready", {})
    head = (
        f"node {st.get('node', _lease_public(st.get('lease', {})))} "
        f"({st.get('iface', '?')}), {st.get('datapath', st.get('backend', '?'))}, "
        f"MTU {st.get('mtu', '?')}{_underlay_mtu(st)}, up {_duration(st.get('uptime_s', 0))}, "
        + ("ready" if ready.get("ready", True) else f"NOT READY: {ready.get('reason', '?')}")
    )
    lease = st.get("lease", {})
    first = lease.get("subnet") or lease.get("ipv6_subnet") or "?"  # IPv6-only: no IPv4
    lines = [head, f"lease      {first}  ({lease.get('key', '')})"]
    if lease.get("ipv6_subnet"):
        lines.append(f"           IPv6 {lease['ipv6_subnet']}, public {lease.get('public_ipv6')}")
    if "expires" in lease:
        if lease["expires"] is None:
            lines.append("           a reservation: never expires")
        else:
            lines.append(
                f"           expires {_when(lease['expires'])}, "
                f"next renewal {_when(lease.get('next_renewal'))}"
            )
    lines.append(f"registry   {_registry_line(st.get('registry', '?'))}")
    features = st.get("features") or {}
    if features:
        on = [name for name, value in features.items() if value] or ["none"]
        off = [name for name, value in features.items() if not value]
        if st.get("busy_poll_us"):
            on.append(f"busy_poll={st['busy_poll_us']}us")
        lines.append(f"features   {' '.join(on)}" + (f"  (off: {' '.join(off)})" if off else ""))
    if st.get("log_lines_lost"):
        lines.append(f"log        {st['log_lines_lost']} lines could not be written (stderr)")
    return lines


def _traffic_lines(
    counters: dict[str, Any], kernel: dict[str, Any] | None, rates: Rates | None
) -> list[str]:
    """What this process forwarded (and its rates), or the kernel link's statistics."""
    lines = []
    if counters:
        totals = (
            f"traffic    sent {_count(counters.get('tx_packets', 0))} packets "
            f"({_size(counters.get('tx_bytes', 0))}), received "
            f"{_count(counters.get('rx_packets', 0))} ({_size(counters.get('rx_bytes', 0))}), "
            f"ICMP unreachable sent {counters.get('icmp_unreachable_sent', 0)}, "
            f"frag-needed sent {counters.get('icmp_frag_needed_sent', 0)}"
        )
        if rates is not None:
            before = rates.previous.get("counters")
            totals += (
                f"; now {_count(rates.of(counters, before, 'tx_packets'))}/s "
                f"{_size(rates.of(counters, before, 'tx_bytes'))}/s out, "
                f"{_count(rates.of(counters, before, 'rx_packets'))}/s "
                f"{_size(rates.of(counters, before, 'rx_bytes'))}/s in"
            )
        lines.append(totals)
    if kernel:
        lines.append(
            f"kernel     {kernel.get('device')}: sent {_count(kernel.get('tx_packets', 0))} "
            f"({_size(kernel.get('tx_bytes', 0))}), received "
            f"{_count(kernel.get('rx_packets', 0))} ({_size(kernel.get('rx_bytes', 0))}), "
            f"dropped {kernel.get('tx_dropped', 0)} out / {kernel.get('rx_dropped', 0)} in, "
            f"errors {kernel.get('tx_errors', 0)} / {kernel.get('rx_errors', 0)}"
        )
    return lines


def _ipv6_traffic_lines(st: dict[str, Any], counters: dict[str, Any]) -> list[str]:
    """A dual-stack node: the IPv6 half's share of the traffic and drops, or the kernel's
    flannel-v6.<VNI> link."""
    if not st.get("lease", {}).get("ipv6_subnet"):
        return []
    lines = []
    if counters:
        lines.append(
            f"  of which IPv6: sent {_count(counters.get('tx_packets6', 0))} "
            f"({_size(counters.get('tx_bytes6', 0))}), received "
            f"{_count(counters.get('rx_packets6', 0))} ({_size(counters.get('rx_bytes6', 0))}), "
            f"dropped {_count(sum((counters.get('drops6') or {}).values()))}, "
            f"NDP replies {st.get('ndp_replies', 0)}"
        )
    lines += _traffic_lines({}, st.get("kernel_counters6"), None)
    return lines


def _impairment_lines(rules: list[dict[str, Any]] | None, counters: dict[str, Any]) -> list[str]:
    """The impairment rules in force and what they did, out / in."""
    if not rules:
        return []
    lines = [
        f"{'impaired' if i == 0 else '':<10} {rule['peer'] or 'all peers'} {rule['direction']}: "
        f"{rule['netem']}"
        for i, rule in enumerate(rules)
    ]
    done = counters.get("impaired") or {}
    drops = counters.get("drops") or {}

    def both(what: str) -> str:
        return f"{_count(done.get(f'tx_{what}', 0))} / {_count(done.get(f'rx_{what}', 0))}"

    lost = [
        sum(n for r, n in drops.items() if r.startswith(f"{side}_impair_")) for side in ("tx", "rx")
    ]
    lines.append(
        f"{'':<10} out / in: delayed {both('delayed')}, dropped {_count(lost[0])} / "
        f"{_count(lost[1])}, duplicated {both('duplicated')}, corrupted {both('corrupted')}, "
        f"reordered {both('reordered')}; queued now {counters.get('impair_queued', 0)}"
    )
    return lines


def _worker_lines(workers: list[dict[str, Any]] | None) -> list[str]:
    if not workers:
        return []
    shown = ", ".join(
        f"{w['index']}: pid {w['pid']} {'alive' if w['alive'] else 'EXITED'}" for w in workers
    )
    return [f"workers    {shown}"]


def _peer_lines(peers: list[dict[str, Any]], rates: Rates | None) -> list[str]:
    if not peers:
        return ["no peers"]
    header = (
        f"{'PEER':<18} {'PUBLIC IP':<15} {'SENT':>8} {'BYTES':>9} {'RECEIVED':>8} "
        f"{'BYTES':>9} {'LAST SENT':>10} {'LAST HEARD':>11}"
    )
    if rates is not None:
        header += f" {'OUT/S':>9} {'IN/S':>9}"
    lines = [header]
    old = {p["subnet"]: p for p in (rates.previous.get("peers", []) if rates else [])}
    for p in peers:
        row = (
            f"{p['subnet']:<18} {p['public_ip']:<15} {_count(p.get('tx_packets', 0)):>8} "
            f"{_size(p.get('tx_bytes', 0)):>9} {_count(p.get('rx_packets', 0)):>8} "
            f"{_size(p.get('rx_bytes', 0)):>9} {_ago(p.get('last_tx_s')):>10} "
            f"{_ago(p.get('last_rx_s')):>11}"
        )
        if rates is not None:
            was = old.get(p["subnet"])
            row += (
                f" {_size(rates.of(p, was, 'tx_bytes')) + '/s':>9}"
                f" {_size(rates.of(p, was, 'rx_bytes')) + '/s':>9}"
            )
        lines.append(row)
        if p.get("ipv6_subnet"):  # its IPv6 half (its traffic is counted in the row above)
            lines.append(f"  {p['ipv6_subnet']} via {p.get('public_ipv6')}")
    return lines


def _drop_lines(drops: dict[str, int], rates: Rates | None) -> list[str]:
    if not drops:
        return ["no drops"]
    header = f"{'DROPPED (reason)':<28} {'PACKETS':>10}"
    lines = [header + ("  PER SECOND" if rates is not None else "")]
    before = rates.previous.get("counters") or {} if rates is not None else {}
    old_drops = before.get("drops") or {}
    for reason, n in sorted(drops.items(), key=lambda item: (-item[1], item[0])):
        row = f"{reason:<28} {n:>10}"
        if rates is not None:
            row += f"  {rates.of(drops, old_drops, reason):>10.1f}"
        lines.append(row)
    return lines


def watch(fetch: Callable[[], dict[str, Any]], interval: float, out: Any = None) -> int:
    """Refresh the table every ``interval`` seconds with rates (clearing a terminal, one
    table after another in a pipe) until interrupted."""
    out = out or sys.stdout
    clear = out.isatty()
    previous: dict[str, Any] | None = None
    stamp = 0.0
    while True:
        now = time.monotonic()
        current = fetch()
        text = format_table(current, previous, now - stamp if previous else 0.0)
        heading = f"{datetime.now().strftime('%H:%M:%S')}, every {interval:g}s (Ctrl-C stops)"
        out.write(("\033[H\033[2J" if clear else "") + heading + "\n" + text + "\n")
        if not clear:
            out.write("\n")
        out.flush()
        previous, stamp = current, now
        time.sleep(max(interval - (time.monotonic() - now), 0.0))


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be 0.1 to 3600 seconds")
    return value


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """--json and --watch, shared with `overlay testbed status --node`."""
    parser.add_argument("--json", action="store_true", help="the full snapshot as JSON")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=_interval,
        const=1.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 1) with rates per second, until Ctrl-C",
    )


def show(path: str | os.PathLike[str], args: argparse.Namespace, prog: str) -> int:
    """Print what the daemon at ``path`` says, as ``args`` (--json, --watch) ask."""

    def fetch() -> dict[str, Any]:
        return query(path)

    try:
        if args.watch is not None:
            return watch(fetch, args.watch)
        status = fetch()
    except (OSError, ValueError) as e:
        sys.stderr.write(f"{prog}: error: no daemon answers on {path} ({e})\n")
        return 1
    except KeyboardInterrupt:
        return 0
    print(json.dumps(status, indent=2) if args.json else format_table(status))
    return 0


def main(argv: list[str]) -> int:
    parser = OneLineParser(prog="overlay status", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--status-socket",
        default=os.environ.get("FLANNELD_STATUS_SOCKET") or str(default_path()),
        help="the daemon's status socket (default: this network namespace's, as `overlay "
        "run` chooses it; FLANNELD_STATUS_SOCKET also sets it)",
    )
    add_output_flags(parser)
    args = parser.parse_args(argv)
    try:
        return show(args.status_socket, args, "overlay status")
    except BrokenPipeError:  # `overlay status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
