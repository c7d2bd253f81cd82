"""What the node shows: the snapshot `overlay status` prints and /metrics exports, also
while it starts, and the pages of its health server (/healthz, /readyz, /metrics)."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Iterator
from typing import Any

from control.peer_table import Peer
from overlay.dataplane.counters import add_snapshots
from overlay.node.state import NodeState
from overlay.observe import health_server
from overlay.observe import log as overlay_log
from overlay.observe.version import version
from tun import netlink

# Peer rows are built this many at a time for the status socket, the loop taking its
# turn between slices: at 10,000 peers the table is a few tens of milliseconds of Python,
# which as one piece would hold up the drains (README, "Scale").
ROW_SLICE = 500
# /metrics is made at most this often, or less often when making it takes longer than 5%
# of this (health_server.Cached): a scrape flood costs the loop one page per period.
METRICS_MIN_AGE = 0.25
HEALTHY: health_server.Page = (200, health_server.TEXT, b"overlay is running\n")


class NodeView:
    def __init__(self, node: NodeState) -> None:
        self.node = node
        # The health server's counts, once it listens (HealthServer.stats).
        self.health_server_stats: Callable[[], dict[str, int]] | None = None

    def snapshot(self, peer_limit: int | None = None) -> dict[str, Any]:
        """Everything `overlay status` shows (and /metrics exports), also while starting;
        with ``peer_limit``, the rows of that many peers at most (the busiest)."""
        st, rows = self._snapshot(peer_limit)
        if rows is not None:
            st["peers"] = [row for part in rows for row in part]
        return st

    async def status_snapshot(self, peer_limit: int | None = None) -> dict[str, Any]:
        """``snapshot()``, its peer rows built a slice at a time (the drains run between
        slices), plus what must be read from the kernel (off the loop)."""
        st, rows = self._snapshot(peer_limit)
        if rows is not None:
            st["peers"] = found = []
            for part in rows:
                found += part
                await asyncio.sleep(0)
        backend = self.node.backend
        link = backend.kernel_link() if backend is not None else None
        if link is not None and st["state"] != "starting":
            stats = await asyncio.to_thread(netlink.link_stats, link.name)
            if stats is not None:
                st["kernel_counters"] = {"device": link.name, **stats}
                st["kernel_is_overlay"] = link.overlay_only
        return st

    def _snapshot(
        self, peer_limit: int | None
    ) -> tuple[dict[str, Any], Iterator[list[dict[str, Any]]] | None]:
        """The snapshot without its peer rows, and the rows to come, in slices."""
        node = self.node
        ready, reason = node.readiness.check()
        base: dict[str, Any] = {
            "state": "stopping" if node.stopping.is_set() else "running",
            "version": version(),
            "node": str(node.underlay.public_ip),
            "started_at": round(node.started, 3),
            "uptime_s": round(time.time() - node.started, 1),
            "ready": {"ready": ready, "reason": reason},
            "registry": node.monitor.status(),
            "log_lines_lost": overlay_log.lines_lost(),
        }
        if self.health_server_stats is not None:
            base["health_server"] = self.health_server_stats()
        if "datapath" not in node.readiness.done:
            return {**base, "state": "starting"}, None
        assert node.config is not None and node.backend is not None and node.peers is not None
        status, reported = self.counters_and_status()
        st = {
            **base,
            "lease": self._lease(),
            "network": str(node.config.network),
            "backend": node.config.backend.type,
            "datapath": node.backend.name,
            "iface": node.underlay.iface,
            "mtu": node.backend.mtu,
            "underlay_mtu": node.underlay.mtu,
            "mtu_changes": node.mtu_changes,
            "peer_count": len(node.peers),
            **status,
        }
        return st, self._peer_slices(reported, peer_limit)

    def _lease(self) -> dict[str, Any]:
        node = self.node
        lease, monitor = node.lease, node.monitor
        assert lease is not None

        def stamp(t: float | None) -> float | None:
            return None if t is None else round(t, 3)

        ipv6 = {}
        if lease.ipv6_subnet is not None:  # dual stack: the IPv6 half
            ipv6 = {"ipv6_subnet": str(lease.ipv6_subnet), "public_ipv6": str(lease.public_ipv6)}
        return {
            "subnet": str(lease.subnet),
            "public_ip": str(lease.public_ip),
            **ipv6,
            "key": node.manager.key_of(lease),
            "expires": stamp(monitor.lease_expires),
            "next_renewal": stamp(monitor.next_renewal),
            "renew_margin_s": node.manager.renew_margin,
        }

    def counters_and_status(self) -> tuple[dict[str, Any], list[dict[str, list[float]]]]:
        """The backend's status and the counters: with --workers, the sums over every
        worker (each one's own are in ``workers``), and what each worker reported per
        peer. ``repairs`` counts every kernel object and ip-masq/FORWARD rule put back, by kind."""
        node = self.node
        assert node.backend is not None
        # The native drains keep their counts between wake-ups: added here, before the
        # counters and the peers' PeerStats (peer rows) are read.
        node.counters.settle()
        backend = node.backend.status()
        workers = backend.get("workers")
        if workers:
            counters = add_snapshots([w["counters"] for w in workers])
        elif node.backend.in_process:
            counters = node.counters.snapshot()
        else:
            counters = {}  # the kernel forwards: its counters are in kernel_counters
        reported = [w.pop("peers", {}) for w in workers or []]
        repairs = dict(backend.pop("repairs", {}))
        for rules in node.iptables.kept():  # iptables/ip6tables or nftables/nftables6
            repairs[rules.repair_kind] = repairs.get(rules.repair_kind, 0) + rules.repairs
            backend[rules.status_key] = rules.status()
        return {"counters": counters, **backend, "repairs": repairs}, reported

    def _peer_slices(
        self, reported: list[dict[str, list[float]]], limit: int | None
    ) -> Iterator[list[dict[str, Any]]]:
        """Every peer's row (or the ``limit`` busiest: most bytes both ways), by subnet,
        ROW_SLICE at a time; for a datapath in this process with its traffic: this
        process's PeerStats plus what each worker reported for the same subnet."""
        node = self.node
        assert node.peers is not None and node.backend is not None
        peers = node.peers.peers()
        counted = node.backend.in_process
        if limit is not None and len(peers) > limit:
            peers = (
                heapq.nlargest(limit, peers, key=lambda p: _traffic(p, reported)) if counted else []
            )
        peers.sort(key=lambda p: p.net)
        now, wall = time.monotonic(), time.time()
        for start in range(0, len(peers), ROW_SLICE):
            yield [_row(p, reported, counted, now, wall) for p in peers[start : start + ROW_SLICE]]

    def drops(self) -> dict[str, int]:
        """Drops by reason, summed over every forwarding process."""
        if self.node.backend is None or self.node.peers is None:
            return {}
        drops = self.counters_and_status()[0]["counters"].get("drops") or {}
        return dict(drops)

    # -- the health server's pages ------------------------------------------------------

    async def metrics_page(self) -> health_server.Page:
        """/metrics: per-peer series for ``--metrics-peer-limit`` peers at most (the
        busiest), so its size and cost stay bounded however large the cluster."""
        # Imported at the first scrape, not above: prometheus_client brings http.server,
        # email and wsgiref along, which a daemon without --healthz-port never needs.
        from overlay.observe import metrics

        started = time.perf_counter()
        st = await self.status_snapshot(self.node.options.metrics_peer_limit)
        body = metrics.render(st)
        if overlay_log.enabled(2):
            ms = round((time.perf_counter() - started) * 1000, 2)
            self.node.log.debug("scraped", ms=ms)
        return 200, metrics.CONTENT_TYPE, body

    def readyz_page(self) -> health_server.Page:
        ready, reason = self.node.readiness.check()
        return (200 if ready else 503), health_server.TEXT, f"{reason}\n".encode()

    def healthz_page(self) -> health_server.Page:
        return HEALTHY

    def routes(self) -> dict[str, health_server.Route]:
        return {
            "/healthz": health_server.Immediate(self.healthz_page),
            "/readyz": health_server.Immediate(self.readyz_page),
            "/metrics": health_server.Cached(self.metrics_page, METRICS_MIN_AGE),
        }


def _traffic(peer: Peer, reported: list[dict[str, list[float]]]) -> float:
    """Bytes sent to and received from a peer, by every forwarding process."""
    s = peer.stats
    total: float = s.tx_bytes + s.rx_bytes
    for report in reported:
        theirs = report.get(peer.name)
        if theirs is not None:
            total += theirs[1] + theirs[3]
    return total


def _row(
    peer: Peer, reported: list[dict[str, list[float]]], counted: bool, now: float, wall: float
) -> dict[str, Any]:
    """One peer as `overlay status` shows it; with its traffic when ``counted``."""
    row: dict[str, Any] = {"subnet": peer.name, "public_ip": peer.addr[0], "port": peer.addr[1]}
    if not counted:
        return row
    s = peer.stats
    sums = [s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes]
    last = [s.last_tx, s.last_rx]
    for theirs in (report[peer.name] for report in reported if peer.name in report):
        sums = [a + int(b) for a, b in zip(sums, theirs[:4], strict=True)]
        last = [max(a, b) for a, b in zip(last, theirs[4:6], strict=True)]
    row["tx_packets"], row["tx_bytes"], row["rx_packets"], row["rx_bytes"] = sums
    for key, at in zip(("tx", "rx"), last, strict=True):
        row[f"last_{key}_s"] = round(now - at, 1) if at else None
        row[f"last_{key}_at"] = round(wall - (now - at), 3) if at else None
    return row
