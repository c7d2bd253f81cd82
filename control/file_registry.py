"""The embedded registry: etcd's data model (keys, JSON values, revisions, TTLs, watch) in
one JSON file, shared by every daemon on a machine through ``flock``.

Writers take an exclusive lock on ``<file>.lock`` and replace the data file atomically, so
readers (the watch poller) never see a torn file and need no lock. History is kept for the
last ``history`` revisions; a watcher that falls further behind gets RevisionCompacted,
exactly like etcd after a compaction. Each key records the revision that created it, as
etcd's create_revision (it orders leases by age: control.lease_rules).

Secure by default: the file and its lock are 0600, in a directory owned by root (or by
us) that nobody else may write, and every ancestor directory is owned by root or us and
not writable by others unless sticky (like /tmp). Anything else is refused with one line
(RegistryConfigError), as is a registry that is not a regular file, not UTF-8 JSON of
the registry's shape, or larger than MAX_FILE. A lock held by someone else is waited
for up to ``lock_timeout`` seconds per operation, polling (so close() ends a wait at
once); after a second of waiting the holder is reported once (``notify``), named from
/proc/locks when it can be found.

Every operation's I/O failure is a RegistryError naming the path and what failed
(``registry file /run/flannel/registry.json: cannot write it: No space left on
device``), never a bare OSError: a full or read-only filesystem, an I/O error or a
directory that went away is worth a retry (a running daemon keeps its lease and state
and tries again); a permission or a path of the wrong kind is a RegistryConfigError.
A write that fails leaves the file as it was.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import math
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from control.atomic_file import write_atomic
from control.kv import Entry, Event, RegistryConfigError, RegistryError, RevisionCompacted

State = dict[str, Any]
Notify = Callable[..., None]

MODE = 0o600
MAX_FILE = 64 * 1024 * 1024  # far above what one machine's nodes write (~1 KB a lease)
LOCK_TIMEOUT = 10.0
LOCK_WARN = 1.0
PROC_LOCKS = Path("/proc/locks")


def _quiet(event: str, **fields: Any) -> None:
    return None


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
            and is_int(item.get("create_revision", 0))
            and (item.get("expires") is None or isinstance(item["expires"], int | float))
        ):
            raise ValueError("bad key entry")
    for event in events:
        if not (
            isinstance(event, dict)
            and is_int(event.get("revision"))
            and is_int(event.get("create_revision", 0))
            and event.get("kind") in ("put", "delete")
            and isinstance(event.get("key"), str)
            and isinstance(event.get("value"), str)
            and isinstance(event.get("has_ttl"), bool)
        ):
            raise ValueError("bad event")


# errnos that retrying cannot fix: a path of the wrong kind, or one we may not use. Any
# other OSError (ENOSPC, EDQUOT, EROFS, EIO, ENOENT of a directory that went away, ...)
# may be gone at the next try.
LASTING = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ELOOP,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENAMETOOLONG,
        errno.ENXIO,
    }
)


def _io_failure(what: str, doing: str, error: OSError) -> RegistryError:
    """``<what>: cannot <doing>: <reason>``, as RegistryConfigError when retrying cannot
    fix it, else as RegistryError."""
    reason = "it is a symbolic link" if error.errno == errno.ELOOP else error.strerror
    kind = RegistryConfigError if error.errno in LASTING else RegistryError
    return kind(f"{what}: cannot {doing}: {reason or error}")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _created(item: dict[str, Any]) -> int:
    """A key's create revision (files written before it was recorded: its mod revision)."""
    return int(item.get("create_revision") or item["mod_revision"])


def _entry(key: str, item: dict[str, Any]) -> Entry:
    return Entry(
        key,
        _bytes(item["value"]),
        item["mod_revision"],
        item["expires"] is not None,
        _created(item),
    )


def _owner_problem(st: os.stat_result, what: str, *, sticky_ok: bool = False) -> str | None:
    """Why a file or directory with ``st`` may not hold (or lead to) the registry."""
    if st.st_uid not in (0, os.geteuid()):
        return f"{what} is owned by uid {st.st_uid}, not root"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        return f"{what} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _make_directories(directory: Path) -> None:
    """Create what is missing of ``directory``, each 0755 whatever the umask (a umask of
    002 would make them group-writable, which the checks then refuse)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        os.chmod(path, 0o755)


def lock_holder(fd: int) -> str:
    """Who holds the flock on ``fd``'s file, from /proc/locks: "pid 1234 (comm)"."""
    st = os.fstat(fd)
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        lines = PROC_LOCKS.read_text().splitlines()
    except OSError:
        return "an unknown process"
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":  # "->": a waiter, not the holder
            continue
        try:
            major, minor, inode = fields[5].split(":")
            found = (int(major, 16), int(minor, 16), int(inode))
        except ValueError:
            continue
        if found == wanted and fields[4] != str(os.getpid()):
            try:
                comm = Path(f"/proc/{fields[4]}/comm").read_text().strip()
            except OSError:
                comm = "?"
            return f"pid {fields[4]} ({comm})"
    return "an unknown process"


def _earliest_expiry(state: State) -> float:
    """When the first key with a TTL expires (inf: none has one). A watcher sweeps then,
    not every second: N watchers each taking the lock and parsing the whole file every
    second is work quadratic in the nodes of a bed, with nothing to expire for a day."""
    return min(
        (item["expires"] for item in state["keys"].values() if item["expires"] is not None),
        default=math.inf,
    )


class FileRegistry:
    """A :class:`control.kv.KeyValueStore` in a file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float = 0.1,
        history: int = 1000,
        clock: Callable[[], float] = time.time,
        lock_timeout: float = LOCK_TIMEOUT,
        notify: Notify = _quiet,
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.poll_interval = poll_interval
        self.history = history
        self.clock = clock
        self.lock_timeout = lock_timeout
        self.notify = notify
        self._closed = False
        self._reported_wait = False  # a lock wait was reported; reset by a quick lock

    @property
    def _file_label(self) -> str:
        return f"registry file {self.path}"

    @property
    def _lock_label(self) -> str:
        return f"registry lock {self.lock_path}"

    # -- file access ---------------------------------------------------------------------

    def check_sync(self) -> None:
        """Everything a start needs, checked before anything is written: the directory
        chain, the lock and the file (type, owner, mode, content). RegistryConfigError
        names the path and what is wrong."""
        for ancestor in reversed(self.path.parent.absolute().parents):
            try:
                st = os.stat(ancestor)
            except FileNotFoundError:
                break  # created below, by us
            except OSError as e:
                raise _io_failure(self._file_label, f"read {ancestor}", e) from None
            problem = _owner_problem(st, f"{ancestor}", sticky_ok=True)
            if problem:
                raise RegistryConfigError(f"{self._file_label}: {problem}")
        with self._locked():
            pass  # the directory, the lock, and the file's content

    def _check_directory(self) -> None:
        directory = self.path.parent
        try:
            _make_directories(directory)
            st = os.stat(directory)
        except OSError as e:
            raise _io_failure(
                self._file_label, f"make or read its directory {directory}", e
            ) from None
        problem = _owner_problem(st, f"its directory {directory}")
        if problem:
            raise RegistryConfigError(f"{self._file_label}: {problem}")

    def _load(self) -> State:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return _empty()
        except OSError as e:
            raise _io_failure(self._file_label, "open it", e) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RegistryConfigError(f"{self._file_label} is not a regular file")
            problem = _owner_problem(st, "it")
            if problem:
                raise RegistryConfigError(f"{self._file_label}: {problem}")
            if st.st_size > MAX_FILE:
                raise RegistryConfigError(
                    f"registry file {self.path} is corrupt: {st.st_size} bytes, more than "
                    f"a registry may hold ({MAX_FILE}); remove it"
                )
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(MAX_FILE + 1)
        except OSError as e:
            raise _io_failure(self._file_label, "read it", e) from None
        finally:
            os.close(fd)
        try:
            if len(data) > MAX_FILE:
                raise ValueError("grew too large")
            state = json.loads(data.decode("utf-8"))
            _check_shape(state)
        except (ValueError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise RegistryConfigError(
                f"registry file {self.path} is corrupt (not a registry JSON); remove it"
            ) from None
        return state  # type: ignore[no-any-return]

    def _store(self, state: State) -> None:
        try:
            write_atomic(self.path, json.dumps(state), MODE)
        except OSError as e:
            raise _io_failure(self._file_label, "write it", e) from None

    def _open_lock(self) -> int:
        """The lock file, created 0600; refused when someone else owns it or may write it
        (one of ours from an older version, 0644, is tightened)."""
        self._check_directory()
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self.lock_path, flags, MODE)
        except OSError as e:
            raise _io_failure(self._lock_label, "open it", e) from None
        try:
            st = os.fstat(fd)
            problem = None if stat.S_ISREG(st.st_mode) else "it is not a regular file"
            problem = problem or _owner_problem(st, "it")
            if problem:
                raise RegistryConfigError(f"{self._lock_label}: {problem}")
            if stat.S_IMODE(st.st_mode) != MODE:
                os.fchmod(fd, MODE)
        except OSError as e:
            os.close(fd)
            raise _io_failure(self._lock_label, "check it or tighten its mode", e) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lock(self, fd: int) -> None:
        """flock(LOCK_EX), polled: up to ``lock_timeout`` s, the holder reported once."""
        start = time.monotonic()
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as e:
                raise _io_failure(self._lock_label, "lock it", e) from None
            waited = time.monotonic() - start
            if self._closed:
                raise RegistryError(f"registry {self.path} closed while waiting for its lock")
            if waited >= LOCK_WARN and not self._reported_wait:
                self._reported_wait = True
                self.notify(
                    "registry_lock_held",
                    lock=str(self.lock_path),
                    holder=lock_holder(fd),
                    waited_s=round(waited, 1),
                    timeout_s=self.lock_timeout,
                )
            if waited >= self.lock_timeout:
                raise RegistryError(
                    f"registry lock {self.lock_path} held by {lock_holder(fd)} for more "
                    f"than {self.lock_timeout:g} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        if time.monotonic() - start < LOCK_WARN:
            self._reported_wait = False  # the contention is over

    @contextmanager
    def _locked(self) -> Iterator[State]:
        """Read-modify-write under the lock; the state is written back if it changed."""
        fd = self._open_lock()
        try:
            self._lock(fd)
            state = self._load()
            before = state["revision"]
            self._expire(state)
            yield state
            if state["revision"] != before:
                self._trim(state)
                self._store(state)
        finally:
            os.close(fd)  # also releases the lock

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
        old = state["keys"].get(key)
        created = _created(old) if old is not None else revision
        state["keys"][key] = {
            "value": _text(value),
            "expires": expires,
            "mod_revision": revision,
            "create_revision": created,
        }
        state["events"].append(
            {
                "revision": revision,
                "kind": "put",
                "key": key,
                "value": _text(value),
                "has_ttl": expires is not None,
                "create_revision": created,
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
            return None if item is None else _entry(key, item)

    def list_sync(self, prefix: str) -> tuple[list[Entry], int]:
        with self._locked() as state:
            entries = [
                _entry(k, v) for k, v in sorted(state["keys"].items()) if k.startswith(prefix)
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

    async def check(self) -> None:
        """``check_sync`` off the event loop (it may wait for the lock)."""
        await asyncio.to_thread(self.check_sync)

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

    def _changes(self, prefix: str, seen: int) -> tuple[list[Event], int, float]:
        """The events under ``prefix`` after revision ``seen``, the file's revision and its
        earliest expiry. The parsed file is dropped on return, not held by an idle watch."""
        state = self._load()
        if seen < state["compact_revision"]:
            raise RevisionCompacted(int(state["compact_revision"]))
        batch = [
            Event(
                e["kind"],
                e["key"],
                _bytes(e["value"]),
                e["revision"],
                e["has_ttl"],
                e.get("create_revision") or (e["revision"] if e["kind"] == "put" else 0),
            )
            for e in state["events"]
            if e["revision"] > seen and e["key"].startswith(prefix)
        ]
        return batch, int(state["revision"]), _earliest_expiry(state)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        seen = start_revision - 1
        stamp: tuple[int, int, int] | None = None
        sweep_at = -math.inf  # self.clock() time; at once, then when the next TTL ends
        while True:
            if self.clock() >= sweep_at:
                await asyncio.to_thread(self.sweep_sync)
                # Not again before a second has passed if nothing changed the file (a
                # renewal in between, or a writer's clock behind ours): a load sets it.
                sweep_at = self.clock() + 1.0
            try:
                st = os.stat(self.path)
                current = (st.st_mtime_ns, st.st_ino, st.st_size)
            except FileNotFoundError:
                current = (0, 0, 0)
            except OSError as e:
                raise _io_failure(self._file_label, "read it", e) from None
            if current != stamp:
                stamp = current
                batch, revision, sweep_at = self._changes(prefix, seen)
                seen = max(seen, revision)
                if batch:
                    yield batch
            await asyncio.sleep(self.poll_interval)

    async def close(self) -> None:
        """Ends any lock wait in progress (a thread of ours polling for it) at once."""
        self._closed = True
