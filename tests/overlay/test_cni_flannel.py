"""The CNI plugin as a drop-in for flannel's on a live node: a pod that flannel's plugin
added is deleted cleanly by ours (its address released), and CNI spec 1.1.0 (cniVersion,
STATUS, GC) through Debian's bridge plugin, which speaks 1.0.0."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest

from overlay import cni
from overlay.lab.netns import create_netns, netns_pids, remove_netns, terminate
from tests.helpers.cni import CNI_BIN, invoke, ip_json, needs_netns, netconf, subnet_env_text
from tests.helpers.paths import ROOT


@pytest.fixture
def node_and_pods(prefix: str) -> Iterator[tuple[str, list[str]]]:
    names = [f"{prefix}-node", f"{prefix}-pa", f"{prefix}-pb", f"{prefix}-pc"]
    try:
        for name in names:
            create_netns(name)
        yield names[0], names[1:]
    finally:
        for name in reversed(names):
            terminate(netns_pids(name))
            remove_netns(name)


def flannel_style_add(
    tmp_path: Path, node: str, pod: str, container: str, name: str
) -> tuple[dict[str, Any], Path]:
    """What flannel's own plugin does on ADD: save its delegate config (its format, its
    cniVersion) as <dataDir>/<container id>, then exec bridge ADD with it."""
    delegate = {
        "cniVersion": "0.3.1",
        "name": name,
        "type": "bridge",
        "hairpinMode": True,
        "ipMasq": False,
        "isGateway": True,
        "isDefaultGateway": True,
        "mtu": 1400,
        "ipam": {
            "type": "host-local",
            "dataDir": str(tmp_path / "ipam"),
            "ranges": [[{"subnet": "198.18.3.0/24"}]],
            "routes": [{"dst": "198.18.0.0/16"}],
        },
    }
    saved = tmp_path / "flannel" / container
    saved.parent.mkdir(exist_ok=True)
    saved.write_text(json.dumps(delegate))
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": container,
        "CNI_NETNS": f"/run/netns/{pod}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(CNI_BIN),
    }
    proc = subprocess.run(
        ["ip", "netns", "exec", node, str(CNI_BIN / "bridge")],
        input=json.dumps(delegate),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout), saved


def reservations(tmp_path: Path, name: str) -> set[str]:
    directory = tmp_path / "ipam" / name
    if not directory.exists():
        return set()
    return {p.name for p in directory.iterdir() if p.name[0].isdigit()}


def has_eth0(pod: str) -> bool:
    return any(link["ifname"] == "eth0" for link in ip_json(pod, "link", "show"))


@pytest.mark.netns
@needs_netns
def test_pod_added_by_flannels_plugin_is_deleted_by_ours(
    tmp_path: Path, node_and_pods: tuple[str, list[str]]
) -> None:
    node, (pod, *_) = node_and_pods
    conf = netconf(tmp_path, flannelDataDir=str(tmp_path / "flannel"))
    result, saved = flannel_style_add(tmp_path, node, pod, "flannelctr", conf["name"])
    address = str(IPv4Interface(result["ips"][0]["address"]).ip)
    assert reservations(tmp_path, conf["name"]) == {address} and has_eth0(pod)
    # The node now runs our plugin; the daemon (and its subnet.env) may even be gone.
    deleted = invoke("DEL", conf, node=node, pod=pod, container="flannelctr")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert reservations(tmp_path, conf["name"]) == set(), "the pod's IP leaked"
    assert not has_eth0(pod) and not saved.exists()
    again = invoke("DEL", conf, node=node, pod=pod, container="flannelctr")
    assert (again.returncode, again.stdout.strip()) == (0, "")


@pytest.mark.netns
@needs_netns
def test_cni_1_1_0_add_check_del_through_a_1_0_0_bridge(
    tmp_path: Path, node_and_pods: tuple[str, list[str]]
) -> None:
    node, (pod, *_) = node_and_pods
    (tmp_path / "subnet.env").write_text(subnet_env_text())
    conf = netconf(tmp_path, cniVersion="1.1.0", cniVersions=["1.0.0", "1.1.0"])
    added = invoke("ADD", conf, node=node, pod=pod)
    assert added.returncode == 0, added.stdout + added.stderr
    result = json.loads(added.stdout)
    assert result["cniVersion"] == "1.1.0" and result["ips"], result
    saved = json.loads((tmp_path / "cni" / "ctr1").read_text())
    assert saved["cniVersion"] == "1.0.0"  # what Debian's bridge speaks
    checked = invoke("CHECK", conf | {"prevResult": result}, node=node, pod=pod)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    deleted = invoke("DEL", conf | {"prevResult": result}, node=node, pod=pod)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert not has_eth0(pod) and reservations(tmp_path, conf["name"]) == set()


def test_status_ready_with_the_daemons_subnet_env(tmp_path: Path) -> None:
    conf = netconf(tmp_path, cniVersion="1.1.0")
    missing = invoke("STATUS", conf)
    assert missing.returncode != 0
    error = json.loads(missing.stdout)
    assert error["code"] == cni.ERR_PLUGIN_NOT_AVAILABLE == 50
    assert "subnet.env not found" in error["msg"]
    (tmp_path / "subnet.env").write_text(subnet_env_text())
    ready = invoke("STATUS", conf)
    assert (ready.returncode, ready.stdout.strip()) == (0, ""), ready.stdout + ready.stderr


def test_unknown_command_lists_the_verbs(tmp_path: Path) -> None:
    proc = invoke("FROB", netconf(tmp_path))
    error = json.loads(proc.stdout)
    assert proc.returncode != 0 and error["code"] == 4
    assert "ADD, DEL, CHECK, STATUS, GC, VERSION" in error["msg"]


@pytest.mark.netns
@needs_netns
def test_gc_deletes_attachments_the_runtime_no_longer_has(
    tmp_path: Path, node_and_pods: tuple[str, list[str]]
) -> None:
    node, (pod_a, pod_b, pod_c) = node_and_pods
    (tmp_path / "subnet.env").write_text(subnet_env_text())
    conf = netconf(tmp_path, cniVersion="1.1.0", flannelDataDir=str(tmp_path / "flannel"))
    kept = invoke("ADD", conf, node=node, pod=pod_a, container="keep")
    leaked = invoke("ADD", conf, node=node, pod=pod_b, container="leak")
    assert kept.returncode == 0 and leaked.returncode == 0, kept.stdout + leaked.stdout
    # And one flannel's plugin left behind, and one of another network (not ours to GC).
    flannel_style_add(tmp_path, node, pod_c, "flannelleak", conf["name"])
    other = tmp_path / "cni" / "othernet"
    other.write_text(json.dumps({"type": "bridge", "name": "another-network"}))
    assert len(reservations(tmp_path, conf["name"])) == 3

    gc = invoke(
        "GC",
        conf | {"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]},
        node=node,
    )
    assert gc.returncode == 0, gc.stdout + gc.stderr
    keep_ip = str(IPv4Interface(json.loads(kept.stdout)["ips"][0]["address"]).ip)
    assert reservations(tmp_path, conf["name"]) == {keep_ip}
    assert sorted(p.name for p in (tmp_path / "cni").iterdir()) == ["keep", "othernet"]
    assert not (tmp_path / "flannel" / "flannelleak").exists()
    assert has_eth0(pod_a)


def test_gc_needs_a_list(tmp_path: Path) -> None:
    conf = netconf(tmp_path, cniVersion="1.1.0", **{"cni.dev/valid-attachments": "keep"})
    proc = invoke("GC", conf)
    assert proc.returncode != 0 and json.loads(proc.stdout)["code"] == cni.ERR_INVALID_CONFIG


def test_version_negotiation_is_only_for_1_1_0(tmp_path: Path) -> None:
    """A 1.0.0 config is passed to the delegate as it is (no extra VERSION call)."""
    delegate = {"type": "bridge", "cniVersion": "1.0.0"}
    assert cni.negotiate(delegate, {"CNI_PATH": "/nonexistent"}) == "1.0.0"
    assert delegate["cniVersion"] == "1.0.0"
    assert ROOT.exists()
