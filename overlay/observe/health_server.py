"""The HTTP server behind ``--healthz-port``: /healthz, /readyz and /metrics, as flanneld's
``--healthz-ip``/``--healthz-port`` serve them, on the daemon's own event loop.

Anyone on the underlay can reach it (it listens on 0.0.0.0 by default, as flanneld's),
so what it may cost the node is bounded whatever comes in:

- no work per request beyond a few syscalls: the pages come from routes that answer at
  once (``Immediate``: /healthz, /readyz) or from a page made at most every so often and
  shared by every request meanwhile (``Cached``: /metrics), each encoded once;
- the sockets are plain non-blocking ones on ``loop.add_reader``, no stream, task or
  timer per connection; the listener has TCP_DEFER_ACCEPT, so a connection reaches us
  with its request and is answered in the accepting callback, and one that sends nothing
  stays in the kernel, not in our fds;
- ``Limits``: at most ``max_connections`` open (a new one closes the oldest), each closed
  ``timeout`` after it was accepted whatever it is doing, at most ``accepts_per_second``
  accepted (beyond, the listener rests and the kernel's backlog holds the rest), and at
  most ``ACCEPT_BATCH`` per wake-up, so the drains run between two batches.

One request per connection (``Connection: close``), as before: a scraper that keeps its
connection gains nothing here, and every open connection would be an fd held between
scrapes. Not a thread (it would take the GIL from the drain loops at every request) and
not a process (one more process competing for the same cores, and a liveness answer
that no longer says the daemon's loop runs): measured in the README, "Health and metrics".
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from ipaddress import ip_address
from typing import Protocol

MAX_HEADER = 16 * 1024  # a request head larger than this is answered 400
ACCEPT_BATCH = 32  # connections accepted per wake-up of the listener
BACKLOG = 1024  # connections the kernel holds for us while the loop drains packets
ACCEPT_PAUSE = 0.5  # seconds accepting stops after EMFILE/ENFILE/ENOBUFS/ENOMEM
SWEEP_EVERY = 1.0  # seconds between two looks for connections past their time
BUDGET_WINDOW = 0.1  # seconds over which the accept budget is counted
TCP_DEFER_ACCEPT = getattr(socket, "TCP_DEFER_ACCEPT", 9)
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True)
class Limits:
    """What one listener may take of the daemon, whatever comes in."""

    max_connections: int = 256  # open at once; one more closes the oldest
    timeout: float = 5.0  # seconds from accept to the last byte sent, at most
    accepts_per_second: int = 2000  # beyond, the kernel's backlog holds the rest


Page = tuple[int, str, bytes]  # status, content type, body
TEXT = "text/plain; charset=utf-8"
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
REASONS |= {408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable"}


class Route(Protocol):
    """Where a path's page comes from."""

    def current(self) -> Page | None:
        """The page, if it can be had now; None when it has to be made (``refresh``)."""

    def refresh(self) -> asyncio.Future[Page]:
        """The page being made (one at a time, shared by every request waiting for it)."""


class Immediate:
    """A page cheap enough to make for every request (/healthz, /readyz)."""

    def __init__(self, make: Callable[[], Page]) -> None:
        self.make = make

    def current(self) -> Page:
        return self.make()

    def refresh(self) -> asyncio.Future[Page]:
        future: asyncio.Future[Page] = asyncio.get_running_loop().create_future()
        future.set_result(self.make())
        return future


class Cached:
    """A page made at most once per ``max_age()`` seconds, however many ask for it: the
    snapshot it shows is at most that old when it is sent. The age grows with what the
    page costs (``min_age``, or ``1 / share`` times the last making, whichever is
    longer; not the first making, which pays what is done once), so making it takes at
    most ``share`` of the loop. A page that fails to be
    made is a 500 page, cached the same way."""

    def __init__(
        self, make: Callable[[], Awaitable[Page]], min_age: float, share: float = 0.05
    ) -> None:
        self.make = make
        self.min_age = min_age
        self.share = share
        self.page: Page | None = None
        self.made_at = 0.0  # time.monotonic() when the page's snapshot was taken
        self.cost = 0.0  # seconds the last page took to make
        self.made = 0  # pages made
        self._pending: asyncio.Future[Page] | None = None

    def max_age(self) -> float:
        return max(self.min_age, self.cost / self.share)

    def current(self) -> Page | None:
        if self.page is not None and time.monotonic() - self.made_at < self.max_age():
            return self.page
        return None

    def refresh(self) -> asyncio.Future[Page]:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._make())
        return self._pending

    async def _make(self) -> Page:
        started = time.monotonic()
        try:
            page = await self.make()
        except Exception as e:  # noqa: BLE001 - a broken page must not end the server
            page = 500, TEXT, f"internal error: {type(e).__name__}: {e}\n".encode()
        finally:
            self._pending = None
        if self.made:  # the first page pays one-time costs (prometheus_client's import)
            self.cost = time.monotonic() - started
        self.page, self.made_at = page, started
        self.made += 1
        return page


def encode(page: Page) -> tuple[bytes, int]:
    """(the whole response, the length of its head), so HEAD sends a prefix of it."""
    status, content_type, body = page
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body, len(head)


class _Connection:
    __slots__ = (
        "sock",
        "fd",
        "accepted",
        "request",
        "out",
        "reading",
        "writing",
        "linger",
        "closed",
    )

    def __init__(self, sock: socket.socket, accepted: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.accepted = accepted
        self.request = bytearray()
        self.out: memoryview | None = None  # what is left to send
        self.reading = self.writing = self.closed = False
        self.linger = False  # after the answer, read what the client still sends, then close


class HealthServer:
    """GET and HEAD of ``routes``' paths on a listening socket of the running loop."""

    def __init__(self, routes: dict[str, Route], limits: Limits | None = None) -> None:
        self.routes = routes
        self.limits = limits or Limits()
        self.open: dict[int, _Connection] = {}  # by fd, oldest first
        self.served = self.evicted = self.timed_out = self.accept_errors = self.accept_pauses = 0
        self._encoded: dict[str, tuple[Page, bytes, int]] = {}  # path -> last page, encoded
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._window_end = 0.0  # when the current accept budget window ends
        self._window_left = 0  # accepts left in it

    # -- listening --------------------------------------------------------------------

    def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (an OSError if it cannot)."""
        family = socket.AF_INET6 if ip_address(host).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            defer = max(1, int(self.limits.timeout))
            sock.setsockopt(socket.IPPROTO_TCP, TCP_DEFER_ACCEPT, defer)
            sock.bind((host, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._loop = asyncio.get_running_loop()
        self._listener = sock
        self._loop.add_reader(sock.fileno(), self._accept)
        self._sweep = self._loop.call_later(SWEEP_EVERY, self._expire)

    def close(self) -> None:
        """Stop listening and close every connection."""
        for handle in (self._sweep, self._resume):
            if handle is not None:
                handle.cancel()
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())  # False if paused
            self._listener.close()
            self._listener = None
        for conn in list(self.open.values()):
            self._close(conn)

    def stats(self) -> dict[str, int]:
        """What it met, for `overlay status` and /metrics."""
        return {
            "open": len(self.open),
            "served": self.served,
            "evicted": self.evicted,
            "timed_out": self.timed_out,
            "accept_pauses": self.accept_pauses,
            "accept_errors": self.accept_errors,
        }

    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def _accept(self) -> None:
        assert self._listener is not None
        now = time.monotonic()
        if now >= self._window_end:
            self._window_end = now + BUDGET_WINDOW
            self._window_left = max(1, int(self.limits.accepts_per_second * BUDGET_WINDOW))
        for _ in range(min(ACCEPT_BATCH, self._window_left)):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.accept_errors += 1
                if e.errno in OUT_OF_RESOURCES:  # the listener stays readable: pause
                    self._pause(ACCEPT_PAUSE)
                    return
                continue  # ECONNABORTED and the like: that connection only
            self._window_left -= 1
            self._admit(sock, now)
        if self._window_left <= 0:  # the budget is spent: the backlog waits
            self._pause(self._window_end - now)

    def _admit(self, sock: socket.socket, now: float) -> None:
        if len(self.open) >= self.limits.max_connections:
            self.evicted += 1
            self._close(next(iter(self.open.values())))
        sock.setblocking(False)
        conn = _Connection(sock, now)
        self.open[conn.fd] = conn
        self._read(conn)

    def _pause(self, seconds: float) -> None:
        """Stop accepting for ``seconds`` (the kernel holds new connections meanwhile)."""
        assert self._listener is not None and self._loop is not None
        self.accept_pauses += 1
        self._loop.remove_reader(self._listener.fileno())
        self._resume = self._loop.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._listener is not None and self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _expire(self) -> None:
        """Close what has been open longer than the timeout (408 if it never asked)."""
        assert self._loop is not None
        deadline = time.monotonic() - self.limits.timeout
        while self.open:
            conn = next(iter(self.open.values()))
            if conn.accepted > deadline:
                break
            self.timed_out += 1
            if conn.reading and not conn.linger:
                self._send_once(conn, encode((408, TEXT, b"request timeout\n"))[0])
            self._close(conn)
        self._sweep = self._loop.call_later(SWEEP_EVERY, self._expire)

    # -- one connection ---------------------------------------------------------------

    def _read(self, conn: _Connection) -> None:
        assert self._loop is not None
        try:
            data = conn.sock.recv(MAX_HEADER + 4 - len(conn.request))
        except (BlockingIOError, InterruptedError):
            if not conn.reading:
                conn.reading = True
                self._loop.add_reader(conn.fd, self._read, conn)
            return
        except OSError:
            self._close(conn)
            return
        if not data:  # gone before asking
            self._close(conn)
            return
        conn.request += data
        end = conn.request.find(b"\r\n\r\n")
        if end < 0 and len(conn.request) <= MAX_HEADER:
            if not conn.reading:
                conn.reading = True
                self._loop.add_reader(conn.fd, self._read, conn)
            return
        if conn.reading:
            conn.reading = False
            self._loop.remove_reader(conn.fd)
        if end < 0:
            self._bad_request(conn)
        else:
            self._answer(conn, bytes(conn.request[:end]))

    def _answer(self, conn: _Connection, head: bytes) -> None:
        words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            self._bad_request(conn)
            return
        method, target = words[0], words[1]
        path = target.split("?", 1)[0]
        route = self.routes.get(path)
        if route is None:
            known = ", ".join(sorted(self.routes))
            self._send_page(conn, "", (404, TEXT, f"not found; try {known}\n".encode()), False)
        elif method not in ("GET", "HEAD"):
            self._send_page(conn, "", (405, TEXT, b"only GET and HEAD\n"), False)
        elif (page := route.current()) is not None:
            self._send_page(conn, path, page, method == "HEAD")
        else:
            made = route.refresh()
            made.add_done_callback(partial(self._made, conn, path, method == "HEAD"))

    def _made(
        self, conn: _Connection, path: str, head_only: bool, made: asyncio.Future[Page]
    ) -> None:
        if conn.closed:
            return
        if made.cancelled():  # the server is stopping
            self._close(conn)
            return
        self._send_page(conn, path, made.result(), head_only)

    def _bad_request(self, conn: _Connection) -> None:
        """400, then the rest of what the client sends is read and dropped: closing with
        unread data would reset the connection before the client read the answer."""
        conn.linger = True
        self._send_page(conn, "", (400, TEXT, b"bad request\n"), False)

    def _send_page(self, conn: _Connection, path: str, page: Page, head_only: bool) -> None:
        """Send ``page``; the encoding of a route's page is kept while the page is the same."""
        cached = self._encoded.get(path) if path else None
        if cached is not None and cached[0] is page:
            data, head = cached[1], cached[2]
        else:
            data, head = encode(page)
            if path:
                self._encoded[path] = (page, data, head)
        self.served += 1
        self._send(conn, memoryview(data)[:head] if head_only else memoryview(data))

    def _send(self, conn: _Connection, data: memoryview) -> None:
        assert self._loop is not None
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent == len(data):
            self._sent(conn)
            return
        conn.out = data[sent:]
        if not conn.writing:
            conn.writing = True
            self._loop.add_writer(conn.fd, self._write, conn)

    def _sent(self, conn: _Connection) -> None:
        if not conn.linger:
            self._close(conn)
            return
        assert self._loop is not None
        if conn.writing:
            conn.writing = False
            self._loop.remove_writer(conn.fd)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.reading = True
        self._loop.add_reader(conn.fd, self._discard, conn)

    def _discard(self, conn: _Connection) -> None:
        """Read and drop until the client closes (or the timeout closes it); a few reads
        per wake-up, so a client that keeps sending does not hold the loop."""
        try:
            for _ in range(4):
                if not conn.sock.recv(65536):
                    break
            else:
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(conn)

    def _write(self, conn: _Connection) -> None:
        assert conn.out is not None
        out, conn.out = conn.out, None
        self._send(conn, out)

    def _send_once(self, conn: _Connection, data: bytes) -> None:
        """What fits, without waiting (a last word before closing)."""
        try:
            conn.sock.send(data)
        except OSError:
            pass

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        assert self._loop is not None
        if conn.reading:
            self._loop.remove_reader(conn.fd)
        if conn.writing:
            self._loop.remove_writer(conn.fd)
        del self.open[conn.fd]
        conn.sock.close()


async def serve(
    host: str, port: int, routes: dict[str, Route], limits: Limits | None = None
) -> HealthServer:
    """A HealthServer listening on ``host:port`` (an OSError if it cannot)."""
    server = HealthServer(routes, limits)
    server.start(host, port)
    return server
