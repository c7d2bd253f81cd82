"""Reconciliation: every kernel object a daemon programs is put back when it disappears,
within a fraction of a second (netlink events) or at the 10 s resync, counted by kind in
`overlay status`'s ``repairs`` and logged once; ``kernel`` says what is missing or extra.

Three small testbeds: vxlan with n1 userspace (flannel0) and n2 kernel (flannel.1),
host-gw, and vxlan DirectRouting (plain routes between nodes on one segment)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from overlay.lab.testbed import Testbed
from tests.helpers.polling import poll
from tests.helpers.testbed import node_status, two_nodes

pytestmark = pytest.mark.netns
EVENT_REPAIR = 3.0  # seconds: well under the 10 s periodic resync, so events did it


@pytest.fixture(scope="module")
def vx() -> Iterator[Testbed]:
    yield from two_nodes("rv", backend="vxlan", kernel_nodes=(2,), pods_per_node=1)


@pytest.fixture(scope="module")
def hg() -> Iterator[Testbed]:
    yield from two_nodes("rh", backend="host-gw", pods_per_node=1)


@pytest.fixture(scope="module")
def dr() -> Iterator[Testbed]:
    yield from two_nodes(
        "rd", backend="vxlan", kernel_nodes=(2,), direct_routing=True, pods_per_node=0
    )


def sh(bed: Testbed, node: str, command: str) -> str:
    result = bed.exec(node, ["sh", "-c", command], capture_output=True, text=True)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def has_route(
    bed: Testbed, node: str, dst: str, dev: str, gateway: str | None = None, onlink: bool = False
) -> bool:
    for route in json.loads(sh(bed, node, "ip -j route show") or "[]"):
        if route.get("dst") == dst and route.get("dev") == dev:
            flags = route.get("flags", [])
            return route.get("gateway") == gateway and ("onlink" in flags) == onlink
    return False


def is_up(bed: Testbed, node: str, dev: str) -> bool:
    links = json.loads(sh(bed, node, f"ip -j link show {dev} 2>/dev/null || echo []"))
    return bool(links) and "UP" in links[0].get("flags", [])


def peer(bed: Testbed, i: int) -> dict[str, Any]:
    """The other node's entry in node i's status (subnet, public_ip), once it has it."""
    assert poll(lambda: len(node_status(bed, i)["peers"]) == 1, 5.0)
    (other,) = node_status(bed, i)["peers"]
    return dict(other)


def vtep_mac(bed: Testbed, node: str) -> str:
    return str(node_status(bed, node)["vtep_mac"])


def repairs(bed: Testbed, i: int) -> dict[str, int]:
    return dict(node_status(bed, i)["repairs"])


def kernel(bed: Testbed, i: int) -> dict[str, Any]:
    return dict(node_status(bed, i)["kernel"])


def events(bed: Testbed, i: int, name: str) -> list[dict[str, Any]]:
    found = []
    for line in bed.log_file(i).read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == name:
            found.append(entry)
    return found


def ping(bed: Testbed, src: str, dst: str) -> bool:
    argv = ["ping", "-c", "2", "-i", "0.2", "-W", "1", dst]
    return bed.exec(src, argv, capture_output=True).returncode == 0


def break_and_watch(
    bed: Testbed,
    i: int,
    command: str,
    present: Callable[[], bool],
    kinds: dict[str, int],
) -> float:
    """Run ``command`` in node i, check it removed the object, and wait for the daemon to
    put it back: the repairs counter must move by ``kinds`` and each repair be logged
    once. The seconds it took."""
    assert poll(present, 2.0), (
        f"the object is not there to begin with: {sh(bed, f'n{i}', 'ip -j route show')}"
    )
    before = repairs(bed, i)
    logged = len(events(bed, i, "kernel_object_repaired"))
    sh(bed, f"n{i}", command)
    start = time.monotonic()
    assert poll(lambda: not present() or time.monotonic() - start > 0.05, 1.0)
    assert poll(present, EVENT_REPAIR, every=0.02), f"not repaired: {command}"
    took = time.monotonic() - start
    expected = {kind: before.get(kind, 0) + n for kind, n in kinds.items()}
    assert poll(lambda: {k: repairs(bed, i).get(k, 0) for k in kinds} == expected, 2.0), (
        repairs(bed, i),
        expected,
    )
    assert poll(lambda: kernel(bed, i)["missing"] == [], 2.0), kernel(bed, i)
    new = events(bed, i, "kernel_object_repaired")[logged:]
    assert len(new) == sum(kinds.values()), [(e["kind"], e["object"]) for e in new]
    print(f"{command!r}: back after {took * 1000:.0f} ms, {dict(kinds)}")
    return took


# -- kernel vxlan (n2) ---------------------------------------------------------------------


def test_status_is_what_the_kernel_has(vx: Testbed) -> None:
    for i in (1, 2):
        state = kernel(vx, i)
        assert state["missing"] == [] and state["extra"] == [], state
        assert state["checked_at"] is not None
    assert kernel(vx, 1)["objects"] == 3  # flannel0: link, address, network route
    assert kernel(vx, 2)["objects"] == 6  # flannel.1: device, link, address; n1's 3


def vxlan_objects(vx: Testbed) -> dict[str, Callable[[], bool]]:
    other = peer(vx, 2)
    vtep = other["subnet"].split("/")[0]
    mac = vtep_mac(vx, "n1")

    def out(command: str) -> str:  # empty while the device is gone
        return sh(vx, "n2", f"{command} 2>/dev/null || true")

    return {
        "neighbour": lambda: f"{vtep} lladdr {mac} PERMANENT" in out("ip neigh show dev flannel.1"),
        "fdb": lambda: (
            f"{mac} dst {other['public_ip']} self permanent" in out("bridge fdb show dev flannel.1")
        ),
        "route": lambda: has_route(vx, "n2", other["subnet"], "flannel.1", vtep, onlink=True),
        "address": lambda: f"inet {own_vtep(vx)}/32" in out("ip -4 addr show dev flannel.1"),
        "link": lambda: is_up(vx, "n2", "flannel.1"),
        "vxlan_device": lambda: "vxlan id 1" in out("ip -d link show flannel.1"),
    }


def own_vtep(vx: Testbed) -> str:
    return str(node_status(vx, 2)["lease"]["subnet"]).split("/")[0]


@pytest.mark.parametrize(
    ("kind", "command"),
    [
        ("neighbour", "ip neigh del {vtep} dev flannel.1"),
        ("fdb", "bridge fdb del {mac} dev flannel.1 dst {public_ip}"),
        ("route", "ip route del {subnet}"),
        ("address", "ip addr del {own}/32 dev flannel.1"),
        ("link", "ip link set flannel.1 down"),
    ],
)
def test_kernel_vxlan_object_comes_back(vx: Testbed, kind: str, command: str) -> None:
    other = peer(vx, 2)
    filled = command.format(
        vtep=other["subnet"].split("/")[0],
        mac=vtep_mac(vx, "n1"),
        public_ip=other["public_ip"],
        subnet=other["subnet"],
        own=own_vtep(vx),
    )
    kinds = {kind: 1}
    if kind == "address":  # the device's last IPv4 address: the kernel flushes its
        kinds = {"address": 1, "neighbour": 1, "route": 1}  # neighbours and routes too
    if kind == "link":  # a device set down loses its neighbours and routes with it
        kinds = {"link": 1, "neighbour": 1, "route": 1}
    break_and_watch(vx, 2, filled, vxlan_objects(vx)[kind], kinds)
    assert ping(vx, "n2-p1", vx.pod_ip("n1-p1")) and ping(vx, "n1-p1", vx.pod_ip("n2-p1"))


def test_deleted_vxlan_device_is_recreated_with_everything_on_it(vx: Testbed) -> None:
    present = vxlan_objects(vx)
    took = break_and_watch(
        vx,
        2,
        "ip link del flannel.1",
        lambda: all(check() for check in present.values()),
        {"vxlan_device": 1, "link": 1, "address": 1, "neighbour": 1, "fdb": 1, "route": 1},
    )
    assert took < EVENT_REPAIR
    assert ping(vx, "n2-p1", vx.pod_ip("n1-p1")) and ping(vx, "n1-p1", vx.pod_ip("n2-p1"))


def test_extra_objects_are_reported_not_removed(vx: Testbed) -> None:
    stray = "198.18.250.0/24 via 198.18.250.0 dev flannel.1 onlink"
    sh(vx, "n2", f"ip route add {stray}")
    try:
        assert poll(lambda: kernel(vx, 2)["extra"] == [f"route {stray}"], 3.0), kernel(vx, 2)
        assert stray.split()[0] in sh(vx, "n2", "ip route show")  # left in place
    finally:
        sh(vx, "n2", "ip route del 198.18.250.0/24")
    assert poll(lambda: kernel(vx, 2)["extra"] == [], 3.0)


# -- the TUN (n1, userspace vxlan) ---------------------------------------------------------


def tun_objects(vx: Testbed) -> dict[str, Callable[[], bool]]:
    own = str(node_status(vx, 1)["lease"]["subnet"]).split("/")[0]

    def out(command: str) -> str:  # empty while the device is gone
        return sh(vx, "n1", f"{command} 2>/dev/null || true")

    return {
        "address": lambda: f"inet {own}/32" in out("ip -4 addr show dev flannel0"),
        "route": lambda: has_route(vx, "n1", str(vx.network), "flannel0"),
        "link": lambda: is_up(vx, "n1", "flannel0"),
    }


@pytest.mark.parametrize(
    ("kind", "command", "kinds"),
    [
        ("address", "ip addr del {own}/32 dev flannel0", {"address": 1, "route": 1}),
        ("route", "ip route del {network} dev flannel0", {"route": 1}),
        ("link", "ip link set flannel0 down", {"link": 1, "route": 1}),
    ],
)
def test_tun_object_comes_back(vx: Testbed, kind: str, command: str, kinds: dict[str, int]) -> None:
    own = str(node_status(vx, 1)["lease"]["subnet"]).split("/")[0]
    filled = command.format(own=own, network=vx.network)
    break_and_watch(vx, 1, filled, tun_objects(vx)[kind], kinds)
    assert ping(vx, "n1-p1", vx.pod_ip("n2-p1"))


def test_deleted_tun_is_recreated_and_forwarding_resumes(vx: Testbed) -> None:
    present = tun_objects(vx)
    break_and_watch(
        vx, 1, "ip link del flannel0", lambda: all(c() for c in present.values()), {"tun": 1}
    )
    assert events(vx, 1, "tun_lost")
    assert poll(lambda: ping(vx, "n1-p1", vx.pod_ip("n2-p1")), 5.0)
    assert ping(vx, "n2-p1", vx.pod_ip("n1-p1"))


# -- host-gw and DirectRouting routes ------------------------------------------------------


def test_host_gw_route_comes_back(hg: Testbed) -> None:
    other = peer(hg, 1)
    break_and_watch(
        hg,
        1,
        f"ip route del {other['subnet']}",
        lambda: has_route(hg, "n1", other["subnet"], "eth0", other["public_ip"]),
        {"route": 1},
    )
    assert ping(hg, "n1-p1", hg.pod_ip("n2-p1"))


@pytest.mark.parametrize("i", [1, 2], ids=["userspace", "kernel"])
def test_direct_routing_route_comes_back(dr: Testbed, i: int) -> None:
    other = peer(dr, i)
    break_and_watch(
        dr,
        i,
        f"ip route del {other['subnet']}",
        lambda: has_route(dr, f"n{i}", other["subnet"], "eth0", other["public_ip"]),
        {"route": 1},
    )
