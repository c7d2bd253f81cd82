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
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from ipaddress import IPv4Network

from control.lease import Lease
from control.subnet_manager import LeaseEvent
from overlay.node.state import NodeState
from overlay.observe import log as overlay_log

SPACING = 4.0


class PeerEvents:
    def __init__(self, node: NodeState) -> None:
        self.node = node
        self.log = node.log
        self._warned_backend: set[IPv4Network] = set()
        # Changes not applied yet, by subnet: the lease to hold, or None to remove it.
        self._pending: dict[IPv4Network, Lease | None] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._quiet_from = 0.0  # time.monotonic() from which a batch may run again

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
            self.log.info("peer_added", subnet=str(lease.subnet), public_ip=str(lease.public_ip))
        for lease in removed:
            self.log.info("peer_removed", subnet=str(lease.subnet))
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
        removals = [subnet for subnet, lease in pending.items() if lease is None]
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
