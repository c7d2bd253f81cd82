"""`overlay run` reads flags and FLANNELD_* variables the way flanneld does, and the network
config keys we do not support say so instead of being ignored."""

from __future__ import annotations

import argparse
import os
import subprocess
from ipaddress import IPv6Address

import pytest

from control.config import ConfigError, parse_config
from overlay.cli.run import options_from, parse_run_args
from overlay.observe import status_socket
from tests.helpers.commands import overlay_cmd


def parse(*argv: str, **env: str) -> argparse.Namespace:
    return parse_run_args(list(argv), env)


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str, **env: str) -> str:
    """The one-line error (exit 2) that argv/env give."""
    with pytest.raises(SystemExit) as exit_info:
        parse_run_args(list(argv), env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("overlay run: error: "), err
    return err


# -- precedence and variables -------------------------------------------------------------


def test_flag_wins_over_its_variable() -> None:
    args = parse("--iface", "eth0", "-v", "1", FLANNELD_IFACE="eth1", FLANNELD_V="3")
    assert args.iface == ["eth0"] and args.v == 1  # not ["eth1", "eth0"], not 3


def test_variable_used_when_the_flag_is_absent() -> None:
    args = parse(
        FLANNELD_IFACE="eth1,10.0.0.1",
        FLANNELD_V="3",
        FLANNELD_IP_MASQ="true",
        FLANNELD_SUBNET_LEASE_RENEW_MARGIN="120",
        FLANNELD_IPTABLES_FORWARD_RULES="false",
        FLANNELD_HEALTHZ_PORT="8471",
    )
    assert args.iface == ["eth1", "10.0.0.1"]
    assert args.v == 3 and args.ip_masq is True and args.subnet_lease_renew_margin == 120
    assert args.iptables_forward_rules is False and args.healthz_port == 8471


def test_empty_variable_leaves_the_default() -> None:
    assert parse(FLANNELD_V="", FLANNELD_IFACE="").v == 0  # flanneld: "" is unset


def test_every_flag_has_its_variable() -> None:
    assert parse(FLANNELD_KERNEL_VXLAN="1").vxlan_datapath == "kernel"
    assert parse(FLANNELD_NO_OFFLOAD="true").no_offload is True
    assert parse(FLANNELD_WORKERS="2").workers == 2
    assert parse(FLANNELD_BUSY_POLL_US="50").busy_poll_us == 50
    assert parse(FLANNELD_IFACE_REGEX="^eth").iface_regex == ["^eth"]
    assert str(parse(FLANNELD_IFACE_CAN_REACH="192.0.2.9").iface_can_reach) == "192.0.2.9"


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("FLANNELD_V", "abc", "'abc' is not a log level"),
        ("FLANNELD_IP_MASQ", "maybe", "'maybe' is not true or false"),
        ("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "0", "must be 1 to 1439"),
        ("FLANNELD_BACKEND", "ipsec", "is not one of udp, vxlan, host-gw"),
        ("FLANNELD_PUBLIC_IP", "300.1.1.1", "is not an IPv4 address"),
        ("FLANNELD_HEALTHZ_PORT", "70000", "must be 0 to 65535"),
    ],
)
def test_bad_variable_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], env: str, value: str, message: str
) -> None:
    err = usage_error(capsys, **{env: value})
    assert f"{env}={value!r}" in err and message in err, err


def test_bad_variable_from_the_command_line() -> None:
    """The real process: FLANNELD_V=abc used to become 0 silently."""
    env = dict(os.environ, FLANNELD_V="abc")
    result = subprocess.run(overlay_cmd("run"), capture_output=True, text=True, env=env, timeout=20)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "FLANNELD_V='abc'" in result.stderr


# -- flanneld's spelling -------------------------------------------------------------------


def test_go_style_single_dash_flags() -> None:
    args = parse(
        "-iface",
        "eth0",
        "-etcd-endpoints=http://192.0.2.9:2379",
        "-ip-masq",
        "-v=2",
        "-subnet-lease-renew-margin=30",
        "-iptables-forward-rules=false",
    )
    assert args.iface == ["eth0"] and args.ip_masq is True and args.v == 2
    assert [str(e) for e in args.etcd_endpoints] == ["http://192.0.2.9:2379"]
    assert args.subnet_lease_renew_margin == 30 and args.iptables_forward_rules is False


def test_go_bool_flag_forms() -> None:
    assert parse("--ip-masq").ip_masq is True
    assert parse("--ip-masq=false").ip_masq is False
    assert parse("--ip-masq=1").ip_masq is True
    assert parse("--iptables-forward-rules=0").iptables_forward_rules is False
    assert parse("--v", "4").v == 4


def test_defaults_as_flanneld() -> None:
    args = parse()
    assert args.ip_masq is False and args.iptables_forward_rules is True
    assert args.iptables_resync == 5 and args.subnet_lease_renew_margin == 60
    assert args.healthz_ip == "0.0.0.0" and args.healthz_port == 0
    assert args.etcd_endpoints is None  # the embedded file registry, our one-machine default
    assert args.iface == [] and args.iface_regex == [] and args.iface_can_reach is None


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("--version")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("overlay ")
    result = subprocess.run(overlay_cmd("run", "-version"), capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("overlay ")


@pytest.mark.parametrize("margin", ["0", "1440", "60.5", "-1"])
def test_renew_margin_range(capsys: pytest.CaptureFixture[str], margin: str) -> None:
    err = usage_error(capsys, "--subnet-lease-renew-margin", margin)
    assert "--subnet-lease-renew-margin" in err


def test_renew_margin_bounds_accepted() -> None:
    assert parse("--subnet-lease-renew-margin", "1").subnet_lease_renew_margin == 1
    assert parse("--subnet-lease-renew-margin", "1439").subnet_lease_renew_margin == 1439


@pytest.mark.parametrize(
    "argv",
    [
        ["--kube-subnet-mgr"],
        ["--kube-subnet-mgr=true"],
        ["--kube-api-url", "https://10.0.0.1:6443"],
        ["--kubeconfig-file", "/etc/kubernetes/kubeconfig"],
        ["--net-config-path", "/etc/kube-flannel/net-conf.json"],
        ["-kube-subnet-mgr"],
    ],
)
def test_kube_only_flags_say_so(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    err = usage_error(capsys, *argv)
    assert "only etcd (--etcd-endpoints) and the embedded file registry" in err, err


def test_kube_subnet_mgr_false_is_harmless() -> None:
    parse("--kube-subnet-mgr=false")
    parse(FLANNELD_KUBE_SUBNET_MGR="false")


def test_daemonset_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """kube-flannel.yml's args: the kube subnet manager is refused in one line; the rest
    of them (with etcd instead) parse."""
    err = usage_error(capsys, "--ip-masq", "--kube-subnet-mgr", "--healthz-port=10256")
    assert "--kube-subnet-mgr" in err
    args = parse("--ip-masq", "--etcd-endpoints=http://192.0.2.9:2379", "--healthz-port=10256")
    assert args.ip_masq and args.healthz_port == 10256


def test_unsupported_and_ignored_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert "multi-network" in usage_error(capsys, "--subnet-dir", "/run/flannel/networks")
    assert parse("-vmodule=main=2").ignored_flags == ["--vmodule"]


def test_flanneld_ipv6_and_newer_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """--public-ipv6, --ip-blackhole-route (RKE2 passes it), --ip-masq-fully-random-disable:
    flanneld's defaults (unset, false, false), its spellings, and their typed options."""
    defaults = options_from(parse())
    assert defaults.underlay.public_ipv6 is None and defaults.blackhole_route is False
    assert defaults.iptables.random_fully_disable is False
    options = options_from(
        parse("-public-ipv6=2001:db8::7", "--ip-blackhole-route", "-ip-masq-fully-random-disable")
    )
    assert options.underlay.public_ipv6 == IPv6Address("2001:db8::7")
    assert options.blackhole_route and options.iptables.random_fully_disable
    from_env = options_from(
        parse(FLANNELD_IP_BLACKHOLE_ROUTE="true", FLANNELD_PUBLIC_IPV6="fd00::7")
    )
    assert from_env.blackhole_route and from_env.underlay.public_ipv6 == IPv6Address("fd00::7")
    assert "is not an IPv6 address" in usage_error(capsys, "--public-ipv6", "192.0.2.1")
    assert parse("--iface", "2001:db8::7").iface == ["2001:db8::7"]


def test_kernel_vxlan_and_datapath(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse("--kernel-vxlan").vxlan_datapath == "kernel"
    assert parse("--kernel-vxlan", "--vxlan-datapath", "kernel").vxlan_datapath == "kernel"
    assert "contradicts" in usage_error(capsys, "--kernel-vxlan", "--vxlan-datapath", "auto")


def test_iface_regex_must_compile(capsys: pytest.CaptureFixture[str]) -> None:
    assert "not a regular expression" in usage_error(capsys, "--iface-regex", "[")
    assert parse("--iface-regex", "^en", "--iface-regex", "192\\.0\\.2\\.").iface_regex == [
        "^en",
        "192\\.0\\.2\\.",
    ]


# -- network config keys -------------------------------------------------------------------

NET = {"Network": "10.244.0.0/16"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"EnableIPv6": True}, "IPv6Network: missing with EnableIPv6"),
        ({"Backend": {"Type": "vxlan", "GBP": True}}, "Backend.GBP: true is not supported"),
        ({"Backend": {"Type": "vxlan", "MTU": 20}}, "Backend.MTU: 20 is not an IPv4 MTU"),
        ({"Backend": {"Type": "vxlan", "MTU": "1400"}}, "Backend.MTU: '1400' is not an integer"),
        ({"Backend": {"Type": "vxlan", "Learning": "yes"}}, "Backend.Learning: 'yes' is not"),
    ],
)
def test_unsupported_config_is_an_error(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config({**NET, **extra})


def test_ignored_config_keys_are_warnings() -> None:
    config = parse_config(
        {
            **NET,
            "EnableIPv6": False,
            "IPv6Network": "fc00::/48",
            "Networks": ["10.245.0.0/16"],
            "Colour": "blue",
            "Backend": {"Type": "udp", "Port": 8285, "VNI": 2},
        }
    )
    text = "\n".join(config.warnings)
    assert "IPv6Network: ignored without EnableIPv6" in text
    assert "Networks: flanneld's multi-CIDR list" in text
    assert "Colour: unknown key, ignored" in text
    assert "Backend.vni: not a udp option, ignored" in text
    assert len(config.warnings) == 4


def test_enable_nftables_is_read_not_warned_about() -> None:
    """flanneld's own nftables tables (overlay/kernel/nftables.py) in place of iptables."""
    assert parse_config({**NET, "EnableNFTables": True}).enable_nftables is True
    assert parse_config({**NET, "enablenftables": True}).warnings == ()
    assert parse_config(NET).enable_nftables is False
    with pytest.raises(ConfigError, match="EnableNFTables: 'yes' is not true or false"):
        parse_config({**NET, "EnableNFTables": "yes"})


def test_vxlan_mtu_and_learning_are_read() -> None:
    backend = parse_config({**NET, "Backend": {"Type": "vxlan", "mtu": 1400, "learning": True}})
    assert backend.backend.mtu == 1400 and backend.backend.learning is True
    assert backend.warnings == ()
    plain = parse_config({**NET, "Backend": {"Type": "vxlan"}}).backend
    assert plain.mtu is None and plain.learning is False


# -- ours: impairment at start, the status socket's default ---------------------------------


def test_impair_flags_become_rules_in_the_datapath_options() -> None:
    args = parse(
        "--impair", "delay 20ms 5ms", "--impair", "peer 198.18.3.0/24 direction both loss 1%"
    )
    rules = options_from(args).datapath.impairment
    assert [(str(r.peer), r.direction, str(r.spec)) for r in rules] == [
        ("None", "out", "delay 20ms 5ms"),
        ("198.18.3.0/24", "out", "loss 1%"),
        ("198.18.3.0/24", "in", "loss 1%"),
    ]
    from_env = options_from(parse(FLANNELD_IMPAIR="delay 1ms,direction in loss 2%"))
    assert len(list(from_env.datapath.impairment)) == 2
    assert not options_from(parse()).datapath.impairment


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--impair", "delay 20"], {}, "'20' needs a unit"),
        (["--impair", "peer 10.0.0.1 delay 1ms"], {}, "is not a subnet"),
        (["--impair", "direction up delay 1ms"], {}, "direction 'up'"),
        ([], {"FLANNELD_IMPAIR": "wobble 5%"}, "FLANNELD_IMPAIR='wobble 5%': unknown word"),
    ],
)
def test_bad_impair_is_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], message: str
) -> None:
    assert message in usage_error(capsys, *argv, **env)


def test_status_socket_defaults_to_this_namespace_s() -> None:
    assert options_from(parse()).status_socket == status_socket.default_path()
    assert str(options_from(parse("--status-socket", "/tmp/x.sock")).status_socket) == (
        "/tmp/x.sock"
    )


def test_busy_poll_reaches_the_datapath_options() -> None:
    """--busy-poll-us is a typed option below the CLI (DatapathOptions), 0 (off) unless
    given."""
    assert options_from(parse()).datapath.busy_poll_us == 0
    assert options_from(parse("--busy-poll-us", "250")).datapath.busy_poll_us == 250
    assert options_from(parse(FLANNELD_BUSY_POLL_US="80")).datapath.busy_poll_us == 80
