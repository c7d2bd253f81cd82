"""Registry events as peer changes: a listing replaces the peer table, each watch event
updates it, and the backend hears what was added and removed.

The log gets a line per change at ``-v 2``; below, a burst (thousands of leases created
or expiring at once) is summed up (``PeerLog``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

from control.lease import Lease
from control.subnet_manager import LeaseEvent
from overlay.node.state import NodeState
from overlay.observe import log as overlay_log

# Below -v 2: the first PEER_LINES changes of a PEER_WINDOW get a line each; the others
# are counted and said in one `peers_changed` line when the window ends.
PEER_LINES = 5
PEER_WINDOW = 5.0


class PeerLog:
    """``peer_added`` / ``peer_removed`` lines, a burst summed up.

    At ``-v 2`` every change is a line. Below, the first change after a quiet spell
    opens a window of PEER_WINDOW seconds in which PEER_LINES changes get a line each;
    the rest are counted, and when the window ends one ``peers_changed`` line says how
    many were added and removed and how many peers there are now. A burst that goes on
    gets one such line per window (no per-change lines) until a window passes without
    a change."""

    def __init__(self, log: Any, peer_count: Callable[[], int]) -> None:
        self.log = log
        self.peer_count = peer_count
        self._window: asyncio.TimerHandle | None = None
        self._lines_left = 0
        self._added = 0
        self._removed = 0

    def added(self, lease: Lease) -> None:
        if self._line():
            self.log.info("peer_added", subnet=str(lease.subnet), public_ip=str(lease.public_ip))
        else:
            self._added += 1

    def removed(self, lease: Lease) -> None:
        if self._line():
            self.log.info("peer_removed", subnet=str(lease.subnet))
        else:
            self._removed += 1

    def _line(self) -> bool:
        """Whether this change gets a line of its own (else it is counted)."""
        if overlay_log.enabled(2):
            return True
        if self._window is None:
            self._open(PEER_LINES)
        if self._lines_left:
            self._lines_left -= 1
            return True
        return False

    def _open(self, lines: int) -> None:
        self._lines_left = lines
        self._window = asyncio.get_running_loop().call_later(PEER_WINDOW, self._window_ended)

    def _window_ended(self) -> None:
        self._window = None
        if self._added or self._removed:
            self._summary()
            self._open(0)  # the burst may go on: its next changes are counted at once

    def _summary(self) -> None:
        self.log.info(
            "peers_changed",
            added=self._added,
            removed=self._removed,
            peers=self.peer_count(),
            window_s=PEER_WINDOW,
        )
        self._added = self._removed = 0

    def close(self) -> None:
        """Say what the window still counts (the daemon stops)."""
        if self._window is not None:
            self._window.cancel()
            self._window = None
        if self._added or self._removed:
            self._summary()


class PeerEvents:
    def __init__(self, node: NodeState) -> None:
        self.node = node
        self.log = node.log
        self.peer_log = PeerLog(node.log, lambda: len(node.peers or ()))
        self._warned_backend: set[IPv4Network] = set()

    def _usable(self, lease: Lease) -> bool:
        backend = self.node.backend
        assert backend is not None
        if backend.accepts(lease):
            return True
        if lease.subnet not in self._warned_backend:
            self._warned_backend.add(lease.subnet)
            self.log.warning(
                "peer_skipped",
                subnet=str(lease.subnet),
                backend=lease.backend_type or "udp",
                reason=f"lease backend differs from ours ({backend.name})",
            )
        return False

    def _changed(self, added: list[Lease], removed: list[Lease]) -> None:
        assert self.node.backend is not None
        for lease in added:
            self.peer_log.added(lease)
        for lease in removed:
            self.peer_log.removed(lease)
        if added or removed:
            self.node.backend.peers_changed(added, removed)

    def on_snapshot(self, leases: list[Lease]) -> None:
        peers = self.node.peers
        assert peers is not None
        registry = self.node.readiness.registry
        registry.answered()
        registry.resyncs += 1
        if overlay_log.enabled(2):
            self.log.debug("leases_listed", leases=len(leases))
        self._changed(*peers.replace_all([x for x in leases if self._usable(x)]))

    def on_event(self, event: LeaseEvent) -> None:
        peers = self.node.peers
        assert peers is not None
        registry = self.node.readiness.registry
        registry.answered()
        registry.watch_events += 1
        if overlay_log.enabled(2):
            self.log.debug("lease_event", kind=event.kind, subnet=str(event.subnet))
        if event.lease is not None:
            old = peers.get(event.subnet)
            if not self._usable(event.lease):
                if old is not None:  # a peer that switched to another backend
                    peers.remove(event.subnet)
                    self._changed([], [old.lease])
            elif peers.upsert(event.lease):
                self._changed([event.lease], [])
        elif (peer := peers.remove(event.subnet)) is not None:
            self._changed([], [peer.lease])
