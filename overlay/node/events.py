"""Registry events as peer changes: a listing replaces the peer table, each watch event
updates it, and the backend hears what was added and removed."""

from __future__ import annotations

from ipaddress import IPv4Network

from control.lease import Lease
from control.subnet_manager import LeaseEvent
from overlay.node.state import NodeState
from overlay.observe import log as overlay_log


class PeerEvents:
    def __init__(self, node: NodeState) -> None:
        self.node = node
        self.log = node.log
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
            self.log.info("peer_added", subnet=str(lease.subnet), public_ip=str(lease.public_ip))
        for lease in removed:
            self.log.info("peer_removed", subnet=str(lease.subnet))
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
