"""The small key-value interface every registry implements (etcd v3 semantics).

The subnet manager is written once against this; the etcd client and the embedded file
registry are thin adapters behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol


class RegistryError(Exception):
    """The registry could not be reached or answered with an error (worth a retry)."""


class RegistryConfigError(RegistryError):
    """The registry cannot be used as configured: a path, a certificate, a credential or
    its content is wrong, and retrying will not fix it. At start the daemon stops at once
    with this one line; while running it is handled like any RegistryError (the last good
    state stays, the next try may find it fixed)."""


class RevisionCompacted(RegistryError):
    """A watch asked for history the registry no longer keeps: re-list, then resume."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"required revision has been compacted (now {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    mod_revision: int
    has_ttl: bool  # False: written without a lease/TTL, i.e. a reservation
    # The revision that created the key (etcd's create_revision; kept across puts to an
    # existing key, new after a delete): orders leases by age, lower is older.
    create_revision: int = 0


@dataclass(frozen=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    value: bytes  # empty for a delete
    revision: int
    has_ttl: bool = True
    create_revision: int = 0  # as Entry's; 0 for a delete


class KeyValueStore(Protocol):
    async def check(self) -> None:
        """What a start needs before anything is written (RegistryConfigError when
        retrying cannot fix it; RegistryError when the registry is not reachable yet)."""
        ...

    async def get(self, key: str) -> Entry | None: ...

    async def list_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        """Every entry under ``prefix`` and the store revision of that snapshot."""
        ...

    async def create(self, key: str, value: bytes, ttl: int | None) -> bool:
        """Write ``key`` only if it does not exist; False when someone else has it."""
        ...

    async def put(self, key: str, value: bytes, ttl: int | None) -> None:
        """Write ``key`` with a fresh TTL (None: no TTL)."""
        ...

    async def delete(self, key: str) -> bool: ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Batches of events from ``start_revision`` on; raises RevisionCompacted."""
        ...

    async def close(self) -> None: ...
