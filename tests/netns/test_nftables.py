"""EnableNFTables with the machine's real ``nft``, on two dual-stack node namespaces: the
tables, chains and rules flanneld v0.25+ writes (read back with ``nft -j list table``
and compared statement by statement), and no iptables chain of ours; pods leaving the
overlay masqueraded to their node's address over IPv4 and IPv6, pod to pod not; a
rule and a chain deleted by hand put back within the resync; both tables deleted on
stop and a table not ours untouched; an IPv4-only network makes no IPv6 table; no nft
command is one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from control.subnet_env import SubnetEnv, parse_subnet_env
from overlay.observe import status_socket as status
from tests.helpers.dual_stack import DUAL, in_ns, peer_seen, pings, pod, seed, start_nodes
from tests.helpers.polling import poll

pytestmark = pytest.mark.netns
NFT = {**DUAL, "EnableNFTables": True, "Backend": {"Type": "host-gw"}}
RESYNC = 1
TABLES = {4: ("ip", "flannel-ipv4"), 6: ("ip6", "flannel-ipv6")}


# -- what flanneld's nftables traffic manager writes, as nft -j lists it -------------------


def _prefix(network: str) -> dict[str, Any]:
    address, length = network.split("/")
    return {"prefix": {"addr": address, "len": int(length)}}


def _match(family: str, field: str, network: str, op: str = "==") -> dict[str, Any]:
    left = {"payload": {"protocol": family, "field": field}}
    return {"match": {"op": op, "left": left, "right": _prefix(network)}}


def flanneld_masq(family: str, net: str, lease: str, random_fully: bool) -> list[list[Any]]:
    multicast = "224.0.0.0/4" if family == "ip" else "ff00::/8"
    masq = {"masquerade": {"flags": "fully-random"} if random_fully else None}
    mark = {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 0x4000}}
    ret = {"return": None}
    return [
        [mark, ret],
        [_match(family, "saddr", lease), _match(family, "daddr", net), ret],
        [_match(family, "saddr", net), _match(family, "daddr", lease), ret],
        [_match(family, "saddr", lease, "!="), _match(family, "daddr", net), ret],
        [_match(family, "saddr", net), _match(family, "daddr", multicast, "!="), masq],
        [_match(family, "saddr", net, "!="), _match(family, "daddr", net), masq],
    ]


def flanneld_forward(family: str, net: str) -> list[list[Any]]:
    accept = {"accept": None}
    return [[_match(family, "saddr", net), accept], [_match(family, "daddr", net), accept]]


def listed(ns: str, version: int) -> dict[str, Any] | None:
    """{chain: {"header": (type, hook, prio, policy), "rules": [expr, ...]}}, or None."""
    family, table = TABLES[version]
    proc = in_ns(ns, "nft", "-j", "list", "table", family, table, check=False)
    if proc.returncode != 0:
        return None
    chains: dict[str, Any] = {}
    for item in json.loads(proc.stdout)["nftables"]:
        if "chain" in item:
            c = item["chain"]
            header = (c.get("type"), c.get("hook"), c.get("prio"), c.get("policy"))
            chains[c["name"]] = {"header": header, "rules": []}
        elif "rule" in item:
            chains[item["rule"]["chain"]]["rules"].append(item["rule"]["expr"])
    return chains


def handles(ns: str, version: int, chain: str) -> list[int]:
    family, table = TABLES[version]
    out = in_ns(ns, "nft", "-j", "list", "chain", family, table, chain).stdout
    return [i["rule"]["handle"] for i in json.loads(out)["nftables"] if "rule" in i]


def nft(ns: str, *args: str) -> None:
    in_ns(ns, "nft", *args)


def node_status(daemon: Any) -> dict[str, Any]:
    return dict(status.query(daemon.socket))


def envs_of(started: list[Any]) -> list[SubnetEnv]:
    return [parse_subnet_env(d.subnet_file.read_text()) for d in started]


# -- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "random_fully", [True, False], ids=["random-fully", "fully-random-disable"]
)
def test_flanneld_tables_masquerade_both_families_and_go_on_stop(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path, random_fully: bool
) -> None:
    flags = ["--ip-masq", *([] if random_fully else ["--ip-masq-fully-random-disable"])]
    nodes, started, _ = start_nodes(netns, daemons, tmp_path, NFT, *flags)
    envs = envs_of(started)
    assert envs[0].ipv6_subnet is not None
    leases = {4: str(envs[0].subnet.network), 6: str(envs[0].ipv6_subnet.network)}
    networks = {4: "198.18.0.0/16", 6: "fd00:10::/56"}
    for version, (family, _) in TABLES.items():
        chains = listed(nodes[0], version)
        assert chains is not None, f"no {family} table"
        net, lease = networks[version], leases[version]
        assert chains == {
            "postrtg": {
                "header": ("nat", "postrouting", 100, "accept"),
                "rules": flanneld_masq(family, net, lease, random_fully),
            },
            "forward": {
                "header": ("filter", "forward", 0, "accept"),
                "rules": flanneld_forward(family, net),
            },
        }
    # Instead of iptables: no chain of ours there.
    for command in ("iptables-save", "ip6tables-save"):
        assert "FLANNEL" not in in_ns(nodes[0], command).stdout
    shown = node_status(started[0])
    assert shown["nftables"]["table"] == "ip flannel-ipv4", shown.get("nftables")
    assert shown["nftables6"]["table"] == "ip6 flannel-ipv6", shown.get("nftables6")
    assert shown["nftables"]["random_fully"] is random_fully
    assert shown["nftables"]["sets"] == ["masq", "forward"]
    assert "iptables" not in shown

    pods = [netns("p1"), netns("p2")]
    addresses = [pod(node, p, env) for node, p, env in zip(nodes, pods, envs, strict=True)]
    assert poll(lambda: pings(pods[0], addresses[1][1]), timeout=10)
    # Leaving the overlay (to node 2's underlay addresses): masqueraded to node 1's.
    assert peer_seen(nodes[1], "192.0.2.2", pods[0]) == "192.0.2.1"
    assert peer_seen(nodes[1], "2001:db8::2", pods[0]) == "2001:db8::1"
    # Pod to pod: the pod's own addresses.
    assert peer_seen(pods[1], addresses[1][0], pods[0]) == addresses[0][0]
    assert peer_seen(pods[1], addresses[1][1], pods[0]) == addresses[0][1]

    # On stop both tables go, as flanneld deletes them; tables not ours stay.
    nft(nodes[0], "add", "table", "ip", "flannel-other")
    nft(nodes[0], "add", "table", "inet", "filter")
    assert started[0].stop()[0] == 0
    assert listed(nodes[0], 4) is None and listed(nodes[0], 6) is None
    tables = sorted(in_ns(nodes[0], "nft", "list", "tables").stdout.splitlines())
    assert tables == ["table inet filter", "table ip flannel-other"], tables
    assert listed(nodes[1], 4) is not None  # node 2's are its own


def test_rules_and_chains_deleted_by_hand_are_put_back(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    nodes, started, _ = start_nodes(
        netns, daemons, tmp_path, NFT, "--ip-masq", "--iptables-resync", str(RESYNC)
    )
    node, daemon = nodes[0], started[0]
    before = {4: listed(node, 4), 6: listed(node, 6)}
    assert poll(lambda: node_status(daemon)["nftables"]["checks"] >= 2, timeout=10)
    assert node_status(daemon)["repairs"].get("nftables", 0) == 0  # exact: nothing to do

    # The IPv4 masquerade of pods leaving the overlay (the 5th rule) goes, and the whole
    # IPv6 forward chain; a drop rule of someone else's lands in our IPv4 forward chain.
    nft(node, "delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle",
        str(handles(node, 4, "postrtg")[4]))  # fmt: skip
    nft(node, "delete", "chain", "ip6", "flannel-ipv6", "forward")
    nft(node, "add", "rule", "ip", "flannel-ipv4", "forward", "drop")
    assert poll(lambda: listed(node, 4) == before[4] and listed(node, 6) == before[6], 3 * RESYNC)
    # 1 masquerade rule + 2 forward rules put back, 1 foreign rule out.
    assert poll(lambda: node_status(daemon)["repairs"].get("nftables") == 4)
    logged = [e["rule"] for e in daemon.events() if e.get("event") == "nftables_rule_repaired"]
    assert len(logged) == 4 and "forward: not ours: drop" in logged, logged

    env = envs_of(started)[0]
    pod_ns = netns("p1")
    pod(node, pod_ns, env)
    assert peer_seen(nodes[1], "192.0.2.2", pod_ns) == "192.0.2.1"


def test_ipv4_only_forward_rules_only_without_ip_masq(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    """Without EnableIPv6 no IPv6 table; without --ip-masq only the forward chain (the
    default --iptables-forward-rules)."""
    ns = netns("v4")
    config = {"Network": "198.18.0.0/16", "EnableNFTables": True}
    daemon = daemons(ns, tmp_path, "--registry-file", str(seed(tmp_path, config)))
    daemon.wait_event("nftables_rules_installed")
    chains = listed(ns, 4)
    assert chains is not None and list(chains) == ["forward"], chains
    assert listed(ns, 6) is None
    assert not [e for e in daemon.events() if e.get("event") == "config_key_ignored"]
    assert daemon.stop()[0] == 0
    assert in_ns(ns, "nft", "list", "tables").stdout == ""


def test_no_nft_command_is_one_line(
    netns: Callable[[str], str], daemons: Any, tmp_path: Path
) -> None:
    ns = netns("nonft")
    commands = tmp_path / "bin"
    commands.mkdir()
    (commands / "ip").symlink_to("/usr/sbin/ip")  # and /usr/bin: no /usr/sbin/nft
    env = {"PATH": f"{commands}:/usr/bin"}
    config = {"Network": "198.18.0.0/16", "EnableNFTables": True}
    registry = str(seed(tmp_path, config))
    daemon = daemons(ns, tmp_path, "--registry-file", registry, "--ip-masq", env=env)
    assert daemon.proc.wait(timeout=15) == 1
    (fatal,) = [e for e in daemon.events() if e.get("level") == "fatal"]
    assert fatal["event"] == "--ip-masq: no nft command: install nftables (EnableNFTables is set)"
    # Without --ip-masq the forward chain is skipped with one warning, and the node runs.
    work = tmp_path / "forward"
    work.mkdir()
    daemon = daemons(ns, work, "--registry-file", registry, env=env)
    daemon.wait_event("started")
    (skipped,) = [e for e in daemon.events() if e.get("event") == "forward_rules_skipped"]
    assert "no nft command" in skipped["reason"]
    assert daemon.stop()[0] == 0
