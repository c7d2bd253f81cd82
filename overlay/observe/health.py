"""Health and metrics over HTTP, as flanneld's ``--healthz-ip``/``--healthz-port`` serve them.

- ``/healthz``: 200 while the process runs (flanneld answers "flanneld is running").
- ``/readyz``: 503 until the lease is held, the datapath (TUN or kernel device, routes) is
  up and subnet.env is written; 200 after; 503 again while the registry has been
  unreachable for longer than ``--registry-timeout`` (the time a starting daemon waits
  for it before giving up). flanneld has no /readyz; a probe of it is ours.
- ``/metrics``: Prometheus text exposition (``overlay.observe.metrics``).

A small HTTP/1.1 server on the daemon's own event loop, not prometheus-client's
threaded one: a thread would take the GIL from the drain loops at every scrape, while
on the loop a scrape is one callback between two drains (a few hundred microseconds for
a few peers, measured in the README). One request per connection (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

READ_TIMEOUT = 5.0  # a client that sends no complete request in this long is dropped
MAX_HEADER = 16 * 1024
STEPS = ("lease", "datapath", "subnet_env")


class RegistryState:
    """Whether the registry answers, as the daemon sees it: a watch or renewal failure
    marks it unreachable (from the first failure on), anything that came back from it
    marks it reachable again. Counts what the watch delivered."""

    def __init__(self) -> None:
        self.down_since: float | None = None  # time.monotonic() of the first failure
        self.connected_once = False
        self.failures = 0
        self.watch_events = 0
        self.resyncs = 0

    def failed(self) -> None:
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.monotonic()

    def answered(self) -> None:
        self.connected_once = True
        self.down_since = None

    @property
    def connected(self) -> bool:
        return self.connected_once and self.down_since is None

    def unreachable_for(self) -> float | None:
        return None if self.down_since is None else time.monotonic() - self.down_since


@dataclass
class Readiness:
    """What /readyz answers: every start-up step done, and the registry not gone for
    longer than ``registry_grace`` seconds."""

    registry_grace: float
    registry: RegistryState = field(default_factory=RegistryState)
    done: set[str] = field(default_factory=set)

    def step(self, name: str) -> None:
        assert name in STEPS, name
        self.done.add(name)

    def check(self) -> tuple[bool, str]:
        missing = [name for name in STEPS if name not in self.done]
        if missing:
            waiting = {"lease": "a lease", "datapath": "the datapath", "subnet_env": "subnet.env"}
            return False, "waiting for " + ", ".join(waiting[m] for m in missing)
        gone = self.registry.unreachable_for()
        if gone is not None and gone > self.registry_grace:
            return False, (
                f"registry unreachable for {gone:.0f} s (more than {self.registry_grace:g} s)"
            )
        return True, "ready"


Page = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[], Awaitable[Page]]
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
REASONS |= {408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable"}


def _response(status: int, content_type: str, body: bytes, head: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode() + (b"" if head else body)


TEXT = "text/plain; charset=utf-8"


async def serve(host: str, port: int, routes: dict[str, Route]) -> asyncio.AbstractServer:
    """Listen on ``host:port`` and answer GET/HEAD of ``routes``' paths."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError):
                writer.write(_response(400, TEXT, b"bad request\n", False))
                return
            except TimeoutError:
                writer.write(_response(408, TEXT, b"request timeout\n", False))
                return
            words = request.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(words) != 3 or not words[2].startswith("HTTP/"):
                writer.write(_response(400, TEXT, b"bad request\n", False))
                return
            method, target = words[0], words[1]
            path = target.split("?", 1)[0]
            route = routes.get(path)
            if route is None:
                known = ", ".join(sorted(routes))
                writer.write(_response(404, TEXT, f"not found; try {known}\n".encode(), False))
            elif method not in ("GET", "HEAD"):
                writer.write(_response(405, TEXT, b"only GET and HEAD\n", False))
            else:
                try:
                    status, content_type, body = await route()
                except Exception as e:  # noqa: BLE001 - a broken page must not end the server
                    status, content_type = 500, TEXT
                    body = f"internal error: {type(e).__name__}: {e}\n".encode()
                writer.write(_response(status, content_type, body, method == "HEAD"))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port, limit=MAX_HEADER, reuse_address=True)
