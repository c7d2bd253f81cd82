"""Issue 19: the kernel datapaths' per-peer objects programmed in batches, checked against
a real kernel vxlan device with ``ip neigh``, ``bridge fdb`` and ``ip route``.

The daemon's ``KernelState`` runs in a namespace of its own (its netlink worker thread is
started there) with ``flannel.1`` on a veth, as on a kernel-vxlan node: 300 peers, then
one burst of mixed changes (removals, additions, edits of the public IP and VTEP MAC),
each time the kernel's tables are exactly the peers'. A node holding two leases (one
VTEP MAC, one public IP: one fdb entry wanted by both) keeps its fdb entry when one of
them goes. Dual stack: the IPv6 halves go through the same batches onto a real
``flannel-v6.1`` (IPv6 neighbours, fdb entries with IPv6 remotes, onlink routes), and a
check over both families repairs what is taken and reports what is not ours."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from control.lease import Lease
from overlay.kernel.objects import Address, KernelObject, Link, VxlanDevice, vxlan_peer
from overlay.kernel.reconcile import NODE, KernelState
from overlay.lab.netns import entered

pytestmark = pytest.mark.netns
DEVICE = "flannel.1"
DEVICE6 = "flannel-v6.1"
PEERS = 300
NETWORK6 = IPv6Network("fd00:10::/48")


class _Log:
    """Logs nothing, remembers the errors (a failed batch logs ``netlink_failed``)."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, dict[str, Any]]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.errors.append((event, fields))

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def mac_of(public_ip: IPv4Address, generation: int = 0) -> str:
    raw = int(public_ip).to_bytes(4, "big")
    return ":".join(f"{b:02x}" for b in (0x02, generation, *raw))


def lease(i: int, public: int | None = None, generation: int = 0) -> Lease:
    """Peer ``i``: subnet number ``i`` of 10.1.0.0/16 and up, public IP 198.18.1.0 +
    ``public`` (default ``i``), its VTEP MAC derived from that (and ``generation``)."""
    host = i if public is None else public
    ip = IPv4Address(int(IPv4Address("198.18.1.0")) + host)
    data = {"VNI": 1, "VtepMAC": mac_of(ip, generation)}
    return Lease(
        IPv4Network((int(IPv4Address("10.1.0.0")) + (i << 8), 24)),
        ip,
        backend_type="vxlan",
        backend_data=data,
        create_revision=i + 1,
    )


def vtep_mac(lease: Lease) -> str:
    assert lease.backend_data is not None
    return str(lease.backend_data["VtepMAC"])


def program(lease: Lease, *_: object) -> list[KernelObject]:
    """flanneld's three objects for a vxlan peer (``*_``: the reachability test that
    vxlan without DirectRouting does not ask)."""
    mac = vtep_mac(lease)
    return vxlan_peer(DEVICE, lease.subnet, lease.public_ip, mac)


def ip_json(ns: str, *argv: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True
    ).stdout
    return list(json.loads(out or "[]"))


def kernel_tables(
    ns: str, device: str = DEVICE, family: str = "-4"
) -> tuple[set[tuple[str, str]], set[tuple[str, str]], set[str]]:
    """(neighbours (ip, mac), fdb entries (mac, remote), onlink routes (dst via)) on the
    vxlan device, as iproute2 shows them (``family``: ``-4`` or ``-6``)."""
    neigh = {
        (n["dst"], n["lladdr"])
        for n in ip_json(ns, "ip", family, "-j", "neigh", "show", "dev", device, "nud", "permanent")
    }
    fdb = {
        (f["mac"], f["dst"])
        for f in ip_json(ns, "bridge", "-j", "fdb", "show", "dev", device)
        if "dst" in f
    }
    routes = {
        f"{r['dst']} via {r['gateway']}"
        for r in ip_json(ns, "ip", family, "-j", "route", "show", "dev", device)
        if "onlink" in r.get("flags", [])
    }
    return neigh, fdb, routes


def wanted_tables(
    leases: list[Lease],
) -> tuple[set[tuple[str, str]], set[tuple[str, str]], set[str]]:
    neigh = {(str(x.subnet.network_address), vtep_mac(x)) for x in leases}
    fdb = {(vtep_mac(x), str(x.public_ip)) for x in leases}
    routes = {f"{x.subnet} via {x.subnet.network_address}" for x in leases}
    return neigh, fdb, routes


@pytest.fixture
def node(netns: Callable[[str], str]) -> Iterator[tuple[str, KernelState, _Log]]:
    """A namespace with a veth underlay and the daemon's KernelState for ``flannel.1``."""
    ns = netns("kb")
    for command in (
        ["ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1"],
        ["ip", "addr", "add", "198.18.0.1/15", "dev", "u0"],
        ["ip", "link", "set", "u0", "up"],
        ["ip", "link", "set", "u1", "up"],
    ):
        subprocess.run(["ip", "netns", "exec", ns, *command], check=True)
    log = _Log()
    with entered(ns):  # the state's worker thread starts in here and stays
        state = KernelState(
            log, program=program, devices=(DEVICE,), networks=(IPv4Network("10.0.0.0/8"),)
        )
        node_objects: list[KernelObject] = [
            VxlanDevice(DEVICE, vni=1, local=IPv4Address("198.18.0.1"), underlay="u0", port=8472),
            Link(DEVICE, mtu=1450),
            Address(DEVICE, IPv4Address("10.0.0.0")),
        ]
        state.set(NODE, node_objects).result(timeout=30)
    try:
        yield ns, state, log
    finally:
        asyncio.run(state.stop())


def settled(state: KernelState) -> dict[str, Any]:
    """After everything submitted so far has run (the worker runs in order)."""
    state.resync().result(timeout=60)
    return state.status()


def test_300_peers_then_a_burst_of_mixed_changes_are_exactly_the_kernel_tables(
    node: tuple[str, KernelState, _Log],
) -> None:
    ns, state, log = node
    peers = {x.subnet: x for x in (lease(i) for i in range(1, PEERS + 1))}
    state.peers_changed(list(peers.values()), [])
    st = settled(state)
    assert kernel_tables(ns) == wanted_tables(list(peers.values()))
    assert st["kernel"]["missing"] == [] and st["kernel"]["extra"] == []
    assert len(st["programmed"]) == PEERS

    # One burst, as a watch delivers it: 100 go, 100 come, 50 move to another public IP,
    # 50 get a new VTEP MAC (their node's device was made again).
    removed = [peers.pop(lease(i).subnet) for i in range(1, 101)]
    added = [lease(i) for i in range(PEERS + 1, PEERS + 101)]
    moved = [lease(i, public=i + 1000) for i in range(101, 151)]
    remade = [lease(i, generation=1) for i in range(151, 201)]
    for x in added + moved + remade:
        peers[x.subnet] = x
    state.peers_changed(added[:50] + moved, removed[:50])
    state.peers_changed(added[50:] + remade, removed[50:])
    st = settled(state)
    assert kernel_tables(ns) == wanted_tables(list(peers.values()))
    assert st["kernel"]["missing"] == [] and st["kernel"]["extra"] == []
    assert sorted(st["programmed"]) == sorted(str(s) for s in peers)
    assert st["netlink_errors"] == 0 and log.errors == []


def test_a_node_with_two_leases_keeps_its_fdb_entry_when_one_goes(
    node: tuple[str, KernelState, _Log],
) -> None:
    """Both leases carry the node's one VTEP MAC and public IP: one fdb entry, wanted by
    both; removing one lease's objects must not take the other's fdb entry with it."""
    ns, state, log = node
    first, second = lease(1), lease(2, public=1)
    state.peers_changed([first, second], [])
    settled(state)
    assert kernel_tables(ns) == wanted_tables([first, second])
    state.peers_changed([], [first])
    # Read once the removal has run and before any check could repair what it took: a
    # no-op queued behind it on the state's (in-order) worker.
    state.forget("barrier").result(timeout=30)
    neigh, fdb, routes = kernel_tables(ns)
    want_neigh, want_fdb, want_routes = wanted_tables([second])
    assert fdb == want_fdb, "the remaining lease's fdb entry went with the other lease"
    assert (neigh, routes) == (want_neigh, want_routes)
    assert log.errors == []


# -- dual stack ------------------------------------------------------------------------


def lease6(i: int, generation: int = 0) -> Lease:
    """Peer ``i`` with an IPv6 half: subnet ``i`` of NETWORK6 (/64s), PublicIPv6
    2001:db8:1::``i``, its flannel-v6 VTEP MAC derived from that."""
    base = lease(i, generation=generation)
    public6 = IPv6Address(int(IPv6Address("2001:db8:1::")) + i)
    mac6 = ":".join(f"{b:02x}" for b in (0x02, 0x60 + generation, 0, 0, i >> 8, i & 0xFF))
    return Lease(
        base.subnet,
        base.public_ip,
        backend_type="vxlan",
        backend_data=base.backend_data,
        ipv6_subnet=IPv6Network((int(NETWORK6.network_address) + (i << 64), 64)),
        public_ipv6=public6,
        backend_v6_data={"VNI": 1, "VtepMAC": mac6},
        create_revision=i + 1,
    )


def program_dual(lease: Lease, *_: object) -> list[KernelObject]:
    """Both halves, as the kernel vxlan backend makes them: flannel.1 and flannel-v6.1."""
    assert lease.ipv6_subnet is not None and lease.public_ipv6 is not None
    assert lease.backend_v6_data is not None
    mac6 = str(lease.backend_v6_data["VtepMAC"])
    return program(lease) + vxlan_peer(DEVICE6, lease.ipv6_subnet, lease.public_ipv6, mac6)


def wanted_tables6(
    leases: list[Lease],
) -> tuple[set[tuple[str, str]], set[tuple[str, str]], set[str]]:
    neigh: set[tuple[str, str]] = set()
    fdb: set[tuple[str, str]] = set()
    routes: set[str] = set()
    for x in leases:
        assert x.ipv6_subnet is not None and x.backend_v6_data is not None
        mac6 = str(x.backend_v6_data["VtepMAC"])
        neigh.add((str(x.ipv6_subnet.network_address), mac6))
        fdb.add((mac6, str(x.public_ipv6)))
        routes.add(f"{x.ipv6_subnet} via {x.ipv6_subnet.network_address}")
    return neigh, fdb, routes


@pytest.fixture
def dual_node(netns: Callable[[str], str]) -> Iterator[tuple[str, KernelState, _Log]]:
    """A namespace with a dual-stack veth underlay, flannel.1 and flannel-v6.1, and the
    daemon's KernelState for both (both overlay networks: it checks both families)."""
    ns = netns("kb6")
    for command in (
        ["ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1"],
        ["ip", "addr", "add", "198.18.0.1/15", "dev", "u0"],
        ["ip", "-6", "addr", "add", "2001:db8::1/32", "dev", "u0", "nodad"],
        ["ip", "link", "set", "u0", "up"],
        ["ip", "link", "set", "u1", "up"],
    ):
        subprocess.run(["ip", "netns", "exec", ns, *command], check=True)
    log = _Log()
    with entered(ns):
        state = KernelState(
            log,
            program=program_dual,
            devices=(DEVICE, DEVICE6),
            networks=(IPv4Network("10.0.0.0/8"), NETWORK6),
        )
        node_objects: list[KernelObject] = [
            VxlanDevice(DEVICE, vni=1, local=IPv4Address("198.18.0.1"), underlay="u0", port=8472),
            Link(DEVICE, mtu=1450),
            Address(DEVICE, IPv4Address("10.0.0.0")),
            VxlanDevice(DEVICE6, vni=1, local=IPv6Address("2001:db8::1"), underlay="u0", port=8472),
            Link(DEVICE6, mtu=1430),
            Address(DEVICE6, NETWORK6.network_address),
        ]
        state.set(NODE, node_objects).result(timeout=30)
    try:
        yield ns, state, log
    finally:
        asyncio.run(state.stop())


def test_dual_stack_peers_are_batched_onto_flannel_v6_and_checked_in_both_families(
    dual_node: tuple[str, KernelState, _Log],
) -> None:
    ns, state, log = dual_node
    peers = {x.subnet: x for x in (lease6(i) for i in range(1, PEERS + 1))}
    state.peers_changed(list(peers.values()), [])
    st = settled(state)
    assert kernel_tables(ns) == wanted_tables(list(peers.values()))
    assert kernel_tables(ns, DEVICE6, "-6") == wanted_tables6(list(peers.values()))
    assert st["kernel"]["missing"] == [] and st["kernel"]["extra"] == []
    assert st["netlink_errors"] == 0 and log.errors == []

    # A burst: 100 go, 50 get new VTEP MACs in both families.
    removed = [peers.pop(lease6(i).subnet) for i in range(1, 101)]
    remade = [lease6(i, generation=1) for i in range(101, 151)]
    for x in remade:
        peers[x.subnet] = x
    state.peers_changed(remade, removed)
    st = settled(state)
    assert kernel_tables(ns, DEVICE6, "-6") == wanted_tables6(list(peers.values()))
    assert kernel_tables(ns) == wanted_tables(list(peers.values()))
    assert st["kernel"]["missing"] == [] and st["kernel"]["extra"] == []

    # Taken from the kernel: put back. Not ours (inside the IPv6 network, on our device):
    # reported, left alone.
    some = peers[lease6(200).subnet]
    assert some.ipv6_subnet is not None and some.backend_v6_data is not None
    vtep6, mac6 = str(some.ipv6_subnet.network_address), str(some.backend_v6_data["VtepMAC"])
    for command in (
        ["ip", "-6", "neigh", "del", vtep6, "dev", DEVICE6],
        ["bridge", "fdb", "del", mac6, "dev", DEVICE6, "dst", str(some.public_ipv6)],
        ["ip", "-6", "route", "del", str(some.ipv6_subnet), "dev", DEVICE6],
        ["ip", "-6", "route", "add", "fd00:10:0:ffff::/64", "via", "2001:db8::99"],
        ["ip", "-6", "neigh", "add", "fd00:10:0:fffe::", "lladdr", "02:00:00:00:00:99",
         "dev", DEVICE6, "nud", "permanent"],
    ):  # fmt: skip
        subprocess.run(["ip", "netns", "exec", ns, *command], check=True)
    st = settled(state)
    assert kernel_tables(ns, DEVICE6, "-6")[0] >= wanted_tables6([some])[0]
    assert st["repairs"] == {"fdb": 1, "neighbour": 1, "route": 1}
    assert st["kernel"]["missing"] == []
    assert st["kernel"]["extra"] == [
        f"neighbour fd00:10:0:fffe:: lladdr 02:00:00:00:00:99 dev {DEVICE6}",
        "route fd00:10:0:ffff::/64 via 2001:db8::99 dev u0",
    ]
