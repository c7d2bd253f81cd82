"""The embedded registry: etcd's data model (keys, JSON values, revisions, TTLs, watch) in
one JSON file, shared by every daemon on a machine through ``flock``.

Writers take an exclusive lock on ``<file>.lock`` and replace the data file atomically, so
readers (the watch poller) never see a torn file and need no lock. History is kept for the
last ``history`` revisions; a watcher that falls further behind gets RevisionCompacted,
exactly like etcd after a compaction.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from control.atomic_file import write_atomic
from control.kv import Entry, Event, RegistryError, RevisionCompacted

State = dict[str, Any]


def _empty() -> State:
    return {"revision": 0, "compact_revision": 0, "keys": {}, "events": []}


def _check_shape(state: Any) -> None:
    """Raise ValueError unless ``state`` has exactly the structure this module writes."""

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(state, dict):
        raise ValueError("not an object")
    if not (is_int(state.get("revision")) and is_int(state.get("compact_revision"))):
        raise ValueError("bad revision")
    keys, events = state.get("keys"), state.get("events")
    if not isinstance(keys, dict) or not isinstance(events, list):
        raise ValueError("bad keys or events")
    for item in keys.values():
        if not (
            isinstance(item, dict)
            and isinstance(item.get("value"), str)
            and is_int(item.get("mod_revision"))
            and (item.get("expires") is None or isinstance(item["expires"], int | float))
        ):
            raise ValueError("bad key entry")
    for event in events:
        if not (
            isinstance(event, dict)
            and is_int(event.get("revision"))
            and event.get("kind") in ("put", "delete")
            and isinstance(event.get("key"), str)
            and isinstance(event.get("value"), str)
            and isinstance(event.get("has_ttl"), bool)
        ):
            raise ValueError("bad event")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


class FileRegistry:
    """A :class:`control.kv.KeyValueStore` in a file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float = 0.1,
        history: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.poll_interval = poll_interval
        self.history = history
        self.clock = clock

    # -- file access ---------------------------------------------------------------------

    def _load(self) -> State:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return _empty()
        except OSError as e:
            raise RegistryError(f"registry file {self.path}: {e.strerror}") from None
        try:
            state = json.loads(text)
            _check_shape(state)
        except (ValueError, TypeError, RecursionError):
            raise RegistryError(
                f"registry file {self.path} is corrupt (not a registry JSON); remove it"
            ) from None
        return state  # type: ignore[no-any-return]

    def _store(self, state: State) -> None:
        write_atomic(self.path, json.dumps(state), 0o644)

    @contextmanager
    def _locked(self) -> Iterator[State]:
        """Read-modify-write under the lock; the state is written back if it changed."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.lock_path, "a")  # noqa: SIM115 - held for the block
        except OSError as e:
            raise RegistryError(f"registry file {self.path}: {e.strerror}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._load()
            before = state["revision"]
            self._expire(state)
            yield state
            if state["revision"] != before:
                self._trim(state)
                self._store(state)

    def _expire(self, state: State) -> None:
        now = self.clock()
        for key, item in list(state["keys"].items()):
            if item["expires"] is not None and item["expires"] <= now:
                self._delete(state, key)

    def _trim(self, state: State) -> None:
        events = state["events"]
        if len(events) > self.history:
            del events[: len(events) - self.history]
            state["compact_revision"] = events[0]["revision"] - 1

    @staticmethod
    def _put(state: State, key: str, value: bytes, expires: float | None) -> None:
        state["revision"] += 1
        revision = state["revision"]
        state["keys"][key] = {"value": _text(value), "expires": expires, "mod_revision": revision}
        state["events"].append(
            {
                "revision": revision,
                "kind": "put",
                "key": key,
                "value": _text(value),
                "has_ttl": expires is not None,
            }
        )

    @staticmethod
    def _delete(state: State, key: str) -> None:
        del state["keys"][key]
        state["revision"] += 1
        state["events"].append(
            {
                "revision": state["revision"],
                "kind": "delete",
                "key": key,
                "value": "",
                "has_ttl": True,
            }
        )

    def _expires(self, ttl: int | None) -> float | None:
        return None if ttl is None else self.clock() + ttl

    # -- synchronous operations (run in a thread by the async API) ----------------------

    def get_sync(self, key: str) -> Entry | None:
        with self._locked() as state:
            item = state["keys"].get(key)
            if item is None:
                return None
            return Entry(
                key, _bytes(item["value"]), item["mod_revision"], item["expires"] is not None
            )

    def list_sync(self, prefix: str) -> tuple[list[Entry], int]:
        with self._locked() as state:
            entries = [
                Entry(k, _bytes(v["value"]), v["mod_revision"], v["expires"] is not None)
                for k, v in sorted(state["keys"].items())
                if k.startswith(prefix)
            ]
            return entries, int(state["revision"])

    def create_sync(self, key: str, value: bytes, ttl: int | None) -> bool:
        with self._locked() as state:
            if key in state["keys"]:
                return False
            self._put(state, key, value, self._expires(ttl))
            return True

    def put_sync(self, key: str, value: bytes, ttl: int | None) -> None:
        with self._locked() as state:
            self._put(state, key, value, self._expires(ttl))

    def delete_sync(self, key: str) -> bool:
        with self._locked() as state:
            if key not in state["keys"]:
                return False
            self._delete(state, key)
            return True

    def compact_sync(self, revision: int) -> None:
        """Forget history up to ``revision`` (what ``etcdctl compact`` does)."""
        with self._locked() as state:
            if revision > state["revision"]:
                raise RegistryError(
                    f"cannot compact to {revision}: a future revision (now {state['revision']})"
                )
            state["events"] = [e for e in state["events"] if e["revision"] > revision]
            state["compact_revision"] = max(state["compact_revision"], revision)
            self._store(state)

    def sweep_sync(self) -> None:
        """Delete expired keys (any locked operation does this too)."""
        with self._locked():
            pass

    # -- the async KeyValueStore API -----------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        return await asyncio.to_thread(self.get_sync, key)

    async def list_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        return await asyncio.to_thread(self.list_sync, prefix)

    async def create(self, key: str, value: bytes, ttl: int | None) -> bool:
        return await asyncio.to_thread(self.create_sync, key, value, ttl)

    async def put(self, key: str, value: bytes, ttl: int | None) -> None:
        await asyncio.to_thread(self.put_sync, key, value, ttl)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self.delete_sync, key)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        seen = start_revision - 1
        stamp: tuple[int, int, int] | None = None
        next_sweep = 0.0
        while True:
            now = time.monotonic()
            if now >= next_sweep:
                await asyncio.to_thread(self.sweep_sync)
                next_sweep = now + 1.0
            try:
                st = os.stat(self.path)
                current = (st.st_mtime_ns, st.st_ino, st.st_size)
            except FileNotFoundError:
                current = (0, 0, 0)
            if current != stamp:
                stamp = current
                state = self._load()
                if seen < state["compact_revision"]:
                    raise RevisionCompacted(int(state["compact_revision"]))
                batch = [
                    Event(e["kind"], e["key"], _bytes(e["value"]), e["revision"], e["has_ttl"])
                    for e in state["events"]
                    if e["revision"] > seen and e["key"].startswith(prefix)
                ]
                seen = max(seen, int(state["revision"]))
                if batch:
                    yield batch
            await asyncio.sleep(self.poll_interval)

    async def close(self) -> None:
        return None
