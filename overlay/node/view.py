"""What the node shows: the snapshot `overlay status` prints and /metrics exports, also
while it starts, and the pages of its health server (/healthz, /readyz, /metrics)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from control.peer_table import Peer
from overlay.dataplane.counters import add_snapshots
from overlay.node.peer_rows import BusiestWalk, PeerRows, Reported, rows
from overlay.node.state import NodeState
from overlay.observe import health_server, status_socket
from overlay.observe import log as overlay_log
from overlay.observe.slices import STEP, LoopBudget
from overlay.observe.version import version
from tun import netlink

# /metrics is made at most this often, or less often when making it takes longer than 5%
# of this (health_server.Cached): a scrape flood costs the loop one page per period.
METRICS_MIN_AGE = 0.25
HEALTHY: health_server.Page = (200, health_server.TEXT, b"overlay is running\n")


class NodeView:
    def __init__(self, node: NodeState) -> None:
        self.node = node
        # The health server's counts, once it listens (HealthServer.stats).
        self.health_server_stats: Callable[[], dict[str, int]] | None = None
        self.peer_rows = PeerRows()  # the status answer's rows, kept between answers

    async def status_pieces(self) -> AsyncIterator[bytes]:
        """The status answer as JSON with every peer's row, a slice at a time (the loop
        gets its turn between two), the rows taken from ``peer_rows`` where they are
        kept (a peer that never carried traffic costs a look at its counters)."""
        budget = LoopBudget()  # the head's snapshot counts against the first slice
        st, peers, reported = self._head()
        await self._kernel_counters(st)
        if peers is None:
            yield json.dumps(st).encode()
            return
        counted, kept = self._counted(), self.peer_rows

        def encode(start: int, stop: int) -> str:
            return kept.encode(peers, start, stop, reported, counted)

        kept.begin(len(peers))
        pieces = status_socket.encoded_pieces(st, len(peers), encode, budget)
        async for piece in pieces:
            yield piece
        kept.end()

    async def status_snapshot(
        self, peer_limit: int | None = None, budget: LoopBudget | None = None
    ) -> dict[str, Any]:
        """What `overlay status` shows (and /metrics exports), also while starting; with
        ``peer_limit``, the rows of that many peers at most (the busiest). The peers are
        walked a slice at a time (of ``budget``)."""
        budget = budget or LoopBudget()
        st, peers, reported = self._head()
        if peers is not None:
            if peer_limit is not None and len(peers) > peer_limit:
                peers = await self._busiest(peers, reported, peer_limit, budget)
            counted = self._counted()
            st["peers"] = found = []
            for start in range(0, len(peers), STEP):
                found += rows(peers[start : start + STEP], reported, counted)
                if budget.spent():
                    await budget.turn()
        await self._kernel_counters(st)
        return st

    async def _kernel_counters(self, st: dict[str, Any]) -> None:
        """What must be read from the kernel (off the loop): the kernel datapath's link,
        and its IPv6 link (``kernel_counters6``: flannel-v6.<VNI>) when it has one."""
        backend = self.node.backend
        if backend is None or st["state"] == "starting":
            return
        link, link6 = backend.kernel_link(), backend.kernel_link6()
        for key, found in (("kernel_counters", link), ("kernel_counters6", link6)):
            if found is not None:
                stats = await asyncio.to_thread(netlink.link_stats, found.name)
                if stats is not None:
                    st[key] = {"device": found.name, **stats}
        if link is not None and "kernel_counters" in st:
            st["kernel_is_overlay"] = link.overlay_only

    def _head(self) -> tuple[dict[str, Any], list[Peer] | None, Reported]:
        """The snapshot without its peer rows; the peers in subnet order (None while
        starting) and what the workers reported per peer."""
        node = self.node
        ready, reason = node.readiness.check()
        base: dict[str, Any] = {
            "state": "stopping" if node.stopping.is_set() else "running",
            "version": version(),
            "node": node.underlay.name,
            "started_at": round(node.started, 3),
            "uptime_s": round(time.time() - node.started, 1),
            "ready": {"ready": ready, "reason": reason},
            "registry": node.monitor.status(),
            "log_lines_lost": overlay_log.lines_lost(),
        }
        if self.health_server_stats is not None:
            base["health_server"] = self.health_server_stats()
        if "datapath" not in node.readiness.done:
            return {**base, "state": "starting"}, None, []
        assert node.config is not None and node.backend is not None and node.peers is not None
        status, reported = self.counters_and_status()
        st = {
            **base,
            "lease": self._lease(),
            "network": " ".join(map(str, node.config.overlay_networks)),
            "backend": node.config.backend.type,
            "datapath": node.backend.name,
            "iface": node.underlay.iface,
            "mtu": node.backend.mtu,
            "underlay_mtu": node.underlay.mtu,
            "mtu_changes": node.mtu_changes,
            "peer_count": len(node.peers),
            **status,
        }
        return st, node.peer_order.peers, reported

    def _lease(self) -> dict[str, Any]:
        node = self.node
        lease, monitor = node.lease, node.monitor
        assert lease is not None

        def stamp(t: float | None) -> float | None:
            return None if t is None else round(t, 3)

        halves = {}
        if lease.has_ipv4:  # not IPv6 only
            halves = {"subnet": str(lease.subnet), "public_ip": str(lease.public_ip)}
        if lease.ipv6_subnet is not None:  # dual stack or IPv6 only: the IPv6 half
            halves |= {"ipv6_subnet": str(lease.ipv6_subnet), "public_ipv6": str(lease.public_ipv6)}
        return {
            **halves,
            "key": node.manager.key_of(lease),
            "expires": stamp(monitor.lease_expires),
            "next_renewal": stamp(monitor.next_renewal),
            "renew_margin_s": node.manager.renew_margin,
        }

    def counters_and_status(self) -> tuple[dict[str, Any], Reported]:
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

    def _counted(self) -> bool:
        """Whether this process forwards, and so counts each peer's traffic."""
        return self.node.backend is not None and self.node.backend.in_process

    async def _busiest(
        self, peers: list[Peer], reported: Reported, limit: int, budget: LoopBudget
    ) -> list[Peer]:
        """The ``limit`` peers with most bytes both ways, in subnet order; none for a
        datapath that does not count them."""
        if not self._counted():
            return []
        busiest = BusiestWalk(reported, limit)
        for start in range(0, len(peers), STEP):
            busiest.walk(peers[start : start + STEP])
            if budget.spent():
                await budget.turn()
        return busiest.chosen()

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
        from overlay.observe import metrics  # loaded by routes(), as the server starts

        started = time.perf_counter()
        budget = LoopBudget()
        st = await self.status_snapshot(self.node.options.metrics_peer_limit, budget)
        parts = []
        for family in metrics.families(st):  # rendered a few samples at a time
            for piece in metrics.render_pieces(family):
                parts.append(piece)
                if budget.spent():
                    await budget.turn()
        body = b"".join(parts)
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
        """The health server's pages. The metrics module is loaded here, as the server
        starts, not above: prometheus_client brings http.server, email and wsgiref along,
        which a daemon without --healthz-port never needs; nor at the first scrape, where
        the import (~30 ms) held the loop the drains forward on."""
        from overlay.observe import metrics  # noqa: F401

        return {
            "/healthz": health_server.Immediate(self.healthz_page),
            "/readyz": health_server.Immediate(self.readyz_page),
            "/metrics": health_server.Cached(self.metrics_page, METRICS_MIN_AGE),
        }
