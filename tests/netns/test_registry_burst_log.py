"""Issue 18 item 4: a burst of registry events is a few log lines at the default level
(20,000 events once wrote 19,605 info lines), and still a line per event at -v 2.

A daemon on a real etcd (its own namespace, lo only) sees 2,000 lease events: 1,000
leases of other nodes created, then deleted, in etcd transactions of 100."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay.observe import status_socket as status
from tests.helpers.etcd_server import EtcdServer, etcd_in_netns
from tests.helpers.polling import poll

pytestmark = pytest.mark.netns
PEERS = 1000
BATCH = 100  # etcd takes up to 128 operations per transaction
PEER_LINES = {"peer_added", "peer_removed", "peers_changed"}
SUMMARY_WAIT = 20.0  # a summary line comes at the end of its window (a few seconds)


@pytest.fixture(scope="module")
def lo_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, EtcdServer]]:
    with etcd_in_netns(tmp_path_factory.mktemp("burst") / "etcd", "burst") as found:
        yield found


def peer_keys(prefix: str) -> list[str]:
    """/28s from 198.18.128.0 on: far from the daemon's own lease (among the first)."""
    return [f"{prefix}/subnets/198.18.{128 + i // 16}.{i % 16 * 16}-28" for i in range(PEERS)]


def in_transactions(server: EtcdServer, operations: list[str]) -> None:
    for start in range(0, len(operations), BATCH):
        batch = "\n".join(operations[start : start + BATCH])
        server.ctl("txn", input=f"\n{batch}\n\n\n")  # no compares, the puts, no else


def peer_count(socket: Path) -> int:
    return len(status.query(socket, timeout=10).get("peers", []))


@pytest.mark.parametrize("level", ["0", "2"])
def test_a_burst_of_2000_lease_events_is_summed_up_below_v_2(
    lo_etcd: tuple[str, EtcdServer], tmp_path: Path, daemons, level: str
) -> None:
    ns, server = lo_etcd
    prefix = f"/burst{uuid.uuid4().hex[:8]}/network"
    config = {"Network": "198.18.0.0/16", "SubnetLen": 28, "Backend": {"Type": "udp"}}
    server.put(f"{prefix}/config", json.dumps(config))
    daemon = daemons(
        ns,
        tmp_path,
        *["--etcd-endpoints", server.endpoint, "--etcd-prefix", prefix],
        "-v",
        level,
    )
    daemon.wait_event("started", 20)
    started = len(daemon.events())
    size = daemon.log.stat().st_size

    keys = peer_keys(prefix)
    value = json.dumps({"PublicIP": "192.0.2.9", "BackendType": "udp"}, separators=(",", ":"))
    in_transactions(server, [f"put {key} {value}" for key in keys])
    assert poll(lambda: peer_count(daemon.socket) == PEERS, 60, 0.5), daemon.log.read_text()[-800:]
    in_transactions(server, [f"del {key}" for key in keys])
    assert poll(lambda: peer_count(daemon.socket) == 0, 60, 0.5), daemon.log.read_text()[-800:]
    # Every change is in the log, one way or the other (a summary within its window).
    assert poll(lambda: logged(daemon.events()[started:]) == (PEERS, PEERS), SUMMARY_WAIT)
    assert daemon.stop()[0] == 0

    burst = daemon.events()[started:]
    lines = Counter(e["event"] for e in burst)
    print(
        f"-v {level}: {len(burst)} lines, {daemon.log.stat().st_size - size} bytes for "
        f"{2 * PEERS} lease events: {dict(lines)}"
    )
    if level == "2":
        assert lines["peer_added"] == lines["peer_removed"] == PEERS
        assert lines["lease_event"] == 2 * PEERS
    else:
        assert sum(lines[name] for name in PEER_LINES) <= 20, dict(lines)
        assert len(burst) <= 25, dict(lines)


def logged(events: list[dict[str, Any]]) -> tuple[int, int]:
    """(peers added, peers removed) as the log tells them: lines and summaries."""
    lines = Counter(e["event"] for e in events)
    summaries = [e for e in events if e["event"] == "peers_changed"]
    return (
        lines["peer_added"] + sum(e["added"] for e in summaries),
        lines["peer_removed"] + sum(e["removed"] for e in summaries),
    )
