"""The `overlay` command: `run` (the daemon), `status`, `testbed`, `bench`."""

from __future__ import annotations

import argparse
import os
import sys
from ipaddress import IPv4Address, IPv4Network
from typing import Any, NoReturn

from control.config import SUPPORTED_BACKENDS
from control.etcd_registry import Endpoint, parse_endpoints
from control.lease import DEFAULT_PREFIX

USAGE = """usage: overlay <command> [options]

commands:
  run       the per-node daemon (flanneld's flags; see `overlay run --help`)
  status    what a running daemon knows: lease, registry, peers, counters (--json, --watch)
  trace     capture what crosses a running daemon as pcapng (tcpdump-like; see --help)
  testbed   build/tear down a network-namespace testbed (up|down|status|exec)
  bench     the benchmark matrix -> bench/results/ (see `overlay bench --help`)
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _env(name: str, default: Any = None) -> Any:
    """Every flag can also be set as FLANNELD_<FLAG> (dashes -> underscores), as in flanneld."""
    return os.environ.get("FLANNELD_" + name.upper().replace("-", "_"), default)


def _env_bool(name: str) -> bool:
    value = _env(name)
    if value is None:
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    sys.exit(f"overlay run: error: FLANNELD_{name.upper()}={value!r} is not true or false")


def _network(text: str) -> IPv4Network:
    try:
        return IPv4Network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 CIDR") from None


def _address(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def _endpoints(text: str) -> list[Endpoint]:
    try:
        return parse_endpoints(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


# A multi-queue TUN has at most this many queues (MAX_TAP_QUEUES in the kernel).
MAX_WORKERS = 256


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535)")
    return int(text)


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"{value} workers: must be 1 to {MAX_WORKERS} (a TUN's queue limit)"
        )
    return value


def run_parser() -> OneLineParser:
    p = OneLineParser(
        prog="overlay run",
        description="The per-node overlay daemon. Every flag can also be given as a "
        "FLANNELD_<FLAG> environment variable (e.g. FLANNELD_IFACE=eth0).",
    )
    p.add_argument(
        "--registry-file",
        default=_env("registry-file", "/run/flannel/registry.json"),
        help="the embedded file registry shared by the daemons of this machine "
        "(default /run/flannel/registry.json)",
    )
    p.add_argument(
        "--etcd-endpoints",
        type=_endpoints,
        default=_env("etcd-endpoints"),
        help="comma-separated etcd URLs (http(s)://host:port); without it the embedded file "
        "registry is used",
    )
    p.add_argument("--etcd-cafile", default=_env("etcd-cafile"), help="CA to verify etcd with")
    p.add_argument(
        "--etcd-certfile", default=_env("etcd-certfile"), help="client certificate for etcd"
    )
    p.add_argument("--etcd-keyfile", default=_env("etcd-keyfile"), help="its private key")
    p.add_argument("--etcd-username", default=_env("etcd-username"), help="etcd user")
    p.add_argument("--etcd-password", default=_env("etcd-password"), help="etcd password")
    p.add_argument(
        "--registry-timeout",
        type=float,
        default=_env("registry-timeout", "60"),
        help="at startup, keep retrying an unreachable registry this many seconds before "
        "giving up (default 60)",
    )
    p.add_argument(
        "--etcd-prefix",
        default=_env("etcd-prefix", DEFAULT_PREFIX),
        help=f"registry key prefix (default {DEFAULT_PREFIX})",
    )
    p.add_argument(
        "--network",
        type=_network,
        default=_env("network"),
        help="seed the registry's network config with this CIDR if it has none",
    )
    p.add_argument(
        "--backend",
        choices=SUPPORTED_BACKENDS,
        default=_env("backend"),
        help="backend type for the seeded config (default udp, as flannel)",
    )
    p.add_argument(
        "--iface",
        action="append",
        default=[v for v in [_env("iface")] if v],
        help="interface (name or address) for inter-node traffic; repeatable, first "
        "that exists wins (default: the default route's interface, else the only one)",
    )
    p.add_argument(
        "--public-ip",
        type=_address,
        default=_env("public-ip"),
        help="IP address other nodes use to reach us (default: the interface's address)",
    )
    p.add_argument(
        "--subnet-file",
        default=_env("subnet-file", "/run/flannel/subnet.env"),
        help="where to write the subnet.env for the CNI plugin (default /run/flannel/subnet.env)",
    )
    p.add_argument(
        "--subnet-lease-renew-margin",
        type=_minutes,
        default=_env("subnet-lease-renew-margin", "60"),
        help="renew the lease this many minutes before it expires (default 60)",
    )
    p.add_argument(
        "--status-socket",
        default=_env("status-socket", "/run/flannel/overlay.sock"),
        help="Unix socket `overlay status` reads (default /run/flannel/overlay.sock)",
    )
    p.add_argument(
        "--healthz-ip",
        type=_address,
        default=_env("healthz-ip", "0.0.0.0"),
        help="address of the health server (/healthz, /readyz, /metrics; default 0.0.0.0)",
    )
    p.add_argument(
        "--healthz-port",
        type=_port,
        default=_env("healthz-port", "0"),
        help="port of the health server (default 0: none, as flanneld)",
    )
    p.add_argument(
        "--tun-name", default=_env("tun-name", "flannel0"), help="TUN device (default flannel0)"
    )
    p.add_argument(
        "--vxlan-datapath",
        choices=("userspace", "kernel", "auto"),
        default=_env("vxlan-datapath", "userspace"),
        help="vxlan backend only: this process (default), the kernel's vxlan device "
        "flannel.<VNI> as flanneld sets it up, or auto (kernel when it has vxlan)",
    )
    p.add_argument(
        "--kernel-vxlan",
        dest="vxlan_datapath",
        action="store_const",
        const="kernel",
        help="short for --vxlan-datapath kernel",
    )
    p.add_argument(
        "--no-offload",
        action="store_true",
        default=_env_bool("no-offload"),
        help="force the plain per-packet path (no UDP GSO/GRO, no TUN offloads)",
    )
    p.add_argument(
        "--no-tun-tso",
        action="store_true",
        default=_env_bool("no-tun-tso"),
        help="read packets from the TUN one by one instead of as 64 KiB TCP super-packets "
        "cut into segments here (TSO, on by default with the other offloads)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=_env("workers", "1"),
        help="forwarding processes for the udp and userspace vxlan backends, one per queue "
        "of a multi-queue TUN, each with its own SO_REUSEPORT socket (default 1)",
    )
    p.add_argument(
        "-v",
        type=int,
        default=int(_env("v", "0")) if str(_env("v", "0")).isdigit() else 0,
        help="log verbosity, as flanneld's glog: 0 lifecycle, warnings and the first drop of "
        "each reason; 1 datapath errors (drop summaries every 5 s); 2 every event",
    )
    p.add_argument(
        "--log-format",
        choices=("console", "json"),
        default=_env("log-format", "console"),
        help="console (default) or json lines",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run":
        from overlay.daemon import run

        return run(run_parser().parse_args(rest))
    if command == "status":
        from overlay import status

        return status.main(rest)
    if command == "trace":
        from overlay import trace

        return trace.main(rest)
    if command == "testbed":
        from overlay import testbed

        return testbed.main(rest)
    if command == "bench":
        from bench import report

        return report.main(rest)
    sys.stderr.write(f"overlay: error: unknown command {command!r} (see `overlay --help`)\n")
    return 2
