"""--ip-masq and the FORWARD rules with the machine's real iptables, on a 2-node testbed:
flanneld's chains and rules, pod traffic leaving the overlay masqueraded and pod-to-pod
traffic not, a FORWARD DROP policy that still forwards, a deleted rule repaired within
the resync, and every rule gone after the daemon stops."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from control.subnet_env import parse_subnet_env
from overlay.lab.testbed import Testbed
from tests.helpers.polling import poll
from tests.helpers.testbed import node_status

pytestmark = pytest.mark.netns
OUTSIDE = "192.0.2.254"  # on the underlay bridge: outside the overlay, no route back to pods
RESYNC = 3  # --iptables-resync for this testbed
MASQ = '-m comment --comment "flanneld masq"'
FWD = '-m comment --comment "flanneld forward"'
FWD_RULE = ("-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD")

# Who connected, as the server saw it: prints the peer address of one TCP connection.
PEER_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, peer = s.accept()
print(peer[0], flush=True)
conn.close()
"""


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    tb = Testbed(
        "m" + uuid.uuid4().hex[:7],
        nodes=2,
        pods_per_node=1,
        registry="file",
        daemon_args=("--ip-masq", "--iptables-resync", str(RESYNC)),
    )
    try:
        tb.up()
        subprocess.run(
            ["ip", "-n", tb.underlay_ns, "addr", "add", f"{OUTSIDE}/24", "dev", tb.bridge],
            check=True,
        )
        for i in (1, 2):  # the pods reach OUTSIDE through their node (the CNI gives them
            pod = f"n{i}-p1"  # only the overlay network's route)
            gateway = _gateway(tb, pod)
            tb.exec(pod, ["ip", "route", "add", f"{OUTSIDE}/32", "via", gateway], check=True)
        yield tb
    finally:
        tb.down()


def _gateway(bed: Testbed, pod: str) -> str:
    routes = json.loads(
        bed.exec(pod, ["ip", "-j", "route"], capture_output=True, text=True, check=True).stdout
    )
    return str(next(r["gateway"] for r in routes if r.get("dst") == str(bed.network)))


def iptables_save(bed: Testbed, node: str, table: str) -> list[str]:
    out = bed.exec(node, ["iptables-save", "-t", table], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.startswith(("-A", ":"))]


def iptables(bed: Testbed, node: str, *args: str, check: bool = True) -> int:
    return bed.exec(
        node, ["iptables", "-w", "5", *args], capture_output=True, check=check
    ).returncode


def subnet(bed: Testbed, i: int) -> str:
    return str(parse_subnet_env(bed.subnet_file(i).read_text()).subnet.network)


def peer_seen_by(bed: Testbed, server_ns: str, address: str, client: str, port: int) -> str:
    """The source address a TCP server in ``server_ns`` sees when ``client`` connects."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, sys.executable, "-c", PEER_SERVER, address, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        code = (
            "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), "
            "timeout=5).close()"
        )
        result = bed.exec(
            client, [sys.executable, "-c", code, address, str(port)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        return server.stdout.readline().strip()
    finally:
        server.kill()
        server.wait()


def ping(bed: Testbed, src: str, dst: str, count: int = 2) -> bool:
    argv = ["ping", "-c", str(count), "-i", "0.2", "-W", "1", dst]
    return bed.exec(src, argv, capture_output=True).returncode == 0


def checks(bed: Testbed, i: int) -> int:
    return int(node_status(bed, i)["iptables"]["checks"])


def repairs(bed: Testbed, i: int) -> int:
    return int(node_status(bed, i)["repairs"].get("iptables", 0))


def just_checked(bed: Testbed, i: int) -> None:
    """Return right after the daemon's periodic check: the next is RESYNC s away."""
    before = checks(bed, i)
    assert poll(lambda: checks(bed, i) > before, timeout=RESYNC + 3)


# -- the tests -----------------------------------------------------------------------------


def test_flanneld_rules_and_subnet_env(bed: Testbed) -> None:
    net, sub = str(bed.network), subnet(bed, 1)
    nat = iptables_save(bed, "n1", "nat")
    postrouting = [line for line in nat if line.startswith("-A POSTROUTING")]
    assert postrouting[0] == f"-A POSTROUTING {MASQ} -j FLANNEL-POSTRTG"  # inserted first
    assert [line for line in nat if line.startswith("-A FLANNEL-POSTRTG")] == [
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {sub} -d {net} {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {net} -d {sub} {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s {net} -d {sub} {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s {net} -d {net} {MASQ} -j MASQUERADE --random-fully",
    ]
    filt = iptables_save(bed, "n1", "filter")
    assert f"-A FORWARD {FWD} -j FLANNEL-FWD" in filt
    assert [line for line in filt if line.startswith("-A FLANNEL-FWD")] == [
        f"-A FLANNEL-FWD -s {net} {FWD} -j ACCEPT",
        f"-A FLANNEL-FWD -d {net} {FWD} -j ACCEPT",
    ]
    assert parse_subnet_env(bed.subnet_file(1).read_text()).ip_masq is True
    assert "FLANNEL_IPMASQ=true" in bed.subnet_file(1).read_text()


def test_pod_leaving_the_overlay_is_masqueraded(bed: Testbed) -> None:
    seen = peer_seen_by(bed, bed.underlay_ns, OUTSIDE, "n1-p1", 7001)
    assert seen == str(bed.node_ip(1)), f"the outside saw {seen}, not n1's address"


def test_pod_to_pod_is_not_masqueraded(bed: Testbed) -> None:
    server = bed.resolve("n2-p1")
    seen = peer_seen_by(bed, server, bed.pod_ip("n2-p1"), "n1-p1", 7002)
    assert seen == bed.pod_ip("n1-p1")


def test_forward_drop_policy_still_forwards_and_a_deleted_rule_is_repaired(bed: Testbed) -> None:
    target = bed.pod_ip("n2-p1")
    jump = ["FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"]
    for node in ("n1", "n2"):
        iptables(bed, node, "-P", "FORWARD", "DROP")
    try:
        assert ping(bed, "n1-p1", target), "FLANNEL-FWD should accept the overlay"
        # Without our jump the DROP policy wins: the test can fail.
        just_checked(bed, 1)
        before = repairs(bed, 1)
        iptables(bed, "n1", "-D", *jump)
        assert not ping(bed, "n1-p1", target, count=1)
        # Put back within the resync, counted, and forwarding again.
        took = time.monotonic()
        assert poll(lambda: iptables(bed, "n1", "-C", *jump, check=False) == 0, RESYNC + 3)
        print(f"FORWARD jump repaired {time.monotonic() - took:.1f} s after deletion")
        assert poll(lambda: repairs(bed, 1) == before + 1)
        assert ping(bed, "n1-p1", target)
    finally:
        for node in ("n1", "n2"):
            iptables(bed, node, "-P", "FORWARD", "ACCEPT")


def test_deleted_masquerade_rule_is_repaired_in_order(bed: Testbed) -> None:
    net = str(bed.network)
    rule = [
        "FLANNEL-POSTRTG", "-s", net, "!", "-d", "224.0.0.0/4",
        "-m", "comment", "--comment", "flanneld masq", "-j", "MASQUERADE", "--random-fully",
    ]  # fmt: skip
    before = repairs(bed, 2)
    iptables(bed, "n2", "-t", "nat", "-D", *rule)
    assert iptables(bed, "n2", "-t", "nat", "-C", *rule, check=False) != 0
    assert poll(lambda: iptables(bed, "n2", "-t", "nat", "-C", *rule, check=False) == 0, RESYNC + 3)
    assert poll(lambda: repairs(bed, 2) == before + 1)
    chain = [x for x in iptables_save(bed, "n2", "nat") if x.startswith("-A FLANNEL-POSTRTG")]
    assert chain[-2].endswith("-j MASQUERADE --random-fully"), chain  # back in its place
    assert "224.0.0.0/4" in chain[-2], chain
    logged = [
        e
        for e in _events(bed, 2)
        if e.get("event") == "iptables_rule_repaired" and "MASQUERADE" in e.get("rule", "")
    ]
    assert len(logged) == 1, logged
    assert peer_seen_by(bed, bed.underlay_ns, OUTSIDE, "n2-p1", 7003) == str(bed.node_ip(2))


def _events(bed: Testbed, i: int) -> list[dict[str, Any]]:
    events = []
    for line in bed.log_file(i).read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def test_rules_are_removed_on_stop(bed: Testbed) -> None:
    pid = bed._daemon_pid(1)
    assert pid is not None
    proc = bed._procs[1]
    proc.terminate()
    assert proc.wait(timeout=5) == 0
    nat, filt = iptables_save(bed, "n1", "nat"), iptables_save(bed, "n1", "filter")
    assert not [line for line in nat + filt if "FLANNEL" in line or "flanneld" in line], nat + filt
    # n2's are untouched; n1 comes back with its rules (and the same subnet).
    assert any("FLANNEL-POSTRTG" in line for line in iptables_save(bed, "n2", "nat"))
    before = subnet(bed, 1)
    bed.start_daemon(1)
    assert poll(lambda: any("FLANNEL-POSTRTG" in x for x in iptables_save(bed, "n1", "nat")), 15)
    assert subnet(bed, 1) == before


def test_an_iptables_command_that_goes_away_is_said_once_and_the_node_carries_on(
    netns, daemons, tmp_path
) -> None:
    """The iptables command removed under a running daemon (its package removed): each
    resync fails, which is said once; the daemon keeps running (it used to exit 1: the
    OSError of the missing command ended the resync task) and repairs again once the
    command is back."""
    ns = netns("ipt")
    commands = tmp_path / "bin"
    commands.mkdir()
    names = ("iptables", "iptables-restore")

    def link_commands() -> None:
        for name in names:
            found = shutil.which(name)
            assert found is not None
            (commands / name).symlink_to(found)

    link_commands()
    daemon = daemons(
        ns,
        tmp_path,
        *["--registry-file", str(tmp_path / "registry.json"), "--network", "198.18.0.0/16"],
        *["--iptables-resync", "1"],
        env={"PATH": f"{commands}:{os.environ['PATH']}"},
    )
    daemon.wait_event("iptables_rules_installed", 20)
    for name in names:
        (commands / name).unlink()
    failed = daemon.wait_event("iptables_check_failed", 10)
    assert "No such file or directory" in failed["error"], failed
    time.sleep(3)  # three more resyncs, which say nothing more
    assert daemon.proc.poll() is None, daemon.log.read_text()[-1000:]
    assert [e["event"] for e in daemon.events()].count("iptables_check_failed") == 1

    link_commands()
    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-D", "FORWARD", *FWD_RULE], check=True)
    daemon.wait_event("iptables_rule_repaired", 10)
    assert daemon.stop()[0] == 0
