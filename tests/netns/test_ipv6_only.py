"""IPv6 only (EnableIPv4: false) end to end, as flanneld v0.20.2 runs it: three node
namespaces on an underlay with IPv6 addresses alone (2001:db8::/64, no IPv4 at all), a
pod each behind a veth: every pod pings every other over IPv6 and moves data both ways
(SHA-256 checked), on host-gw, on the kernel's flannel-v6.1 (no flannel.1) and on the
userspace vxlan datapath (the IPv6 socket only, no IPv4 address on the TUN). The leases
are flanneld's ``0.0.0.0-0&<IPv6 subnet>`` records with PublicIP 0.0.0.0, subnet.env has
no IPv4 lines, ip-masq is IPv6 only, and ``overlay status`` shows the lease by its IPv6
subnet."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from control.subnet_env import parse_subnet_env
from overlay.lab.transfer import transfer
from overlay.observe import status_socket as status
from tests.helpers.commands import overlay_cmd
from tests.helpers.dual_stack import (
    DATAPATH_IDS,
    DATAPATHS,
    V6_ONLY,
    Pods,
    ip,
    ip_out,
    kernel_exact,
    leases,
    pings,
    pod6,
    start_nodes,
)
from tests.helpers.polling import poll

pytestmark = pytest.mark.netns

TRANSFER_BYTES = 4 << 20  # per direction and pair: the userspace IPv6 half is per packet


def nat_chain(node: str, binary: str) -> str:
    """``<binary> -t nat -S FLANNEL-POSTRTG`` in ``node``; empty when the chain is absent."""
    return subprocess.run(
        ["ip", "netns", "exec", node, binary, "-t", "nat", "-S", "FLANNEL-POSTRTG"],
        capture_output=True,
        text=True,
    ).stdout


@pytest.mark.parametrize(("backend", "flags"), DATAPATHS, ids=DATAPATH_IDS)
def test_ipv6_only_bed_pods_ping_and_move_data_every_pair(
    netns: Callable[[str], str],
    daemons: Any,
    tmp_path: Path,
    backend: dict[str, Any],
    flags: tuple[str, ...],
) -> None:
    config = {**V6_ONLY, "Backend": backend}
    nodes, started, registry = start_nodes(
        netns, daemons, tmp_path, config, *flags, "--ip-masq", count=3, ipv4=False
    )
    # subnet.env as flanneld's WriteSubnetFile writes it with IPv4 off.
    envs = [parse_subnet_env(d.subnet_file.read_text()) for d in started]
    for daemon, env in zip(started, envs, strict=True):
        text = daemon.subnet_file.read_text()
        assert text.startswith("FLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET="), text
        assert "FLANNEL_NETWORK" not in text and "FLANNEL_SUBNET" not in text
        assert env.ipv6_subnet is not None
    # The records: flanneld's IPv6-only keys and values; every other node is a peer.
    records = leases(registry)
    assert len(records) == 3
    for key, value in records.items():
        assert key.startswith("0.0.0.0-0&fd00:10:0:") and key.endswith("::-64"), key
        assert value["PublicIP"] == "0.0.0.0" and value["PublicIPv6"].startswith("2001:db8::")
        assert "BackendData" not in value
    for n, (daemon, env) in enumerate(zip(started, envs, strict=True), 1):
        assert env.ipv6_subnet is not None
        shown = status.query(daemon.socket)
        assert "subnet" not in shown["lease"] and "public_ip" not in shown["lease"]
        assert shown["lease"]["ipv6_subnet"] == str(env.ipv6_subnet.network)
        assert shown["lease"]["public_ipv6"] == f"2001:db8::{n}"
        assert shown["network"] == "fd00:10::/56" and shown["node"] == f"2001:db8::{n}"
        assert poll(lambda d=daemon: status.query(d.socket)["peer_count"] == 2, timeout=10)
        table = subprocess.run(
            overlay_cmd("status", "--status-socket", str(daemon.socket)),
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert table.startswith(f"node 2001:db8::{n} (eth0)"), table
        key = "/coreos.com/network/subnets/0.0.0.0-0&fd00:10:0:"
        assert f"lease      {env.ipv6_subnet.network}  ({key}" in table, table
    # Nothing IPv4 of ours in any node: no flannel.1, no IPv4 address or route on the
    # overlay devices, no IPv4 ip-masq chain; the IPv6 one is there.
    for node in nodes:
        assert ip_out(node, "link", "show", "flannel.1") == ""
        assert ip(node, "-4", "addr", "show").count("inet ") == 1  # lo's 127.0.0.1 alone
        assert ip(node, "-4", "route", "show") == ""
        assert nat_chain(node, "iptables") == ""
        assert "-A FLANNEL-POSTRTG" in nat_chain(node, "ip6tables")
    if flags:  # the kernel datapath: flannel-v6.1 alone, as flanneld makes it
        details = ip(nodes[0], "-d", "link", "show", "flannel-v6.1")
        assert "vxlan id 1 local 2001:db8::1 dev eth0" in details, details
    elif backend["Type"] == "vxlan":
        mac6 = status.query(started[0].socket)["vtep_mac6"]
        assert any(v.get("BackendV6Data", {}).get("VtepMAC") == mac6 for v in records.values())
    pods = [netns(f"p{n}") for n in range(1, 4)]
    addresses = [pod6(node, p, env) for node, p, env in zip(nodes, pods, envs, strict=True)]
    for src, dst in itertools.permutations(range(3), 2):
        assert poll(lambda s=src, d=dst: pings(pods[s], addresses[d]), timeout=10), (
            f"pod {src + 1} cannot ping {addresses[dst]}: " + ip(nodes[src], "-6", "route")
        )
    bed = Pods(dict(zip(pods, addresses, strict=True)))
    for src, dst in itertools.permutations(range(3), 2):
        transfer(bed, pods[src], pods[dst], TRANSFER_BYTES, port=5201 + src, timeout=60)
    for daemon in started:  # reconciled: the kernel holds exactly what we programmed
        assert poll(lambda d=daemon: kernel_exact(d), timeout=15), status.query(daemon.socket)
