"""Issue 10 on running testbeds (real namespaces, TUN, kernel vxlan, file registry):

- item 1: no other user can bind the dataplane ports while the daemon runs: not 8285
  (udp, two SO_REUSEPORT workers), not 8472 (userspace vxlan, one socket; the kernel's
  vxlan device), with or without SO_REUSEADDR / SO_REUSEPORT;
- the standing barrage: every malformed datagram class during checked transfers, every
  datagram accounted for by the receiver's drop counters (bench/barrage.py holds the
  classes; `python -m bench.barrage` is the 100k version);
- item 3: hostile leases in the registry of running daemons become no peer (a /25 inside
  a node's /24 would take its traffic), each is one bounded warning;
- item 5: garbage in the registry file leaves running daemons running with their state.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from bench import barrage
from control.file_registry import FileRegistry
from overlay.lab.testbed import Testbed
from overlay.lab.transfer import transfer
from tests.helpers.polling import poll
from tests.helpers.testbed import node_status

pytestmark = pytest.mark.netns

SUBNETS = "/coreos.com/network/subnets/"
PER_CLASS = 150  # x 13-17 classes per backend: a few seconds


@pytest.fixture(scope="module")
def udp_bed() -> Iterator[Testbed]:
    with barrage.testbed_for("udp", "h" + uuid.uuid4().hex[:7]) as bed:
        bed.up()
        yield bed


@pytest.fixture(scope="module")
def vxlan_bed() -> Iterator[Testbed]:
    with barrage.testbed_for("vxlan", "h" + uuid.uuid4().hex[:7]) as bed:
        bed.up()
        yield bed


def log_events(bed: Testbed, i: int) -> list[dict[str, Any]]:
    events = []
    for line in bed.log_file(i).read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"event": line, "level": "unparsed"})
    return events


def pings(bed: Testbed, source: str, target: str, timeout: float = 5.0) -> bool:
    address = bed.pod_ip(target)

    def once() -> bool:
        return (
            bed.exec(source, ["ping", "-c", "1", "-W", "1", address], capture_output=True)
        ).returncode == 0

    return bool(poll(once, timeout, 0.1))


# -- item 1: the ports are ours alone ---------------------------------------------------------

BIND_AS_NOBODY = """
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
address, port = sys.argv[1], int(sys.argv[2])
results = []
for name, options in [("plain", []), ("SO_REUSEADDR", [socket.SO_REUSEADDR]),
                      ("SO_REUSEPORT", [socket.SO_REUSEPORT]),
                      ("both", [socket.SO_REUSEADDR, socket.SO_REUSEPORT])]:
    for host in (address, "0.0.0.0"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in options:
            s.setsockopt(socket.SOL_SOCKET, option, 1)
        try:
            s.bind((host, port))
            results.append(f"{name}@{host}: BOUND")
        except OSError as e:
            results.append(f"{name}@{host}: errno {e.errno}")
        s.close()
print(os.geteuid(), *results, sep="\\n")
"""


@pytest.mark.parametrize(
    ("bed_name", "node", "port", "what"),
    [
        ("udp_bed", 1, 8285, "udp, two SO_REUSEPORT workers"),
        ("vxlan_bed", 1, 8472, "userspace vxlan, one socket"),
        ("vxlan_bed", 3, 8472, "the kernel's vxlan device flannel.1"),
    ],
    ids=["udp-workers", "vxlan-userspace", "vxlan-kernel"],
)
def test_nobody_cannot_bind_the_dataplane_port(
    request: pytest.FixtureRequest, bed_name: str, node: int, port: int, what: str
) -> None:
    bed: Testbed = request.getfixturevalue(bed_name)
    result = bed.exec(
        f"n{node}",
        [sys.executable, "-c", BIND_AS_NOBODY, str(bed.node_ip(node)), str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    uid, *attempts = result.stdout.split("\n")[:-1]
    assert uid == "65534", result.stderr
    assert len(attempts) == 8
    bound = [a for a in attempts if a.endswith("BOUND")]
    assert bound == [], f"{what}: nobody bound port {port}: {bound}"
    assert all(a.endswith("errno 98") for a in attempts), attempts  # EADDRINUSE
    assert bed.status()["nodes"][node - 1]["running"]


# -- the standing barrage ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_barrage_during_checked_transfers_is_counted_datagram_by_datagram(
    request: pytest.FixtureRequest, backend: str
) -> None:
    bed: Testbed = request.getfixturevalue(f"{backend}_bed")
    result = barrage.run(bed, backend, PER_CLASS, transfer, transfer_bytes=20_000_000)
    print(barrage.report(result, 0.0))
    problems = result.problems()
    assert not problems, "\n".join(problems) + "\n" + barrage.report(result, 0.0)
    assert len(result.transfers) >= 1
    assert pings(bed, "n1-p1", "n2-p1") and pings(bed, "n2-p1", "n1-p1")


# -- item 3: hostile leases next to running daemons ---------------------------------------------


def test_hostile_leases_become_no_peer_and_each_is_one_bounded_warning(udp_bed: Testbed) -> None:
    bed = udp_bed
    registry = FileRegistry(bed.registry_file)
    n2 = bed.status()["nodes"][1]["subnet"]
    half = n2.replace("/24", "/25")  # n2-p1 (.2) is in its lower half
    # A lease for a subnet of the network that nobody holds, to carry the bad PublicIPs.
    free = "198.18.254.0/24"
    hostile = {
        half.replace("/", "-"): {"PublicIP": "192.0.2.66"},  # would take n2's pods' traffic
        "198.18.0.0-16": {"PublicIP": "192.0.2.67"},  # the whole network
        "10.9.9.0-24": {"PublicIP": "192.0.2.68"},  # outside the network
        free.replace("/", "-"): {"PublicIP": "127.0.0.1", "Pad": "x" * 1_400_000},
        "198.18.253.0-24": {"PublicIP": "255.255.255.255"},
    }
    peers_before = {i: {p["subnet"] for p in node_status(bed, i)["peers"]} for i in (1, 2)}
    seen_before = {i: len(log_events(bed, i)) for i in (1, 2)}
    try:
        for key, value in hostile.items():
            registry.put_sync(f"{SUBNETS}{key}", json.dumps(value).encode(), 3600)

        def warned(i: int) -> list[dict[str, Any]]:
            new = log_events(bed, i)[seen_before[i] :]
            return [e for e in new if e["event"] == "lease_record_invalid"]

        for i in (1, 2):
            assert poll(lambda i=i: len(warned(i)) >= len(hostile), 10), warned(i)
        time.sleep(0.5)
        for i in (1, 2):
            assert {p["subnet"] for p in node_status(bed, i)["peers"]} == peers_before[i]
            found = warned(i)
            assert len(found) == len(hostile), found
            assert {e["key"].strip("'")[len(SUBNETS) :] for e in found} == set(hostile)
            lines = bed.log_file(i).read_text().splitlines()[seen_before[i] :]
            assert max(len(line) for line in lines) < 1000
        # n1 still reaches n2's pod: the /25 did not take its traffic.
        assert pings(bed, "n1-p1", "n2-p1")
    finally:
        for key in hostile:
            registry.delete_sync(f"{SUBNETS}{key}")


def test_a_second_lease_of_a_node_is_a_peer_too(udp_bed: Testbed) -> None:
    """Both leases of one public IP are in the table (the receive path accepts traffic
    for each, via PeerTable.sources_of); the dataplane maps the IP to the older."""
    bed = udp_bed
    registry = FileRegistry(bed.registry_file)
    extra = "198.18.252.0-24"
    value = {"PublicIP": str(bed.node_ip(1)), "PublicIPv6": None}
    registry.put_sync(f"{SUBNETS}{extra}", json.dumps(value).encode(), None)  # a reservation
    try:

        def n2_peers() -> set[str]:
            return {p["subnet"] for p in node_status(bed, 2)["peers"]}

        n1 = bed.status()["nodes"][0]["subnet"]
        assert poll(lambda: {n1, "198.18.252.0/24"} <= n2_peers(), 10), n2_peers()
        assert pings(bed, "n1-p1", "n2-p1")
    finally:
        registry.delete_sync(f"{SUBNETS}{extra}")
    assert poll(lambda: "198.18.252.0/24" not in n2_peers(), 10)


# -- item 5: garbage in the registry file under running daemons ---------------------------------


def test_garbage_in_the_registry_file_leaves_the_daemons_running(udp_bed: Testbed) -> None:
    bed = udp_bed
    path = bed.registry_file
    good = path.read_bytes()
    seen_before = {i: len(log_events(bed, i)) for i in (1, 2)}

    def peers(i: int) -> list[tuple[str, str, int]]:  # who, not their (moving) traffic
        return [(p["subnet"], p["public_ip"], p["port"]) for p in node_status(bed, i)["peers"]]

    peers_before = {i: peers(i) for i in (1, 2)}

    def replace(content: bytes | None, size: int | None = None) -> None:
        tmp = path.with_name(".registry.json.test")
        tmp.write_bytes(content or b"")
        if size is not None:
            os.truncate(tmp, size)  # sparse
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    try:
        for content, size in [
            (b"\xff\xfe\x00 not utf-8 \x80\x81", None),
            (good[: len(good) // 2], None),
            (b"", 80 * 1024 * 1024),  # larger than a registry may be
        ]:
            replace(content, size)
            time.sleep(1.5)  # polled every 0.1 s, swept every 1 s
            for i in (1, 2):
                assert bed.status()["nodes"][i - 1]["running"], bed.log_file(i).read_text()[-800:]
                assert peers(i) == peers_before[i]
                links = bed.exec(f"n{i}", ["ip", "-o", "link"], capture_output=True, text=True)
                assert "flannel0" in links.stdout
            assert pings(bed, "n1-p1", "n2-p1")
    finally:
        replace(good)
    for i in (1, 2):

        def events(i: int = i) -> list[str]:
            return [e["event"] for e in log_events(bed, i)[seen_before[i] :]]

        assert poll(lambda: "watch_recovered" in events(), 15), events()
        assert events().count("watch_failed") == 1, events()
        assert events().count("watch_recovered") == 1, events()
        assert not [e for e in log_events(bed, i)[seen_before[i] :] if e["level"] == "unparsed"]
