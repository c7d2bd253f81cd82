"""`overlay run`: flanneld's flags and FLANNELD_* variables in, the node's typed options
(``overlay.node.options``) out, and the node agent run with them.

It reads its flags the way flanneld does: Go-style single-dash long flags
(``-iface eth0``, ``-etcd-endpoints=...``, ``-ip-masq``, ``-v=2``) as well as ``--flag``,
and every flag also from ``FLANNELD_<FLAG>``, where a flag given on the command line wins
over its variable. Unlike flanneld, a bad value in a variable is an error naming the
variable, never a silent default.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from control.config import SUPPORTED_BACKENDS
from control.etcd_endpoints import Endpoint, TlsFiles, parse_endpoints
from control.lease import DEFAULT_PREFIX
from overlay.backends.base import DatapathOptions
from overlay.cli.parser import BoolFlag, OneLineParser, integer, parse_bool, seconds
from overlay.impair.rules import Change, Rules
from overlay.impair.spec import ImpairError
from overlay.node.daemon import run
from overlay.node.iptables import IptablesOptions
from overlay.node.options import PEER_SERIES, NodeOptions
from overlay.node.registry import RegistryOptions
from overlay.node.underlay import UnderlayOptions
from overlay.observe.log import LogOptions
from overlay.observe.status_socket import default_path
from overlay.observe.version import version

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
    "subnet-dir": "flanneld's multi-network mode is not supported (one network per daemon)",
}
# klog flags flanneld copies; accepted so its unit files start, ignored with a warning.
IGNORED = ("vmodule", "log_backtrace_at")


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


def _any_address(text: str) -> IPv4Address | IPv6Address:
    try:
        return ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _address6(text: str) -> IPv6Address:
    try:
        return IPv6Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv6 address") from None


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


def _impairment(text: str) -> Change:
    try:
        return Change.from_words(text)
    except ImpairError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {e}") from None
    return text


# A multi-queue TUN has at most this many queues (MAX_TAP_QUEUES in the kernel).
MAX_WORKERS = 256
# flanneld: the margin is whole minutes, less than the 24 h lease.
_margin = integer("a number of minutes", "minutes", 1, 24 * 60 - 1, " (less than the 24 h lease)")
_workers = integer("a number of workers", "workers", 1, MAX_WORKERS, " (a TUN's queue limit)")
# --busy-poll-us: a poll window beyond 10 ms would stall the event loop's other work
# (status, watch, renewals) for longer than a scheduler tick; 0 turns it off.
MAX_BUSY_POLL_US = 10_000
_busy_poll_us = integer(
    "a number of microseconds", "us", 0, MAX_BUSY_POLL_US, " (0 turns busy-polling off)"
)
_verbosity = integer("a log level", "(log level)", 0)
_port = integer("a port number", "(port)", 0, 65535)
_resync = integer("a number of seconds", "seconds", 1)
_peer_limit = integer("a number of peers", "peers", 0)


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
            type=seconds,
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
            help="interface (name, IPv4 or IPv6 address) for inter-node traffic; "
            "repeatable, the first that exists wins",
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
            type=_any_address,
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
            "--public-ipv6",
            type=_address6,
            help="IPv6 address other nodes use to reach us with EnableIPv6 (default: the "
            "interface's first global unicast IPv6 address)",
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
            "--ip-masq-fully-random-disable",
            action=BoolFlag,
            default=False,
            help="with --ip-masq, a plain MASQUERADE instead of MASQUERADE --random-fully "
            "(EnableNFTables: masquerade without fully-random)",
        )
        add(
            "--ip-blackhole-route",
            action=BoolFlag,
            default=False,
            help="add a blackhole route for this node's pod subnets (each family), so "
            "traffic to an unused pod address is dropped here, not routed out",
        )
        add(
            "--iptables-resync",
            type=_resync,
            default=5,
            help="re-check (and repair) our iptables rules, or with EnableNFTables our nftables "
            "tables, every this many seconds (default 5)",
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
            "--metrics-peer-limit",
            type=_peer_limit,
            default=PEER_SERIES,
            help="/metrics has per-peer series for at most this many peers: all of them up "
            f"to that many, else the busiest (most bytes); 0 = none (default {PEER_SERIES})",
        )
        add(
            "--status-socket",
            help="Unix socket (0600) `overlay status`, `trace` and `impair` talk to (default: "
            "per network namespace, /run/flannel/overlay.sock in the machine's own, "
            "/run/flannel/netns/<name>/overlay.sock in one `ip netns` named)",
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
            "--impair",
            action="append",
            type=_impairment,
            default=[],
            metavar="'[peer SUBNET] [direction out|in|both] NETEM'",
            help="udp and userspace vxlan: impair the datapath from the start as netem "
            "would, e.g. 'delay 20ms 5ms loss 1%%' (every peer, what we send) or 'peer "
            "198.18.3.0/24 direction in rate 10mbit'; repeatable; `overlay impair` changes "
            "it while running",
        )
        add(
            "--busy-poll-us",
            type=_busy_poll_us,
            default=0,
            help="udp and userspace vxlan: after each wake-up keep polling the TUN and the "
            "socket for up to N microseconds before going back to the event loop (lower "
            "ping RTT for CPU; as net.core.busy_read; default 0: off)",
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
            convert: Any = action.type or str
            if isinstance(action, argparse._AppendAction):
                # One variable for a repeatable flag: comma-separated values.
                return [convert(part.strip()) for part in text.split(",") if part.strip()]
            value = convert(text)
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
        if args.etcd_endpoints and (args.etcd_username is None) != (args.etcd_password is None):
            self.parser.error("--etcd-username and --etcd-password go together")
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


def parse_run_args(
    argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """`overlay run`'s flags, then FLANNELD_* for those not given, then the defaults."""
    return RunFlags().parse(argv, os.environ if environ is None else environ)


def run_parser() -> OneLineParser:
    """The argparse parser alone (for --help and tools that list the flags)."""
    return RunFlags().parser


def options_from(args: argparse.Namespace) -> NodeOptions:
    """The typed options the node runs with: everything below the front end gets these,
    never the flags."""
    return NodeOptions(
        registry=RegistryOptions(
            etcd_endpoints=tuple(args.etcd_endpoints or ()),
            etcd_tls=TlsFiles(args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile),
            etcd_username=args.etcd_username,
            etcd_password=args.etcd_password,
            prefix=args.etcd_prefix,
            file=Path(args.registry_file),
            timeout=args.registry_timeout,
            renew_margin=args.subnet_lease_renew_margin * 60,
        ),
        underlay=UnderlayOptions(
            iface=tuple(args.iface),
            iface_regex=tuple(args.iface_regex),
            iface_can_reach=args.iface_can_reach,
            public_ip=args.public_ip,
            public_ipv6=args.public_ipv6,
        ),
        datapath=DatapathOptions(
            tun_name=args.tun_name,
            vxlan_datapath=args.vxlan_datapath,
            offload=not args.no_offload,
            tun_tso=not args.no_tun_tso,
            workers=args.workers,
            impairment=_rules(args.impair),
            busy_poll_us=args.busy_poll_us,
        ),
        iptables=IptablesOptions(
            ip_masq=args.ip_masq,
            forward_rules=args.iptables_forward_rules,
            resync=args.iptables_resync,
            random_fully_disable=args.ip_masq_fully_random_disable,
        ),
        log=LogOptions(args.log_format, args.v),
        subnet_file=Path(args.subnet_file),
        status_socket=Path(args.status_socket) if args.status_socket else default_path(),
        healthz_ip=args.healthz_ip,
        healthz_port=args.healthz_port,
        metrics_peer_limit=args.metrics_peer_limit,
        seed_network=args.network,
        seed_backend=args.backend,
        blackhole_route=args.ip_blackhole_route,
        ignored_flags=tuple(args.ignored_flags),
    )


def _rules(changes: list[Change]) -> Rules:
    rules = Rules()
    for change in changes:
        rules = rules.changed(change)
    return rules


def main(argv: Sequence[str]) -> int:
    """`overlay run`: flags in, the node agent runs with the options they make."""
    return run(options_from(parse_run_args(argv)))
