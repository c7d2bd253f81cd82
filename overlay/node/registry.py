"""Which registry the node uses, and how it answers while the node runs.

etcd when endpoints are given, else the embedded file registry. ``RegistryMonitor``
turns the subnet manager's events into readiness (/readyz, `overlay status`), keeps the
lease's renewal times, and, while the registry does not answer, asks it every
``REGISTRY_PROBE`` seconds whether it is back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.etcd_endpoints import Endpoint, TlsFiles
from control.file_registry import FileRegistry
from control.kv import KeyValueStore, RegistryError
from control.lease import DEFAULT_PREFIX
from control.subnet_manager import RENEW_RETRY, SubnetManager
from overlay.observe import log as overlay_log
from overlay.observe.health import Readiness

# While the registry is unreachable, how often to ask it whether it is back (one small
# read; nothing is asked while it answers).
REGISTRY_PROBE = 2.0
# Notify events of the subnet manager that mean the registry did not answer.
REGISTRY_FAILURES = frozenset({"watch_failed", "registry_unavailable", "lease_renew_failed"})
WARNINGS = ("failed", "invalid", "compacted", "lost", "held")


@dataclass(frozen=True)
class RegistryOptions:
    """Where the registry is and how to reach it (flanneld's --etcd-* flags)."""

    etcd_endpoints: tuple[Endpoint, ...] = ()  # none: the embedded file registry
    etcd_tls: TlsFiles = field(default_factory=TlsFiles)
    etcd_username: str | None = None
    etcd_password: str | None = None
    prefix: str = DEFAULT_PREFIX
    file: Path = Path("/run/flannel/registry.json")
    timeout: float = 60.0  # at startup, how long an unreachable registry is retried
    renew_margin: int = 60 * 60  # seconds before expiry a lease is renewed


def open_registry(options: RegistryOptions, notify: Any = None) -> KeyValueStore:
    """etcd when endpoints are given, else the embedded file registry. etcd's TLS files
    are checked here (RegistryConfigError, one line, before anything is made); the
    registry file's path, owner, mode and content by ``KeyValueStore.check`` at start,
    as that takes its lock, which may be held."""
    if options.etcd_endpoints:
        # Imported here, not above: its HTTP/2 and TLS stack (h2, ssl) is a daemon's
        # memory (README, "Memory") that a daemon on the file registry never needs.
        from control.etcd_registry import EtcdRegistry

        return EtcdRegistry(
            list(options.etcd_endpoints),
            tls=options.etcd_tls,
            username=options.etcd_username,
            password=options.etcd_password,
        )
    return FileRegistry(options.file, **({"notify": notify} if notify else {}))


def registry_info(options: RegistryOptions) -> dict[str, Any]:
    """Which registry is in use, as the start-up line and `overlay status` show it."""
    if options.etcd_endpoints:
        return {
            "kind": "etcd",
            "endpoints": [str(e) for e in options.etcd_endpoints],
            "prefix": options.prefix,
        }
    return {"kind": "file", "path": str(options.file), "prefix": options.prefix}


class RegistryMonitor:
    """The subnet manager's events, as readiness, lease times and log lines."""

    def __init__(self, options: RegistryOptions, readiness: Readiness, log: Any) -> None:
        self.info = registry_info(options)
        self.readiness = readiness
        self.log = log
        self.manager: SubnetManager | None = None  # set once the manager exists
        self._down = asyncio.Event()
        self._watch_down = False  # between watch_failed and watch_recovered
        self.lease_expires: float | None = None  # Unix time; None for a reservation
        self.next_renewal: float | None = None

    def notify(self, event: str, **fields: Any) -> None:
        registry = self.readiness.registry
        if event in REGISTRY_FAILURES:
            registry.failed()
            self._down.set()
        if event == "watch_failed":  # said once per outage: the probe follows it after
            self._watch_down = True
        elif event == "watch_recovered":
            self._watch_down = False
            registry.answered()
        if event == "lease_renewed":
            registry.answered()
            assert self.manager is not None
            self.lease_renewed(float(fields.get("ttl", self.manager.ttl)))
        elif event == "lease_renew_failed":
            self.next_renewal = time.time() + RENEW_RETRY
        level = "warning" if event.endswith(WARNINGS) else "info"
        getattr(self.log, level)(event, **fields)

    def lease_renewed(self, ttl: float) -> None:
        assert self.manager is not None
        now = time.time()
        self.lease_expires = now + ttl
        self.next_renewal = now + max(ttl - self.manager.renew_margin, 1.0)

    def status(self) -> dict[str, Any]:
        """Which registry (``registry_info``) and how it answers."""
        registry = self.readiness.registry
        info = self.info
        address = ",".join(info["endpoints"]) if info["kind"] == "etcd" else info["path"]
        gone = registry.unreachable_for()
        state = "connected" if registry.connected else "unreachable"
        if not registry.connected_once and gone is None:
            state = "connecting"
        return {
            **info,
            "address": address,
            "state": state,
            "unreachable_for_s": None if gone is None else round(gone, 1),
            "watch_revision": self.manager.watch_revision if self.manager else None,
            "watch_events": registry.watch_events,
            "resyncs": registry.resyncs,
            "watch_failures": registry.failures,
        }

    async def probe(self, kv: KeyValueStore, key: str) -> None:
        """While the registry is unreachable, or the watch has not recovered yet, ask it
        every REGISTRY_PROBE seconds whether it answers (the watch only reports the next
        event, which may be hours away, and says "watch_failed" once per outage: an
        outage that starts again before the watch is back is only seen here)."""
        registry = self.readiness.registry
        while True:
            await self._down.wait()
            while not registry.connected or self._watch_down:
                await asyncio.sleep(REGISTRY_PROBE)
                try:
                    await kv.get(key)
                except RegistryError:
                    if registry.connected:
                        registry.failed()
                    continue
                registry.answered()
                if overlay_log.enabled(2):
                    self.log.debug("registry_answers")
            self._down.clear()
