"""The CNI plugin: unit tests of the rendered delegate config and the error paths, and a
real ADD/CHECK/DEL through the Debian bridge + host-local plugins between two namespaces."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path

import pytest

from control.subnet_env import SubnetEnv
from overlay import cni
from overlay.lab.netns import create_netns, netns_pids, remove_netns, run_in, terminate
from tests.helpers.cni import RUN, cni_env, invoke, ip_json, needs_netns, netconf, subnet_env_text
from tests.helpers.paths import ROOT

# -- unit: the rendered config -----------------------------------------------------------


def lease(ip_masq: bool) -> SubnetEnv:
    return SubnetEnv(
        network=IPv4Network("198.18.0.0/16"),
        subnet=IPv4Interface("198.18.3.1/24"),
        mtu=1472,
        ip_masq=ip_masq,
    )


def test_delegate_defaults_follow_flannel() -> None:
    conf = {"cniVersion": "0.4.0", "name": "net"}
    delegate = cni.build_delegate(conf, lease(ip_masq=False))
    assert delegate == {
        "cniVersion": "0.4.0",
        "name": "net",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": True,
        "ipMasq": True,  # the daemon does not masquerade, so the bridge plugin must
        "mtu": 1472,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "198.18.3.0/24"}]],
            "routes": [{"dst": "198.18.0.0/16"}],
            "dataDir": "/var/lib/cni/networks",
        },
    }
    assert cni.build_delegate(conf, lease(ip_masq=True))["ipMasq"] is False


def test_dual_stack_delegate_has_both_ranges_and_routes_as_flannels_plugin() -> None:
    env = SubnetEnv.for_lease(
        IPv4Network("198.18.0.0/16"),
        IPv4Network("198.18.3.0/24"),
        1450,
        True,
        (IPv6Network("fd00:10::/56"), IPv6Network("fd00:10:0:3::/64")),
    )
    ipam = cni.build_delegate({"cniVersion": "1.0.0", "name": "net"}, env)["ipam"]
    assert ipam["ranges"] == [[{"subnet": "198.18.3.0/24"}], [{"subnet": "fd00:10:0:3::/64"}]]
    assert ipam["routes"] == [{"dst": "198.18.0.0/16"}, {"dst": "fd00:10::/56"}]


def test_ipv6_only_delegate_has_the_ipv6_range_and_route_alone() -> None:
    """An IPv6-only subnet.env (no FLANNEL_NETWORK/FLANNEL_SUBNET): host-local gets the
    IPv6 lease alone, as flannel's plugin delegates it."""
    env = SubnetEnv(
        None,
        None,
        1430,
        True,
        IPv6Network("fd00:10::/56"),
        IPv6Interface("fd00:10:0:3::1/64"),
    )
    ipam = cni.build_delegate({"cniVersion": "1.0.0", "name": "net"}, env)["ipam"]
    assert ipam["ranges"] == [[{"subnet": "fd00:10:0:3::/64"}]]
    assert ipam["routes"] == [{"dst": "fd00:10::/56"}]


def test_delegate_overrides() -> None:
    conf = {
        "cniVersion": "1.0.0",
        "name": "net",
        "ipamDataDir": "/tmp/ipam",
        "delegate": {"ipMasq": False, "bridge": "br9", "mtu": 1300, "cniVersion": "0.3.0"},
        "ipam": {"routes": [{"dst": "192.0.2.0/24"}], "ranges": "ignored", "custom": 1},
        "runtimeConfig": {"portMappings": []},
    }
    delegate = cni.build_delegate(conf, lease(ip_masq=False))
    assert delegate["ipMasq"] is False
    assert delegate["bridge"] == "br9"
    assert delegate["mtu"] == 1300
    assert delegate["cniVersion"] == "1.0.0"  # the runtime's version wins, as in flannel
    assert delegate["runtimeConfig"] == {"portMappings": []}
    # Top-level ipam adds keys and routes; the ranges always come from the lease.
    assert delegate["ipam"] == {
        "type": "host-local",
        "dataDir": "/tmp/ipam",
        "custom": 1,
        "ranges": [[{"subnet": "198.18.3.0/24"}]],
        "routes": [{"dst": "192.0.2.0/24"}, {"dst": "198.18.0.0/16"}],
    }


def test_other_delegate_type_gets_no_bridge_keys() -> None:
    conf = {"cniVersion": "1.0.0", "name": "net", "delegate": {"type": "ipvlan"}}
    delegate = cni.build_delegate(conf, lease(ip_masq=False))
    assert delegate["type"] == "ipvlan"
    assert "bridge" not in delegate and "isGateway" not in delegate


def test_check_names_the_gateway_of_gatewayless_routes() -> None:
    result = {
        "ips": [{"address": "198.18.3.2/24", "gateway": "198.18.3.1"}],
        "routes": [{"dst": "198.18.0.0/16"}, {"dst": "192.0.2.0/24", "gw": "198.18.3.9"}],
    }
    fixed = cni.with_route_gateways(result)
    assert fixed["routes"] == [
        {"dst": "198.18.0.0/16", "gw": "198.18.3.1"},
        {"dst": "192.0.2.0/24", "gw": "198.18.3.9"},
    ]
    assert result["routes"][0] == {"dst": "198.18.0.0/16"}  # the input is not modified


def test_version() -> None:
    code, out = cni.run({"CNI_COMMAND": "VERSION"}, "")
    assert code == 0
    info = json.loads(out)
    assert info["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    assert info["cniVersion"] in info["supportedVersions"]


@pytest.mark.parametrize(
    ("environ", "stdin", "code", "words"),
    [
        ({"CNI_COMMAND": "ADD"}, "{not json", 6, "not valid JSON"),
        ({"CNI_COMMAND": "ADD"}, "[]", 6, "JSON object"),
        ({"CNI_COMMAND": "ADD"}, '{"cniVersion": "9.9.9", "name": "n"}', 1, "incompatible"),
        ({"CNI_COMMAND": "ADD"}, '{"name": "n"}', 7, "cniVersion"),
        ({"CNI_COMMAND": "ADD"}, '{"cniVersion": "1.0.0"}', 7, "name"),
        (
            {"CNI_COMMAND": "ADD"},
            '{"cniVersion": "1.0.0", "name": "n", "delegate": []}',
            7,
            "delegate",
        ),
        (
            {"CNI_COMMAND": "ADD"},
            '{"cniVersion": "1.0.0", "name": "n", "delegate": {"name": "x"}}',
            7,
            "must not have",
        ),
        ({"CNI_COMMAND": "FOO"}, "{}", 4, "CNI_COMMAND"),
        ({"CNI_COMMAND": "ADD"}, '{"cniVersion": "1.0.0", "name": "n"}', 4, "CNI_NETNS"),
    ],
)
def test_errors_are_cni_json(environ: dict[str, str], stdin: str, code: int, words: str) -> None:
    rc, out = cni.run(environ, stdin)
    assert rc != 0
    error = json.loads(out)
    assert error["code"] == code
    assert words in error["msg"] + error["details"]
    assert set(error) == {"cniVersion", "code", "msg", "details"}


def test_bad_container_id_rejected(tmp_path: Path) -> None:
    environ = cni_env("ADD", "../../etc/passwd", "x")
    rc, out = cni.run(environ, json.dumps(netconf(tmp_path)))
    assert rc != 0
    assert json.loads(out)["code"] == 4
    assert not (tmp_path / "cni").exists()


def test_del_without_add_succeeds(tmp_path: Path) -> None:
    rc, out = cni.run(cni_env("DEL", "never-added", None), json.dumps(netconf(tmp_path)))
    assert (rc, out) == (0, "")


def test_missing_plugin_is_reported(tmp_path: Path) -> None:
    (tmp_path / "subnet.env").write_text(subnet_env_text())
    environ = cni_env("ADD", "ctr1", "x") | {"CNI_PATH": str(tmp_path / "nowhere")}
    rc, out = cni.run(environ, json.dumps(netconf(tmp_path)))
    assert rc != 0
    error = json.loads(out)
    assert error["code"] == 4
    assert "'bridge' not found in CNI_PATH" in error["msg"]


# -- the real plugin as a process ----------------------------------------------------------


def test_version_command() -> None:
    proc = invoke("VERSION", "")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


def test_missing_subnet_env_says_try_again(tmp_path: Path) -> None:
    proc = invoke("ADD", netconf(tmp_path), pod="whatever")
    assert proc.returncode != 0
    error = json.loads(proc.stdout)
    assert error["code"] == 11
    assert error["cniVersion"] == "1.0.0"
    assert f"subnet.env not found at {tmp_path / 'subnet.env'}" in error["msg"]
    assert "overlay run" in error["msg"]
    assert not (tmp_path / "cni").exists()


def test_bad_json_is_an_error(tmp_path: Path) -> None:
    proc = invoke("ADD", "{oops", pod="whatever")
    assert proc.returncode != 0
    assert json.loads(proc.stdout)["code"] == 6


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """A node namespace (where the plugin runs) and a pod namespace, removed even on failure."""
    node, pod = f"{RUN}-node", f"{RUN}-pod"
    try:
        for name in (node, pod):
            remove_netns(name)
            create_netns(name)
        yield node, pod
    finally:
        for name in (pod, node):
            terminate(netns_pids(name))
            remove_netns(name)


@pytest.mark.netns
@needs_netns
def test_add_check_del(tmp_path: Path, namespaces: tuple[str, str]) -> None:
    node, pod = namespaces
    (tmp_path / "subnet.env").write_text(subnet_env_text(ip_masq=True))
    conf = netconf(tmp_path)

    added = invoke("ADD", conf, node=node, pod=pod)
    assert added.returncode == 0, added.stdout + added.stderr
    result = json.loads(added.stdout)
    assert result["cniVersion"] == "1.0.0"
    address = IPv4Interface(result["ips"][0]["address"])
    assert address in IPv4Network("198.18.3.0/24")
    assert address.ip != IPv4Address("198.18.3.1")
    assert result["ips"][0]["gateway"] == "198.18.3.1"

    # The delegate config is saved for DEL, as flannel does.
    saved = json.loads((tmp_path / "cni" / "ctr1").read_text())
    assert saved["type"] == "bridge"
    assert saved["ipMasq"] is False
    assert saved["ipam"]["ranges"] == [[{"subnet": "198.18.3.0/24"}]]

    # Pod side: the address, the lease MTU and a route to the overlay via the gateway.
    (link,) = ip_json(pod, "addr", "show", "dev", "eth0")
    assert link["mtu"] == 1400
    assert {(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"} == {
        (str(address.ip), 24)
    }
    routes = ip_json(pod, "route", "show")
    assert {"dst": "198.18.0.0/16", "gateway": "198.18.3.1"}.items() <= next(
        r for r in routes if r["dst"] == "198.18.0.0/16"
    ).items()

    # Node side: cni0 holds the gateway address; the node reaches the pod.
    (bridge,) = ip_json(node, "addr", "show", "dev", "cni0")
    assert ("198.18.3.1", 24) in {(a["local"], a["prefixlen"]) for a in bridge["addr_info"]}
    ping = run_in(
        node,
        [sys.executable, "-m", "overlay.lab.netns", "ping", str(address.ip), "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr

    reservation = tmp_path / "ipam" / conf["name"] / str(address.ip)
    assert reservation.exists()

    checked = invoke("CHECK", conf | {"prevResult": result}, node=node, pod=pod)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # DEL must work from the saved config alone, even with the daemon's file gone.
    (tmp_path / "subnet.env").unlink()
    deleted = invoke("DEL", conf, node=node, pod=pod)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert not [link for link in ip_json(pod, "link", "show") if link["ifname"] == "eth0"], (
        "the pod veth survived DEL"
    )
    assert not reservation.exists()
    assert not (tmp_path / "cni" / "ctr1").exists()

    # DEL again is a no-op success (runtimes retry).
    again = invoke("DEL", conf, node=node, pod=pod)
    assert (again.returncode, again.stdout.strip()) == (0, "")


@pytest.mark.netns
@needs_netns
def test_failed_add_is_cleaned_by_del(tmp_path: Path, namespaces: tuple[str, str]) -> None:
    """A delegate failure passes its error through; the saved config lets DEL clean up."""
    node, _ = namespaces
    (tmp_path / "subnet.env").write_text(subnet_env_text())
    conf = netconf(tmp_path)
    added = invoke("ADD", conf, node=node, pod=f"{RUN}-missing")
    assert added.returncode != 0
    error = json.loads(added.stdout)
    assert error["code"] and error["msg"]
    assert (tmp_path / "cni" / "ctr1").exists()
    deleted = invoke("DEL", conf, node=node, pod=f"{RUN}-missing")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert not (tmp_path / "cni" / "ctr1").exists()
