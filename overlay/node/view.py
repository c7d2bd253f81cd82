"""What the node shows: the snapshot `overlay status` prints and /metrics exports, also
while it starts, and the pages of its health server (/healthz, /readyz, /metrics)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from overlay.dataplane.counters import add_snapshots
from overlay.node.state import NodeState
from overlay.observe import health, metrics
from overlay.observe import log as overlay_log
from overlay.observe.version import version
from tun import netlink

# Up to this many peers /metrics is rendered on the loop, one pause between two drains
# (README, "Health and metrics", has the cost per peer count); above, in a thread,
# whose GIL share the drain loops take back every sys.getswitchinterval() (5 ms).
RENDER_INLINE_PEERS = 200


class NodeView:
    def __init__(self, node: NodeState) -> None:
        self.node = node

    def snapshot(self) -> dict[str, Any]:
        """Everything `overlay status` shows (and /metrics exports), also while starting."""
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
        if "datapath" not in node.readiness.done:
            return {**base, "state": "starting"}
        assert node.config is not None and node.backend is not None
        return {
            **base,
            "lease": self._lease(),
            "network": str(node.config.network),
            "backend": node.config.backend.type,
            "datapath": node.backend.name,
            "iface": node.underlay.iface,
            "mtu": node.backend.mtu,
            **self.counters_and_status(),
        }

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

    def counters_and_status(self) -> dict[str, Any]:
        """The backend's status, the peers with their traffic, and the counters: with
        --workers, the sums over every worker (each one's own are in ``workers``).
        ``repairs`` counts every kernel object and iptables rule put back, by kind."""
        node = self.node
        assert node.backend is not None and node.peers is not None
        # The native drains keep their counts between wake-ups: added here, before the
        # counters and the peers' PeerStats (peer_rows) are read.
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
        rules, rules6 = node.iptables.rules, node.iptables.rules6
        if rules is not None:
            repairs["iptables"] = rules.repairs
            backend["iptables"] = rules.status()
        if rules6 is not None:
            repairs["iptables"] = repairs.get("iptables", 0) + rules6.repairs
            backend["ip6tables"] = rules6.status()
        return {
            "peers": self.peer_rows(reported),
            "counters": counters,
            **backend,
            "repairs": repairs,
        }

    def peer_rows(self, reported: list[dict[str, list[float]]]) -> list[dict[str, Any]]:
        """Every peer; for a datapath in this process with its traffic: this process's
        PeerStats plus what each worker reported for the same subnet."""
        node = self.node
        assert node.peers is not None and node.backend is not None
        now, wall = time.monotonic(), time.time()
        counted = node.backend.in_process
        rows = []
        for peer in sorted(node.peers.peers(), key=lambda p: p.net):
            subnet = str(peer.lease.subnet)
            row: dict[str, Any] = {"subnet": subnet, "public_ip": peer.addr[0]}
            row["port"] = peer.addr[1]
            if counted:
                s = peer.stats
                sums = [s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes]
                last = [s.last_tx, s.last_rx]
                for theirs in (report[subnet] for report in reported if subnet in report):
                    sums = [a + int(b) for a, b in zip(sums, theirs[:4], strict=True)]
                    last = [max(a, b) for a, b in zip(last, theirs[4:6], strict=True)]
                keys = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")
                row.update(zip(keys, sums, strict=True))
                for key, at in zip(("tx", "rx"), last, strict=True):
                    row[f"last_{key}_s"] = round(now - at, 1) if at else None
                    row[f"last_{key}_at"] = round(wall - (now - at), 3) if at else None
            rows.append(row)
        return rows

    async def status_snapshot(self) -> dict[str, Any]:
        """``snapshot()`` plus what must be read from the kernel (off the loop)."""
        st = self.snapshot()
        backend = self.node.backend
        link = backend.kernel_link() if backend is not None else None
        if link is not None and st["state"] != "starting":
            stats = await asyncio.to_thread(netlink.link_stats, link.name)
            if stats is not None:
                st["kernel_counters"] = {"device": link.name, **stats}
                st["kernel_is_overlay"] = link.overlay_only
        return st

    def drops(self) -> dict[str, int]:
        """Drops by reason, summed over every forwarding process."""
        if self.node.backend is None or self.node.peers is None:
            return {}
        drops = self.counters_and_status()["counters"].get("drops") or {}
        return dict(drops)

    # -- the health server's pages ------------------------------------------------------

    async def metrics_page(self) -> health.Page:
        started = time.perf_counter()
        st = await self.status_snapshot()
        if len(st.get("peers", [])) <= RENDER_INLINE_PEERS:
            body = metrics.render(st)
        else:  # a big table: the GIL is handed back to the drain loops every 5 ms
            body = await asyncio.to_thread(metrics.render, st)
        if overlay_log.enabled(2):
            ms = round((time.perf_counter() - started) * 1000, 2)
            self.node.log.debug("scraped", ms=ms)
        return 200, metrics.CONTENT_TYPE, body

    async def readyz_page(self) -> health.Page:
        ready, reason = self.node.readiness.check()
        return (200 if ready else 503), health.TEXT, f"{reason}\n".encode()

    async def healthz_page(self) -> health.Page:
        return 200, health.TEXT, b"overlay is running\n"

    def routes(self) -> dict[str, health.Route]:
        return {
            "/healthz": self.healthz_page,
            "/readyz": self.readyz_page,
            "/metrics": self.metrics_page,
        }
