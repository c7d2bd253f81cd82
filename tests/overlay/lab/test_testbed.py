"""The namespace testbed: up/status/down, teardown after a crash, two runs side by side,
rollback of a failed up, and the input it refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from overlay.cli import testbed as testbed_cli
from overlay.lab import testbed
from overlay.lab.errors import TestbedError
from overlay.lab.netns import list_netns, pid_alive, pid_cmdline
from overlay.lab.progress import Progress
from overlay.lab.testbed import Testbed
from tests.helpers.paths import ROOT

NETWORK = "198.18.0.0/16"
UNDERLAY = "192.0.2.0/24"


def new_prefix() -> str:
    return "t" + uuid.uuid4().hex[:6]


def leftovers(prefix: str, state_dir: Path) -> list[str]:
    """Every trace of a run: namespaces, root links, its state directory."""
    found = [n for n in list_netns() if n.startswith(f"{prefix}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{prefix}-"):
            found.append(name)
    if state_dir.exists():
        found.append(str(state_dir))
    return found


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, in its own process (as an operator runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "overlay", "testbed", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


def pings(bed: Testbed, source: str, address: str) -> bool:
    proc = bed.exec(
        source,
        [sys.executable, "-m", "overlay.lab.netns", "ping", address, "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    return proc.returncode == 0


@pytest.fixture
def beds() -> Iterator[list[Testbed]]:
    """Testbeds a test makes; torn down whatever happens."""
    made: list[Testbed] = []
    yield made
    for bed in made:
        try:
            bed.down()
        except TestbedError:
            pass


# -- input that is refused before anything is made ---------------------------------------


@pytest.mark.parametrize("prefix", ["", "ABC", "a-b", "abcdefghi", "ovl_1", "../x"])
def test_bad_prefix_rejected(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TestbedError, match="prefix .* is invalid: use 1-8 characters"):
        Testbed(prefix)
    assert testbed_cli.main(["up", "--prefix", prefix]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid" in err


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"registry": "consul"}, "unknown"),
        ({"backend": "ipip"}, "not supported"),
        ({"nodes": 0}, "positive"),
        ({"underlay": "10.0.0.0/30", "nodes": 2}, "room for 1 nodes"),
        ({"underlay": "198.18.1.0/24"}, "overlaps the overlay network"),
        ({"underlay": "nonsense"}, "not an IPv4 CIDR"),
        ({"network": "198.18.0.0/29", "underlay": "192.0.2.0/24"}, "smaller than /28"),
        ({"network": "198.18.0.0/24", "nodes": 5}, "only 3 subnet leases"),
    ],
)
def test_bad_parameters_rejected(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(TestbedError, match=words):
        Testbed("tbad", **kwargs)  # type: ignore[arg-type]


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert testbed_cli.main([]) == 2
    assert testbed_cli.main(["up", "--nodes", "many"]) == 2
    assert testbed_cli.main(["exec", "--prefix", "tnone", "n1"]) == 2
    capsys.readouterr()


def test_cli_on_missing_testbed(capsys: pytest.CaptureFixture[str]) -> None:
    prefix = new_prefix()
    assert testbed_cli.main(["status", "--prefix", prefix]) == 1
    assert f"testbed {prefix} is not up" in capsys.readouterr().err
    assert testbed_cli.main(["exec", "--prefix", prefix, "n1", "--", "true"]) == 1
    assert "does not exist" in capsys.readouterr().err


# -- real testbeds ---------------------------------------------------------------------------


@pytest.mark.netns
def test_up_status_exec_down(beds: list[Testbed], capsys: pytest.CaptureFixture[str]) -> None:
    underlay = UNDERLAY
    prefix = new_prefix()
    bed = Testbed(prefix, nodes=2, pods_per_node=2, underlay=underlay, network=NETWORK)
    beds.append(bed)
    bed.up()

    st = bed.status()
    assert [n["name"] for n in st["nodes"]] == ["n1", "n2"]
    under = IPv4Network(underlay)
    leases = []
    for i, node in enumerate(st["nodes"], start=1):
        assert node["netns"] == f"{prefix}-n{i}" and node["netns"] in list_netns()
        assert node["underlay_ip"] == str(under.network_address + i)
        assert node["backend"] == "udp"
        assert node["pid"] and pid_alive(node["pid"])
        lease = IPv4Network(node["subnet"])
        assert lease.subnet_of(IPv4Network(NETWORK)) and lease.prefixlen == 24
        leases.append(lease)
    assert leases[0] != leases[1]
    assert [p["name"] for p in st["pods"]] == ["n1-p1", "n1-p2", "n2-p1", "n2-p2"]
    for pod in st["pods"]:
        lease = leases[int(pod["node"][1:]) - 1]
        assert IPv4Address(pod["ip"]) in lease
        assert pod["netns"] == f"{prefix}-{pod['name']}"
        assert bed.pod_ip(pod["name"]) == pod["ip"]

    # Underlay: the bridge lives in the run's own underlay namespace, where etcd listens on
    # the last host address; the root namespace has no link of the run; nodes have no
    # default route and forward.
    bridge = subprocess.run(
        ["ip", "-n", f"{prefix}-ul", "-o", "-4", "addr", "show", "dev", "br0"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"inet {under.broadcast_address - 1}/{under.prefixlen}" in bridge.stdout
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert prefix not in root_links
    routes = bed.exec("n1", ["ip", "-j", "route"], capture_output=True, text=True, check=True)
    assert not [r for r in json.loads(routes.stdout) if r["dst"] == "default"]
    forward = bed.exec("n1", ["cat", "/proc/sys/net/ipv4/ip_forward"], capture_output=True)
    assert forward.stdout.strip() == b"1"

    # Pods on different nodes reach each other over the overlay, both ways.
    assert pings(bed, "n1-p1", bed.pod_ip("n2-p2"))
    assert pings(bed, "n2-p2", bed.pod_ip("n1-p1"))

    # The CLI views of the same run.
    assert testbed_cli.main(["status", "--prefix", prefix, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pods"] == st["pods"]
    assert testbed_cli.main(["status", "--prefix", prefix]) == 0
    table = capsys.readouterr().out
    assert "n2-p1" in table and st["nodes"][0]["subnet"] in table
    assert testbed_cli.main(["exec", "--prefix", prefix, "n1-p1", "--", "sh", "-c", "exit 7"]) == 7
    with pytest.raises(TestbedError, match="does not exist"):
        bed.exec("n3", ["true"])

    # A second up of the same prefix is refused and leaves the first intact.
    with pytest.raises(TestbedError, match="already exists"):
        Testbed(prefix, nodes=2, underlay=underlay, network=NETWORK).up()
    assert bed.status()["nodes"][0]["pid"]

    removed = bed.down()
    assert len(removed["netns"]) == 7  # 4 pods, 2 nodes, the underlay switch
    assert not leftovers(prefix, bed.state_dir)
    assert bed.down() == {"pods": [], "processes": [], "netns": []}
    assert testbed_cli.main(["down", "--prefix", prefix]) == 0


@pytest.mark.netns
def test_up_reports_each_of_its_steps(beds: list[Testbed]) -> None:
    class Recording(Progress):
        def __init__(self) -> None:
            super().__init__("test")
            self.steps: list[str] = []

        def step(self, text: str, advance: bool = True) -> None:
            if advance:
                self.steps.append(text)

    bed = Testbed(
        new_prefix(), nodes=2, pods_per_node=1, registry="file", underlay=UNDERLAY, network=NETWORK
    )
    beds.append(bed)
    bed.progress = recording = Recording()
    bed.up()
    assert len(recording.steps) == bed.up_steps(), recording.steps
    # The pods' CNI ADDs run side by side: the last one done is either pod.
    assert recording.steps[0] == "underlay bridge"
    assert recording.steps[-1] in ("pod n1-p1: CNI ADD", "pod n2-p1: CNI ADD")
    # And how long each stage took (bench.bed_scale reports them), for up, then down.
    assert list(bed.timings) == [
        "namespaces",
        "bridges and router",
        "node links",
        "node addresses",
        "registry",
        "daemons started",
        "daemons up",
        "pods after the last daemon",
    ]
    assert all(seconds >= 0 for seconds in bed.timings.values())
    bed.down()
    assert list(bed.timings) == [
        "daemons stopped",
        "other processes stopped",
        "namespaces deleted",
        "state removed",
    ]


@pytest.mark.netns
def test_building_costs_a_process_per_stage_not_one_per_node(
    beds: list[Testbed], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Namespaces, bridges, links and addresses of 2 nodes or of 8: the same processes
    (a 200-node bed spent a minute forking one or more per node)."""
    started: list[list[str]] = []
    real_run = subprocess.run

    def counted(argv: list[str], *args: object, **kwargs: object) -> object:
        started.append(list(argv))
        return real_run(argv, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", counted)
    counts = []
    for nodes in (2, 8):
        bed = Testbed(new_prefix(), nodes=nodes, pods_per_node=1, registry="file")
        beds.append(bed)
        started.clear()
        bed._write_state()
        bed._build_underlay()
        counts.append(len(started))
        link = real_run(
            ["ip", "-n", bed.node_ns(nodes), "-o", "addr", "show", "eth0"],
            capture_output=True,
            text=True,
        )
        assert f"inet {bed.node_ip(nodes)}/24" in link.stdout
        forwarding = real_run(
            ["ip", "netns", "exec", bed.node_ns(nodes), "sysctl", "-n", "net.ipv4.ip_forward"],
            capture_output=True,
            text=True,
        )
        assert forwarding.stdout.strip() == "1"
        bed.down()
        assert not leftovers(bed.prefix, bed.state_dir)
    assert counts[0] == counts[1], started


@pytest.mark.netns
def test_a_pod_that_fails_midway_rolls_back_everything(beds: list[Testbed]) -> None:
    """One node's CNI ADD fails while the other nodes' pods are being added: up fails in
    one line naming that pod, and nothing of the bed is left (namespaces made in one
    batch, daemons, plugin runs, state)."""
    bed = Testbed(new_prefix(), nodes=4, pods_per_node=1, registry="file")
    beds.append(bed)
    real_config = bed.cni_config

    def config(i: int) -> dict[str, object]:
        conf = real_config(i)
        if i == 3:
            conf["subnetFile"] = str(bed.state_dir / "no-such-subnet.env")
        return conf

    bed.cni_config = config  # type: ignore[method-assign]
    with pytest.raises(TestbedError, match=r"CNI ADD of pod n3-p1 failed: .*no-such-subnet"):
        bed.up()
    assert leftovers(bed.prefix, bed.state_dir) == []
    running = [
        pid
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if str(bed.state_dir) in " ".join(pid_cmdline(pid))
    ]
    assert running == []


@pytest.mark.netns
def test_down_after_crash_removes_everything(beds: list[Testbed]) -> None:
    """Built by one process, daemon killed with -9, the builder gone: down still cleans up."""
    underlay = UNDERLAY
    prefix = new_prefix()
    beds.append(Testbed(prefix, underlay=underlay, network=NETWORK))
    up = cli(
        "up",
        "--prefix",
        prefix,
        "--nodes",
        "2",
        "--pods-per-node",
        "1",
        "--underlay",
        underlay,
        "--network",
        NETWORK,
    )
    assert up.returncode == 0, up.stderr
    assert up.stderr == ""  # no progress in a pipe
    st = json.loads(cli("status", "--prefix", prefix, "--json").stdout)
    state_dir = Path(st["state_dir"])
    victim, survivor = st["nodes"][0]["pid"], st["nodes"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    # Something a test left running inside a pod, outside any pid file.
    stray = subprocess.Popen(
        ["ip", "netns", "exec", f"{prefix}-n2-p1", "sleep", "600"], start_new_session=True
    )
    time.sleep(0.2)
    assert leftovers(prefix, state_dir)

    down = cli("down", "--prefix", prefix)
    assert down.returncode == 0, down.stderr
    assert down.stderr == ""
    assert not leftovers(prefix, state_dir)
    assert stray.wait(timeout=5) != 0
    assert not pid_alive(survivor)
    again = cli("down", "--prefix", prefix)
    assert again.returncode == 0 and "nothing left" in again.stdout


@pytest.mark.netns
def test_kill_9_of_up_midway_leaves_nothing_behind(beds: list[Testbed]) -> None:
    """`up` killed with -9 while it builds: its guard tears down what was made, with no
    `down` from anyone."""
    prefix = new_prefix()
    beds.append(Testbed(prefix, registry="file"))  # a down in any case, if this fails
    state_dir = testbed.STATE_ROOT / prefix
    up = subprocess.Popen(
        [sys.executable, "-m", "overlay", "testbed", "up", "--prefix", prefix]
        + ["--nodes", "6", "--pods-per-node", "1", "--registry", "file"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (state_dir / "n3.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert up.poll() is None, "up finished before it could be killed midway"
        assert leftovers(prefix, state_dir)
    finally:
        up.kill()
        up.wait()
    deadline = time.monotonic() + 30
    while leftovers(prefix, state_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(prefix, state_dir) == []
    assert not [n for n in list_netns() if n.startswith(f"{prefix}-")]


@pytest.mark.netns
def test_two_testbeds_coexist(beds: list[Testbed]) -> None:
    """Down of one run must not touch another, even one whose prefix extends its own."""
    # The same underlay range twice: each run's bridge is its own L2 segment, and the root
    # namespace holds no underlay address, so the runs cannot see each other.
    first = Testbed(new_prefix(), nodes=2, pods_per_node=1)
    second = Testbed(first.prefix + "x", nodes=2, pods_per_node=1)
    beds.extend([first, second])
    first.up()
    second.up()

    first.down()
    assert not leftovers(first.prefix, first.state_dir)
    st = second.status()
    assert all(node["pid"] for node in st["nodes"])
    assert {f"{second.prefix}-n1", f"{second.prefix}-n2-p1"} <= set(list_netns())
    assert (second.state_dir / "testbed.json").exists()
    assert pings(second, "n1-p1", second.pod_ip("n2-p1"))
    second.down()
    assert not leftovers(second.prefix, second.state_dir)


@pytest.mark.netns
def test_failed_up_rolls_back_with_the_log(
    beds: list[Testbed], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    underlay = UNDERLAY
    state_dir = tmp_path / "state"
    bed = Testbed(new_prefix(), nodes=2, underlay=underlay, network=NETWORK, state_dir=state_dir)
    beds.append(bed)

    def failing(i: int) -> list[str]:
        return ["ip", "netns", "exec", bed.node_ns(i), "sh", "-c", "echo boom-$0; exit 3", "x"]

    monkeypatch.setattr(bed, "daemon_argv", failing)
    with pytest.raises(TestbedError, match=r"daemon of n1 exited with code 3 .*boom-x"):
        bed.up()
    assert not leftovers(bed.prefix, state_dir)
    assert not testbed._pointer(bed.prefix).exists()


@pytest.mark.netns
def test_daemon_start_timeout(beds: list[Testbed], monkeypatch: pytest.MonkeyPatch) -> None:
    underlay = UNDERLAY
    bed = Testbed(new_prefix(), nodes=1, underlay=underlay, network=NETWORK)
    beds.append(bed)
    monkeypatch.setattr(testbed, "DAEMON_START_TIMEOUT", 1.0)
    monkeypatch.setattr(
        bed,
        "daemon_argv",
        lambda i: ["ip", "netns", "exec", bed.node_ns(i), "sh", "-c", "echo hung; sleep 600"],
    )
    with pytest.raises(TestbedError, match=r"wrote no .*subnet.env within 1 s: hung"):
        bed.up()
    assert not leftovers(bed.prefix, bed.state_dir)


@pytest.mark.netns
def test_context_manager_downs_on_exception(beds: list[Testbed]) -> None:
    underlay = UNDERLAY
    bed = Testbed(new_prefix(), nodes=1, pods_per_node=1, underlay=underlay, network=NETWORK)
    beds.append(bed)
    with pytest.raises(RuntimeError, match="test body failed"), bed:
        bed.up()
        assert bed.status()["pods"][0]["ip"]
        raise RuntimeError("test body failed")
    assert not leftovers(bed.prefix, bed.state_dir)
