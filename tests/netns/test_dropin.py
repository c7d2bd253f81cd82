"""flanneld behaviours a drop-in must match, one daemon per namespace: interface selection
(--iface, --iface-regex, --iface-can-reach, --public-ip), host-gw's --public-ip check,
Backend.MTU on both vxlan datapaths, and unsupported config keys logged once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from control.file_registry import FileRegistry
from control.subnet_env import parse_subnet_env
from overlay.observe import status_socket as status

pytestmark = pytest.mark.netns
CONFIG_KEY = "/coreos.com/network/config"


def two_interfaces(ns: str) -> None:
    """eth0 192.0.2.1/24 and eth1 198.51.100.1/24 (veth pairs with their peers in the
    same namespace), and no default route."""
    for i, (local, cidr) in enumerate((("192.0.2.1", 24), ("198.51.100.1", 24))):
        commands = [
            f"ip link add eth{i} type veth peer name peer{i}",
            f"ip addr add {local}/{cidr} dev eth{i}",
            f"ip link set eth{i} up",
            f"ip link set peer{i} up",
        ]
        for command in commands:
            subprocess.run(["ip", "-n", ns, *command.split()[1:]], check=True)


def seed(tmp_path: Path, config: dict[str, Any]) -> Path:
    registry = tmp_path / "registry.json"
    FileRegistry(registry).put_sync(CONFIG_KEY, json.dumps(config).encode(), None)
    return registry


def link_mtu(ns: str, dev: str) -> int:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show", dev], capture_output=True, text=True, check=True
    )
    return int(json.loads(out.stdout)[0]["mtu"])


@pytest.mark.parametrize(
    ("flags", "iface", "address"),
    [
        (["--iface", "eth9", "--iface", "eth1"], "eth1", "198.51.100.1"),
        (["--iface", "198.51.100.1"], "eth1", "198.51.100.1"),
        (["--iface", "eth9", "--iface-regex", "^eth1$"], "eth1", "198.51.100.1"),
        (["--iface-regex", r"^198\.51\."], "eth1", "198.51.100.1"),
        (
            ["--iface-regex", "nomatch", "--iface-can-reach", "198.51.100.77"],
            "eth1",
            "198.51.100.1",
        ),
        (["--iface-can-reach", "192.0.2.200"], "eth0", "192.0.2.1"),
        (["--public-ip", "198.51.100.1"], "eth1", "198.51.100.1"),
    ],
)
def test_interface_selection_as_flanneld(
    netns, tmp_path: Path, daemons, flags: list[str], iface: str, address: str
) -> None:
    ns = netns("if")
    two_interfaces(ns)
    registry = tmp_path / "registry.json"
    args = ["--registry-file", str(registry), "--network", "198.18.0.0/16", *flags]
    daemon = daemons(ns, tmp_path, *args, lo=False)
    daemon.wait_event("started")
    shown = status.query(daemon.socket)
    assert shown["iface"] == iface and shown["lease"]["public_ip"] == address, shown


def test_no_interface_matches_says_what_was_tried(netns, tmp_path: Path, daemons) -> None:
    ns = netns("if2")
    two_interfaces(ns)
    daemon = daemons(
        ns,
        tmp_path,
        "--registry-file",
        str(tmp_path / "r.json"),
        "--iface",
        "eth9",
        "--iface-regex",
        "^wlan",
        "--iface-can-reach",
        "203.0.113.9",  # no route to it at all
        lo=False,
    )
    assert daemon.proc.wait(timeout=15) == 1
    (fatal,) = [e for e in daemon.events() if e.get("level") == "fatal"]
    assert fatal["event"] == (
        "no interface with an address matches --iface eth9, --iface-regex ^wlan, "
        "--iface-can-reach 203.0.113.9"
    )


V6_ONLY = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10::/56"}
V6_ONLY_VXLAN = {**V6_ONLY, "Backend": {"Type": "vxlan"}}
DUAL_VXLAN = {
    "Network": "198.18.0.0/16",
    "EnableIPv6": True,
    "IPv6Network": "fd00:10::/56",
    "Backend": {"Type": "vxlan"},
}


@pytest.mark.parametrize(
    ("flags", "config", "iface", "public_ip", "public_ipv6"),
    [
        # A regex matching an IPv6 address: that interface, and that very address.
        (["--iface-regex", "^2001:db8:0:1::2$"], DUAL_VXLAN, "eth1", "198.51.100.1", "1::2"),
        # The interface of the route to an IPv6 target, and its IPv6 source address ("src":
        # the one `ip -6 route get` names, of eth1's two).
        (["--iface-can-reach", "2001:db8:0:1::77"], DUAL_VXLAN, "eth1", "198.51.100.1", "src"),
        # IPv6 only: an interface without IPv4, by an IPv6 regex, by its name, by a route.
        (["--iface-regex", "^2001:db8:0:5:"], V6_ONLY_VXLAN, "eth2", None, "5::1"),
        (["--iface-regex", "^eth2$"], V6_ONLY_VXLAN, "eth2", None, "5::1"),
        (["--iface-can-reach", "2001:db8:0:5::9"], V6_ONLY_VXLAN, "eth2", None, "5::1"),
    ],
    ids=["regex-v6", "can-reach-v6", "v6-only-regex", "v6-only-name", "v6-only-can-reach"],
)
def test_interface_selection_by_ipv6_as_flanneld(
    netns,
    tmp_path: Path,
    daemons,
    flags: list[str],
    config: dict[str, Any],
    iface: str,
    public_ip: str | None,
    public_ipv6: str,  # after 2001:db8:0:
) -> None:
    """flanneld's LookupExtIface for IPv6: --iface-regex matched against IPv6 addresses
    too (the matched one is used), --iface-can-reach with an IPv6 target (the route's
    IPv6 source), and interfaces with IPv6 addresses only."""
    ns = netns("if6")
    two_interfaces(ns)
    run = ["ip", "-n", ns]
    for address in ("2001:db8:0:1::1/64", "2001:db8:0:1::2/64"):
        subprocess.run([*run, "addr", "add", address, "dev", "eth1", "nodad"], check=True)
    veth = ["link", "add", "name", "eth2", "type", "veth", "peer", "name", "peer2"]
    subprocess.run([*run, *veth], check=True)
    subprocess.run([*run, "addr", "add", "2001:db8:0:5::1/64", "dev", "eth2", "nodad"], check=True)
    for name in ("eth2", "peer2"):
        subprocess.run([*run, "link", "set", name, "up"], check=True)
    registry = seed(tmp_path, config)
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry), *flags, lo=False)
    daemon.wait_event("started")
    shown = status.query(daemon.socket)
    assert shown["iface"] == iface, shown
    assert shown["lease"].get("public_ip") == public_ip, shown["lease"]
    expected6 = f"2001:db8:0:{public_ipv6}"
    if public_ipv6 == "src":
        route = subprocess.run(
            [*run, "-j", "-6", "route", "get", flags[1]], capture_output=True, text=True
        )
        expected6 = json.loads(route.stdout)[0]["prefsrc"]
    assert shown["lease"]["public_ipv6"] == expected6, shown["lease"]


def test_host_gw_refuses_a_public_ip_that_is_not_the_interfaces(
    netns, tmp_path: Path, daemons
) -> None:
    ns = netns("hgw")
    registry = seed(tmp_path, {"Network": "198.18.0.0/16", "Backend": {"Type": "host-gw"}})
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry), "--public-ip", "192.0.2.99")
    assert daemon.proc.wait(timeout=15) == 1
    (fatal,) = [e for e in daemon.events() if e.get("level") == "fatal"]
    assert "--public-ip 192.0.2.99 differs from lo's address 127.0.0.1" in fatal["event"]
    assert "NAT" in fatal["event"] and "host-gw" in fatal["event"]
    assert "subnets" not in registry.read_text()  # refused before any lease


@pytest.mark.parametrize("datapath", ["userspace", "kernel"])
def test_backend_mtu_is_honoured_for_vxlan(netns, tmp_path: Path, daemons, datapath: str) -> None:
    ns = netns("mtu")
    registry = seed(
        tmp_path, {"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan", "MTU": 1400}}
    )
    extra = ["--vxlan-datapath", datapath]
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry), *extra)
    daemon.wait_event("started")
    device = "flannel0" if datapath == "userspace" else "flannel.1"
    assert link_mtu(ns, device) == 1400
    assert parse_subnet_env(daemon.subnet_file.read_text()).mtu == 1400
    assert status.query(daemon.socket)["mtu"] == 1400


def test_backend_learning_is_honoured_by_the_kernel_datapath(
    netns, tmp_path: Path, daemons
) -> None:
    ns = netns("learn")
    registry = seed(
        tmp_path, {"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan", "Learning": True}}
    )
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry), "--kernel-vxlan")
    daemon.wait_event("started")
    details = subprocess.run(
        ["ip", "-n", ns, "-d", "link", "show", "flannel.1"], capture_output=True, text=True
    ).stdout
    assert "nolearning" not in details and "vxlan id 1" in details, details
    assert not [e for e in daemon.events() if e.get("event") == "config_key_ignored"]


def test_unsupported_config_keys_are_logged_once(netns, tmp_path: Path, daemons) -> None:
    ns = netns("keys")
    registry = seed(
        tmp_path,
        {
            "Network": "198.18.0.0/16",
            "IPv6Network": "fc00::/48",
            "Backend": {"Type": "vxlan", "Learning": True},
        },
    )
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry))
    daemon.wait_event("started")
    ignored = [e["detail"] for e in daemon.events() if e.get("event") == "config_key_ignored"]
    assert len(ignored) == 2, ignored
    assert any(d.startswith("IPv6Network:") for d in ignored)
    assert any(d.startswith("Backend.Learning: the userspace datapath") for d in ignored)


def test_enable_ipv6_without_ipv6_network_is_refused(netns, tmp_path: Path, daemons) -> None:
    ns = netns("v6")
    registry = seed(tmp_path, {"Network": "198.18.0.0/16", "EnableIPv6": True})
    daemon = daemons(ns, tmp_path, "--registry-file", str(registry))
    assert daemon.proc.wait(timeout=15) == 1
    (fatal,) = [e for e in daemon.events() if e.get("level") == "fatal"]
    assert "IPv6Network: missing with EnableIPv6" in fatal["event"]


def fatal_of(daemon: Any) -> str:
    """The one fatal line of a daemon that exited 1."""
    assert daemon.proc.wait(timeout=15) == 1
    (fatal,) = [e for e in daemon.events() if e.get("level") == "fatal"]
    return str(fatal["event"])


def ipv6_only_link(ns: str) -> None:
    """``v6a`` in ``ns``: a veth end with 2001:db8::1/64 and no IPv4 address."""
    run = ["ip", "-n", ns]
    veth = ["link", "add", "name", "v6a", "type", "veth", "peer", "name", "v6b"]
    subprocess.run([*run, *veth], check=True)
    subprocess.run([*run, "addr", "add", "2001:db8::1/64", "dev", "v6a", "nodad"], check=True)
    for name in ("v6a", "v6b"):
        subprocess.run([*run, "link", "set", name, "up"], check=True)


def test_ipv6_only_runs_but_what_cannot_work_is_refused_in_one_line(
    netns, tmp_path: Path, daemons
) -> None:
    """IPv6 only (EnableIPv4 false) runs (tests/netns/test_ipv6_only.py); what cannot work
    says so in one line: the udp backend (IPv4 only, as flannel's), an interface without
    an IPv6 address to publish, and an IPv4 network on an interface with IPv6 only."""
    ns = netns("v6o")
    (tmp_path / "udp").mkdir()
    udp = daemons(ns, tmp_path / "udp", "--registry-file", str(seed(tmp_path, V6_ONLY)))
    assert "EnableIPv6: flannel's udp backend is IPv4 only" in fatal_of(udp)
    (tmp_path / "vx").mkdir()
    registry = seed(tmp_path / "vx", {**V6_ONLY, "Backend": {"Type": "vxlan"}})
    no_v6 = daemons(ns, tmp_path / "vx", "--registry-file", str(registry))
    assert "EnableIPv6: lo has no IPv6 address to publish" in fatal_of(no_v6)
    ipv6_only_link(ns)
    (tmp_path / "v4").mkdir()
    registry = seed(tmp_path / "v4", {"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan"}})
    flags = ("--registry-file", str(registry), "--iface", "v6a")
    v4_on_v6 = daemons(ns, tmp_path / "v4", *flags, lo=False)
    assert "v6a has no IPv4 address and the registry's Network" in fatal_of(v4_on_v6)
    assert "EnableIPv4: false" in fatal_of(v4_on_v6)
