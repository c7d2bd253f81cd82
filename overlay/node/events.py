"""Registry events as peer changes: a listing replaces the peer table, watch responses
update it in batches, and the backend hears what was added and removed.

A batch copies the tables the dataplane reads (``control.peer_table``: O(peers), a few
milliseconds at 50,000), so a burst of single-change watch responses is coalesced: a
batch is applied at once when the last one is old enough, else when ``SPACING`` times
the last batch's cost has passed since it; what arrives meanwhile waits and is applied
together, net (a lease added and removed again is no change). Batches then take at most
1/(1+SPACING) of the event loop however long the burst, the dataplane sees the table of
some registry revision at every moment, and a lone change after a quiet spell is applied
in the next loop iteration.

The log gets a line per change at ``-v 2``; below, a burst (thousands of leases created
or expiring at once) is summed up (``PeerLog``).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

from control.lease import Lease, LeaseId
from control.subnet_manager import LeaseEvent
from overlay.node.state import NodeState
from overlay.observe import log as overlay_log

SPACING = 4.0

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
            public_ip = lease.public_ip if lease.has_ipv4 else lease.public_ipv6
            self.log.info("peer_added", subnet=lease.name, public_ip=str(public_ip))
        else:
            self._added += 1

    def removed(self, lease: Lease) -> None:
        if self._line():
            self.log.info("peer_removed", subnet=lease.name)
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
        self._warned_backend: set[LeaseId] = set()
        # Changes not applied yet, by lease ident: the lease to hold, or None to remove it.
        self._pending: dict[LeaseId, Lease | None] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._quiet_from = 0.0  # time.monotonic() from which a batch may run again

    def _usable(self, lease: Lease) -> bool:
        backend = self.node.backend
        assert backend is not None
        if backend.accepts(lease):
            return True
        if lease.ident not in self._warned_backend:
            self._warned_backend.add(lease.ident)
            self.log.warning(
                "peer_skipped",
                subnet=lease.name,
                backend=lease.backend_type or "udp",
                reason=f"lease backend differs from ours ({backend.name})",
            )
        return False

    def _changed(self, added: list[Lease], removed: list[Lease]) -> None:
        assert self.node.backend is not None and self.node.peers is not None
        self.node.peer_order.apply(self.node.peers, added, removed)
        for lease in added:
            self.peer_log.added(lease)
        for lease in removed:
            self.peer_log.removed(lease)
        if added or removed:
            self.node.backend.peers_changed(added, removed)

    def on_snapshot(self, leases: list[Lease]) -> None:
        """A full listing: the truth at its revision, so what was pending is dropped."""
        peers = self.node.peers
        assert peers is not None
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._pending.clear()
        registry = self.node.readiness.registry
        registry.answered()
        registry.resyncs += 1
        if overlay_log.enabled(2):
            self.log.debug("leases_listed", leases=len(leases))
        self._timed(
            lambda: self._changed(*peers.replace_all([x for x in leases if self._usable(x)]))
        )
        _freeze_long_lived()

    def on_events(self, events: list[LeaseEvent]) -> None:
        """One watch response: its changes join those pending, applied as one batch as
        soon as the spacing allows."""
        registry = self.node.readiness.registry
        registry.answered()
        registry.watch_events += len(events)
        for event in events:
            if overlay_log.enabled(2):
                self.log.debug("lease_event", kind=event.kind, subnet=str(event.subnet))
            # removed, or a peer that switched to another backend: None
            usable = event.lease is not None and self._usable(event.lease)
            self._pending[event.subnet] = event.lease if usable else None
        if self._pending and self._flush is None:
            delay = max(0.0, self._quiet_from - time.monotonic())
            self._flush = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        """Apply what is pending to the peer table, as one batch, then to the backend."""
        self._flush = None
        pending, self._pending = self._pending, {}
        peers = self.node.peers
        assert peers is not None
        upserts = [lease for lease in pending.values() if lease is not None]
        removals = [ident for ident, lease in pending.items() if lease is None]
        self._timed(lambda: self._changed(*peers.apply(upserts, removals)))

    def _timed(self, batch: Callable[[], None]) -> None:
        """Run one batch and note when the next may run."""
        started = time.monotonic()
        batch()
        now = time.monotonic()
        self._quiet_from = now + SPACING * (now - started)


def _freeze_long_lived() -> None:
    """Move what a listing built (the leases, the peer table: until the next listing)
    out of reach of the cyclic GC's full passes. Each pass walks every tracked object,
    ~20 ms at 10,000 peers, and runs on the loop whenever enough new objects (a status
    answer's rows) have survived: a stall of the drains. Collected first, so no cyclic
    garbage of the moment is frozen with it; once per listing, not per watch batch."""
    gc.collect()
    gc.freeze()
