"""The status socket: what a running daemon knows, over a root-only Unix socket.

Protocol: the client sends one request line and reads until EOF. ``status`` (or an empty
line, or nothing within a second, so ``socat - UNIX:...`` works) answers one JSON
document, the daemon's snapshot; ``trace {...}`` streams pcapng (``overlay.observe.trace``);
``impair {...}`` changes the impairment rules and answers the rules in force
(``overlay.node.impairing``). An unknown request gets one ``error: ...`` line.

Its default path is per network namespace (``default_path``), so daemons in several
namespaces of one machine run with their defaults and ``ip netns exec nX overlay status``
finds nX's: the machine's own namespace keeps ``/run/flannel/overlay.sock``, a named one
(``ip netns identify``) gets ``/run/flannel/netns/<name>/overlay.sock``, any other
``/run/flannel/netns-inode/<inode>/overlay.sock``.

The socket is created 0600 (only root can connect): it shows every peer and streams
packets. The daemon removes a stale socket left at its path by a dead daemon (one nobody
answers on, owned by us), refuses to start on anything else, and at exit removes the
socket only if it is still the one it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from overlay.observe.slices import STEP, LoopBudget

DEFAULT_SOCKET = "/run/flannel/overlay.sock"  # in the machine's own network namespace
RUN_DIR = Path("/run/flannel")
NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))  # where `ip netns` names them
# The initial network namespace's inode number, fixed since Linux 6.18 (NET_NS_INIT_INO
# in linux/nsfs.h): the machine's namespace where /proc/1 is hidden from us.
NET_NS_INIT_INO = 0xEFFFFFF9
PER_NAMESPACE = (RUN_DIR / "netns", RUN_DIR / "netns-inode")
SUN_PATH_MAX = 107  # a Unix socket path's bytes, without the NUL
REQUEST_TIMEOUT = 1.0  # a client that sends nothing gets the status after this long
REQUEST_LIMIT = 64 * 1024
PIECE_BYTES = 32 * 1024  # a status answer's piece: written within the slice it was made in

T = TypeVar("T")
# The status answer, as pieces of its JSON (the daemon's loop runs between two).
Pieces = Callable[[], AsyncIterator[bytes]]
# (the request's argument text, reader, writer) -> runs until the request is answered
Handler = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _namespace_name(own: os.stat_result) -> str | None:
    """The name `ip netns identify` gives the namespace ``own`` (same device and inode
    as a file in /run/netns), None when it has none."""
    for directory in NETNS_DIRS:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            try:
                st = os.stat(entry.path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                return entry.name
    return None


def _is_machines(own: os.stat_result) -> bool:
    """Whether ``own`` is the machine's network namespace: PID 1's, or, where /proc/1 is
    hidden, the kernel's initial one; an unnamed namespace we cannot place counts as the
    machine's (today's default path)."""
    try:
        init = os.stat("/proc/1/ns/net")
    except OSError:
        return own.st_ino == NET_NS_INIT_INO or _namespace_name(own) is None
    return (init.st_dev, init.st_ino) == (own.st_dev, own.st_ino)


def default_path() -> Path:
    """The status socket of this network namespace's daemon: what `overlay run` listens
    on and `overlay status|trace|impair` ask, both computed in the namespace they run in."""
    try:
        own = os.stat("/proc/self/ns/net")
    except OSError:
        return Path(DEFAULT_SOCKET)
    if _is_machines(own):
        return Path(DEFAULT_SOCKET)
    name = _namespace_name(own)
    if name is not None:
        path = PER_NAMESPACE[0] / name / "overlay.sock"
        if len(os.fsencode(path)) <= SUN_PATH_MAX:
            return path
    return PER_NAMESPACE[1] / str(own.st_ino) / "overlay.sock"


class StatusSocketError(OSError):
    """The status socket's path is taken; the message says by what and what to do."""


def _claim(path: Path) -> None:
    """Make ``path`` free for our socket: remove a stale socket of ours, refuse the rest."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StatusSocketError(
            f"--status-socket {path} exists and is not a socket: refusing to replace it "
            "(remove it or choose another path)"
        )
    if st.st_uid != os.geteuid():
        raise StatusSocketError(
            f"--status-socket {path} is a socket of uid {st.st_uid}, not ours: refusing to "
            "replace it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(REQUEST_TIMEOUT)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: a daemon that died left it
        return
    except OSError as e:
        raise StatusSocketError(f"--status-socket {path}: {e.strerror or e}") from None
    finally:
        probe.close()
    raise StatusSocketError(
        f"another daemon answers on --status-socket {path}: stop it first or give this one "
        "another --status-socket"
    )


class StatusServer:
    """The listening socket; ``close()`` removes it only if it is still the one we made."""

    def __init__(self, server: asyncio.AbstractServer, path: Path, identity: tuple[int, int]):
        self.server = server
        self.path = path
        self.identity = identity

    def close(self) -> None:
        self.server.close()
        try:
            st = self.path.lstat()
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self.identity:
            self.path.unlink(missing_ok=True)
            if self.path.parent.parent in PER_NAMESPACE:  # a namespace's directory: ours
                with contextlib.suppress(OSError):  # not empty: someone else's files
                    self.path.parent.rmdir()


def bind(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, 0600 from its creation (no window in which
    another user could connect), after ``_claim``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _claim(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise StatusSocketError(f"cannot create --status-socket {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def serve(
    path: Path, pieces: Pieces, handlers: dict[str, Handler] | None = None
) -> StatusServer:
    """Answer status requests (and those in ``handlers``, by their first word)."""
    handlers = handlers or {}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            except TimeoutError:
                line = b""
            request = line.decode("utf-8", "replace").strip()
            command, _, rest = request.partition(" ")
            if command in ("", "status"):
                async for piece in pieces():
                    writer.write(piece)
                    await writer.drain()  # what waits to be sent stays small
                writer.write(b"\n")
            elif command in handlers:
                await handlers[command](rest, reader, writer)
            else:
                writer.write(f"error: unknown request {command[:40]!r}\n".encode())
            await writer.drain()
        except (ConnectionError, ValueError):
            pass  # the client went away, or sent a line longer than the limit
        finally:
            await _close(writer)

    sock = bind(path)
    st = path.lstat()
    server = await asyncio.start_unix_server(answer, sock=sock, limit=REQUEST_LIMIT)
    return StatusServer(server, path, (st.st_dev, st.st_ino))


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a connection, the kernel's release of its socket in a thread: closing a
    Unix socket whose last answer the client has not read yet (megabytes of a status
    answer) took 5 ms in close(2) (strace of a daemon at 10,000 peers), a pause of the
    drains on the loop. A duplicate of the fd keeps the socket alive while the transport
    closes its own; the duplicate, the last reference, is closed off the loop."""
    sock = writer.get_extra_info("socket")
    try:
        last = os.dup(sock.fileno()) if sock is not None else -1
    except OSError:
        last = -1
    writer.close()
    if last < 0:
        return
    try:
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    finally:
        try:  # submitted once, not awaited: a cancelled answer closes it all the same
            asyncio.get_running_loop().run_in_executor(None, os.close, last)
        except RuntimeError:  # the loop's executor is shut down (the daemon stops)
            os.close(last)


async def json_pieces(
    doc: dict[str, Any],
    items: Sequence[T],
    rows: Callable[[Sequence[T]], list[dict[str, Any]]],
    budget: LoopBudget,
    key: str = "peers",
) -> AsyncIterator[bytes]:
    """``doc`` as JSON with ``rows(items)`` under ``key`` (last), the rows made and encoded
    STEP items at a time (``encoded_pieces``)."""

    def encode(start: int, stop: int) -> str:
        return json.dumps(rows(items[start:stop]))[1:-1]

    async for piece in encoded_pieces(doc, len(items), encode, budget, key):
        yield piece


async def encoded_pieces(
    doc: dict[str, Any],
    count: int,
    encode: Callable[[int, int], str],
    budget: LoopBudget,
    key: str = "peers",
) -> AsyncIterator[bytes]:
    """``doc`` as JSON with a list of ``count`` items under ``key`` (last), ``encode(start,
    stop)`` giving the JSON of items start..stop-1 without the brackets, STEP items at a
    time: whenever ``budget`` is spent, what is encoded so far is handed over and the loop
    gets its turn, so tens of thousands of peers are not one long pause of the drains
    (nor all their rows in memory at once). What is encoded is also handed over once it
    reaches PIECE_BYTES, without a turn: the caller's write of a piece then falls inside
    the budget's slice, where joining and writing all a slice's text after it was spent
    (kept rows make ~100 kB in a slice) held the loop more than twice the slice."""
    head = json.dumps(doc)
    out = [head[:-1], ", " if len(head) > 2 else "", json.dumps(key), ": ["]
    size = 0
    for start in range(0, count, STEP):
        encoded = encode(start, min(start + STEP, count))
        out.append(", " + encoded if start else encoded)
        size += len(encoded)
        spent = budget.spent()
        if spent or size >= PIECE_BYTES:
            yield "".join(out).encode()
            out, size = [], 0
        if spent:
            await budget.turn()
    out.append("]}")
    yield "".join(out).encode()


def ask(path: str | os.PathLike[str], request: str, timeout: float = 5.0) -> bytes:
    """Send one request line, return the whole answer (OSError when nobody answers)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(request.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def query(path: str | os.PathLike[str], timeout: float = 5.0) -> dict[str, Any]:
    """The daemon's snapshot (OSError when nobody answers, ValueError for a bad answer)."""
    result: dict[str, Any] = json.loads(ask(path, "status", timeout))
    return result
