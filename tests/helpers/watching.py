"""Helpers for the subnet manager's watch tests, shared by the file and etcd registries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

from control.kv import Entry
from control.lease import Lease
from control.subnet_manager import LeaseEvent, SubnetManager


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 3.0, what: str = "condition"
) -> float:
    """Poll ``predicate``; returns the seconds it took (fails after ``timeout``)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


class Recorder:
    """What a watch delivered: its snapshots and events, in order (and in batches)."""

    def __init__(self) -> None:
        self.snapshots: list[list[Lease]] = []
        self.events: list[LeaseEvent] = []
        self.batches: list[list[LeaseEvent]] = []  # as delivered: one per watch response

    def on_snapshot(self, leases: list[Lease]) -> None:
        self.snapshots.append(leases)

    def on_events(self, events: list[LeaseEvent]) -> None:
        self.events.extend(events)
        self.batches.append(events)

    def added(self, subnet: IPv4Network) -> bool:
        return any(e.kind == "added" and e.subnet == subnet for e in self.events)


def start_watch(
    m: SubnetManager, own: Lease, recorder: Recorder, revision: int | None = None
) -> asyncio.Task[None]:
    return asyncio.create_task(
        m.watch(own, recorder.on_snapshot, recorder.on_events, revision=revision)
    )


class CountingStore:
    """Wraps a KeyValueStore and counts list_prefix calls (a hot loop shows up here)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.list_calls = 0

    async def list_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        self.list_calls += 1
        result: tuple[list[Entry], int] = await self.inner.list_prefix(prefix)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
