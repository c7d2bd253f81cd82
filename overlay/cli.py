"""The `overlay` command: `run` (the daemon), `status`, `testbed`, `bench`.

`overlay run` reads its flags the way flanneld does: Go-style single-dash long flags
(``-iface eth0``, ``-etcd-endpoints=...``, ``-ip-masq``, ``-v=2``) as well as ``--flag``,
and every flag also from ``FLANNELD_<FLAG>``, where a flag given on the command line wins
over its variable. Unlike flanneld, a bad value in a variable is an error naming the
variable, never a silent default.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from ipaddress import IPv4Address, IPv4Network, ip_address
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

PROG = "overlay run"
ENV_PREFIX = "FLANNELD_"

# flanneld flags that only mean something with its Kubernetes subnet manager.
KUBE_ONLY = (
    "kube-subnet-mgr",
    "kube-api-url",
    "kubeconfig-file",
    "kube-annotation-prefix",
    "net-config-path",
    "set-node-network-unavailable",
    "use-multi-cluster-cidr",
    "persistent-mac",
)
# flanneld flags we recognise but do not implement, and why (one line each).
UNSUPPORTED = {
    "public-ipv6": "IPv6 is not supported (the overlay is IPv4 only)",
    "subnet-dir": "flanneld's multi-network mode is not supported (one network per daemon)",
}
# klog flags flanneld copies; accepted so its unit files start, ignored with a warning.
IGNORED = ("vmodule", "log_backtrace_at")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# -- value parsers (each raises ArgumentTypeError with a short reason) -------------------


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool (flanneld's bool flags), plus yes/no/on/off."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


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


def _listen_address(text: str) -> str:
    try:
        return str(ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _endpoints(text: str) -> list[Endpoint]:
    try:
        return parse_endpoints(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {e}") from None
    return text


def _integer(
    what: str, unit: str, low: int, high: int | None = None, why: str = ""
) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (high is not None and value > high):
            bound = f"{low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} {unit}: must be {bound}{why}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0")
    return value


# A multi-queue TUN has at most this many queues (MAX_TAP_QUEUES in the kernel).
MAX_WORKERS = 256
# flanneld: the margin is whole minutes, less than the 24 h lease.
_margin = _integer("a number of minutes", "minutes", 1, 24 * 60 - 1, " (less than the 24 h lease)")
_workers = _integer("a number of workers", "workers", 1, MAX_WORKERS, " (a TUN's queue limit)")
_verbosity = _integer("a log level", "(log level)", 0)
_port = _integer("a port number", "(port)", 0, 65535)
_resync = _integer("a number of seconds", "seconds", 1)


class BoolFlag(argparse.Action):
    """A Go bool flag: ``--flag`` sets it, ``--flag=false`` (or ``--flag false``) clears it."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("metavar", "BOOL")
        super().__init__(option_strings, dest, nargs="?", const="true", **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        try:
            setattr(namespace, self.dest, parse_bool(str(values)))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None


# -- the parser ----------------------------------------------------------------------------


class RunFlags:
    """Defaults, and the FLANNELD_* variable of every flag, beside the argparse parser."""

    def __init__(self) -> None:
        self.parser = OneLineParser(
            prog=PROG,
            description="The per-node overlay daemon, a drop-in for flanneld. Every flag "
            "can also be given as FLANNELD_<FLAG> (dashes to underscores, e.g. "
            "FLANNELD_IFACE=eth0); a flag on the command line wins over its variable. "
            "Go-style single-dash flags (-iface eth0, -ip-masq) work too.",
            argument_default=argparse.SUPPRESS,
        )
        self.defaults: dict[str, Any] = {}
        self._add_flags()

    def add(self, *names: str, default: Any = None, **kwargs: Any) -> None:
        action = self.parser.add_argument(*names, **kwargs)
        self.defaults[action.dest] = default

    def _add_flags(self) -> None:
        add = self.add
        add(
            "--registry-file",
            default="/run/flannel/registry.json",
            help="the embedded file registry shared by the daemons of this machine, used "
            "when no --etcd-endpoints is given (default /run/flannel/registry.json)",
        )
        add(
            "--etcd-endpoints",
            type=_endpoints,
            help="comma-separated etcd URLs (http(s)://host:port); without it the embedded "
            "file registry is used (flanneld defaults to http://127.0.0.1:2379)",
        )
        add("--etcd-cafile", help="CA to verify etcd with")
        add("--etcd-certfile", help="client certificate for etcd")
        add("--etcd-keyfile", help="its private key")
        add("--etcd-username", help="etcd user")
        add("--etcd-password", help="etcd password (prefer FLANNELD_ETCD_PASSWORD: not in ps)")
        add(
            "--etcd-prefix",
            default=DEFAULT_PREFIX,
            help=f"registry key prefix (default {DEFAULT_PREFIX})",
        )
        add(
            "--registry-timeout",
            type=_seconds,
            default=60.0,
            help="at startup, keep retrying an unreachable registry this many seconds "
            "before giving up (default 60)",
        )
        add(
            "--network",
            type=_network,
            help="seed the registry's network config with this CIDR if it has none",
        )
        add(
            "--backend",
            choices=SUPPORTED_BACKENDS,
            help="backend type for the seeded config (default udp, as flannel)",
        )
        add(
            "--iface",
            action="append",
            default=[],
            help="interface (name or IPv4 address) for inter-node traffic; repeatable, the "
            "first that exists wins",
        )
        add(
            "--iface-regex",
            action="append",
            type=_regex,
            default=[],
            help="regular expression matched against interface addresses, then names; "
            "repeatable, checked after --iface",
        )
        add(
            "--iface-can-reach",
            type=_address,
            help="use the interface (and source address) the kernel would use to reach "
            "this address (`ip route get`), checked after --iface and --iface-regex",
        )
        add(
            "--public-ip",
            type=_address,
            help="IP address other nodes use to reach us (default: the interface's address; "
            "host-gw requires them to be the same)",
        )
        add(
            "--subnet-file",
            default="/run/flannel/subnet.env",
            help="where to write subnet.env for the CNI plugin (default /run/flannel/subnet.env)",
        )
        add(
            "--subnet-lease-renew-margin",
            type=_margin,
            default=60,
            help="renew the 24 h lease this many minutes before it expires, 1 to 1439 (default 60)",
        )
        add(
            "--ip-masq",
            action=BoolFlag,
            default=False,
            help="masquerade pod traffic leaving the overlay network (flanneld's "
            "FLANNEL-POSTRTG rules) and write FLANNEL_IPMASQ=true",
        )
        add(
            "--iptables-resync",
            type=_resync,
            default=5,
            help="re-check (and repair) our iptables rules every this many seconds (default 5)",
        )
        add(
            "--iptables-forward-rules",
            action=BoolFlag,
            default=True,
            help="accept the overlay network in the FORWARD chain (FLANNEL-FWD), so a DROP "
            "policy does not break forwarding (default true; =false to disable)",
        )
        add(
            "--healthz-ip",
            type=_listen_address,
            default="0.0.0.0",
            help="address of the health server (/healthz, /readyz, /metrics; default 0.0.0.0)",
        )
        add(
            "--healthz-port",
            type=_port,
            default=0,
            help="port of the health server, 0 = disabled (default 0)",
        )
        add(
            "--status-socket",
            default="/run/flannel/overlay.sock",
            help="Unix socket `overlay status` reads (default /run/flannel/overlay.sock)",
        )
        add("--tun-name", default="flannel0", help="TUN device (default flannel0)")
        add(
            "--vxlan-datapath",
            choices=("userspace", "kernel", "auto"),
            default="userspace",
            help="vxlan backend only: this process (default), the kernel's vxlan device "
            "flannel.<VNI> as flanneld sets it up, or auto (kernel when it has vxlan)",
        )
        add(
            "--kernel-vxlan",
            action=BoolFlag,
            default=False,
            help="short for --vxlan-datapath kernel",
        )
        add(
            "--no-offload",
            action=BoolFlag,
            default=False,
            help="force the plain per-packet path (no UDP GSO/GRO, no TUN offloads)",
        )
        add(
            "--no-tun-tso",
            action=BoolFlag,
            default=False,
            help="read packets from the TUN one by one instead of as 64 KiB TCP "
            "super-packets cut into segments here (TSO, on by default with the offloads)",
        )
        add(
            "--workers",
            type=_workers,
            default=1,
            help="forwarding processes for the udp and userspace vxlan backends, one per "
            "queue of a multi-queue TUN, each with its own SO_REUSEPORT socket (default 1)",
        )
        add(
            "-v",
            "--v",
            dest="v",
            type=_verbosity,
            default=0,
            help="log verbosity, as flanneld's glog: 0 lifecycle, warnings and the first drop "
            "of each reason; 1 datapath errors (drop summaries every 5 s); 2 every event",
        )
        add(
            "--log-format",
            choices=("console", "json"),
            default="console",
            help="console (default) or json lines",
        )
        self.parser.add_argument(
            "--version", action="store_true", help="print the version and exit"
        )
        for name in KUBE_ONLY:
            add(f"--{name}", dest=_dest(name), nargs="?", const="true", help=argparse.SUPPRESS)
        for name in UNSUPPORTED:
            add(f"--{name}", dest=_dest(name), help=argparse.SUPPRESS)
        for name in IGNORED:
            add(f"--{name}", dest=_dest(name), help=argparse.SUPPRESS)

    # -- parsing -----------------------------------------------------------------------

    def long_names(self) -> set[str]:
        return {
            option[2:]
            for action in self.parser._actions
            for option in action.option_strings
            if option.startswith("--")
        }

    def parse(self, argv: Sequence[str], environ: Mapping[str, str]) -> argparse.Namespace:
        args = self.parser.parse_args(go_style(argv, self.long_names()))
        if getattr(args, "version", False):
            print(f"overlay {version()}")
            raise SystemExit(0)
        given: set[str] = set()
        for action in self.parser._actions:
            if action.dest in ("help", "version"):
                continue
            if hasattr(args, action.dest):
                given.add(action.dest)
                continue
            env = env_name(action)
            text = environ.get(env, "")
            if text != "":  # flanneld: an empty variable leaves the default
                setattr(args, action.dest, self._from_env(action, env, text))
                given.add(action.dest)
            else:
                setattr(args, action.dest, self.defaults.get(action.dest))
        args.version = False
        self._check(args, given)
        return args

    def _from_env(self, action: argparse.Action, env: str, text: str) -> Any:
        try:
            if isinstance(action, BoolFlag):
                return parse_bool(text)
            if action.nargs == "?" and action.const == "true":  # a kube-only bool
                return text
            convert = action.type or str
            if isinstance(action, argparse._AppendAction):
                # One variable for a repeatable flag: comma-separated values.
                return [convert(part.strip()) for part in text.split(",") if part.strip()]
            value = convert(text)  # type: ignore[operator]
            if action.choices is not None and value not in action.choices:
                choices = ", ".join(map(str, action.choices))
                raise argparse.ArgumentTypeError(f"{text!r} is not one of {choices}")
            return value
        except argparse.ArgumentTypeError as e:
            self.parser.error(f"{env}={text!r}: {e}")

    def _check(self, args: argparse.Namespace, given: set[str]) -> None:
        for name in KUBE_ONLY:
            value = getattr(args, _dest(name))
            if value is None or (isinstance(value, str) and _is_false(value)):
                continue
            self.parser.error(
                f"--{name}: flanneld's Kubernetes subnet manager is not supported; only "
                "etcd (--etcd-endpoints) and the embedded file registry (--registry-file) are"
            )
        for name, why in UNSUPPORTED.items():
            if getattr(args, _dest(name)) is not None:
                self.parser.error(f"--{name}: {why}")
        args.ignored_flags = [f"--{name}" for name in IGNORED if getattr(args, _dest(name))]
        if args.kernel_vxlan:
            if "vxlan_datapath" in given and args.vxlan_datapath != "kernel":
                self.parser.error(
                    f"--kernel-vxlan contradicts --vxlan-datapath {args.vxlan_datapath}: "
                    "give one of them"
                )
            args.vxlan_datapath = "kernel"


def _dest(name: str) -> str:
    return name.replace("-", "_")


def _is_false(text: str) -> bool:
    try:
        return not parse_bool(text)
    except argparse.ArgumentTypeError:
        return False


def env_name(action: argparse.Action) -> str:
    """FLANNELD_<FLAG> of an action: its first long option, dashes to underscores."""
    long = next(o for o in action.option_strings if o.startswith("--"))
    return ENV_PREFIX + long[2:].upper().replace("-", "_")


def go_style(argv: Sequence[str], long_names: set[str]) -> list[str]:
    """``-name`` / ``-name=value`` (Go's flag package) as ``--name`` for our long flags."""
    result = []
    rest = False
    for token in argv:
        if rest or token == "--":
            rest = True
        elif token.startswith("-") and not token.startswith("--") and len(token) > 2:
            if token[1:].split("=", 1)[0] in long_names:
                token = "-" + token
        result.append(token)
    return result


def version() -> str:
    try:
        return metadata.version("flannel-overlay")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parse_run_args(
    argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """`overlay run`'s flags, then FLANNELD_* for those not given, then the defaults."""
    return RunFlags().parse(argv, os.environ if environ is None else environ)


def run_parser() -> OneLineParser:
    """The argparse parser alone (for --help and tools that list the flags)."""
    return RunFlags().parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run":
        from overlay.daemon import run

        return run(parse_run_args(rest))
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
    if command in ("--version", "-version", "version"):
        print(f"overlay {version()}")
        return 0
    sys.stderr.write(f"overlay: error: unknown command {command!r} (see `overlay --help`)\n")
    return 2
