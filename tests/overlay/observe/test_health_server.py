"""overlay.observe.health_server on real sockets (127.0.0.1) and uvloop, as the daemon
runs it, with a real HTTP client (urllib, http.client) in threads: the answers, a page
made once for a burst of scrapes, and the bounds a hostile client meets (connections
held open, partial requests, no file descriptors left)."""

from __future__ import annotations

import asyncio
import errno
import http.client
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from overlay.observe.health_server import (
    MAX_HEADER,
    TEXT,
    Cached,
    HealthServer,
    Immediate,
    Limits,
    Page,
)
from tests.helpers.paths import ROOT

HEALTHY: Page = (200, TEXT, b"overlay is running\n")


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return uvloop.run(scenario())


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection, as a scraper makes it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` as is and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def started(routes: dict[str, Any], limits: Limits | None = None) -> HealthServer:
    server = HealthServer(routes, limits)
    server.start("127.0.0.1", 0)
    return server


def test_pages_methods_and_bad_requests() -> None:
    async def scenario() -> None:
        server = await started({"/healthz": Immediate(lambda: HEALTHY)})
        port = server.address()[1]
        try:
            status, headers, body = await asyncio.to_thread(get, port, "/healthz?verbose=1")
            assert (status, body) == (200, b"overlay is running\n")
            assert headers["Connection"] == "close" and headers["Content-Length"] == "19"
            status, headers, body = await asyncio.to_thread(get, port, "/healthz", "HEAD")
            assert (status, headers["Content-Length"], body) == (200, "19", b"")
            status, _, body = await asyncio.to_thread(get, port, "/nothing")
            assert status == 404 and b"/healthz" in body
            assert (await asyncio.to_thread(get, port, "/healthz", "POST"))[0] == 405
            answer = await asyncio.to_thread(raw, port, b"NONSENSE\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ")
            huge = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * MAX_HEADER + b"\r\n\r\n"
            answer = await asyncio.to_thread(raw, port, huge)
            assert answer.startswith(b"HTTP/1.1 400 ")
            assert not server.open
        finally:
            server.close()

    run(scenario)


def test_a_burst_of_scrapes_makes_the_page_once_and_a_later_one_again() -> None:
    made: list[float] = []

    async def make() -> Page:
        made.append(time.monotonic())
        await asyncio.sleep(0.005)  # as a snapshot that reads the kernel would
        return 200, TEXT, f"page {len(made)}\n".encode()

    async def scenario() -> None:
        metrics = Cached(make, min_age=0.3)
        server = await started({"/metrics": metrics})
        port = server.address()[1]
        try:
            burst = await asyncio.gather(
                *(asyncio.to_thread(get, port, "/metrics") for _ in range(40))
            )
            assert {(status, body) for status, _, body in burst} == {(200, b"page 1\n")}
            assert len(made) == 1
            await asyncio.sleep(0.35)
            assert (await asyncio.to_thread(get, port, "/metrics"))[2] == b"page 2\n"
        finally:
            server.close()

    run(scenario)


def test_the_page_age_grows_with_what_making_it_costs() -> None:
    async def slow() -> Page:
        await asyncio.sleep(0.1)
        return HEALTHY

    async def scenario() -> None:
        metrics = Cached(slow, min_age=0.25, share=0.05)
        assert metrics.current() is None
        await metrics.refresh()
        assert metrics.max_age() == 0.25  # the first making pays one-time costs
        await metrics.refresh()
        # 0.1 s to make: made again at most every 2 s, so making it takes <= 5% of the loop
        assert metrics.max_age() >= 1.9 and metrics.current() == HEALTHY

    run(scenario)


def test_a_slow_first_page_does_not_hold_back_the_next() -> None:
    """The daemon imports prometheus_client at the first scrape (hundreds of ms on a busy
    machine): that must not make the next scrape, a second later, get the first page."""
    made: list[int] = []

    async def make() -> Page:
        made.append(1)
        await asyncio.sleep(0.3 if len(made) == 1 else 0.001)
        return 200, TEXT, f"page {len(made)}\n".encode()

    async def scenario() -> None:
        metrics = Cached(make, min_age=0.05, share=0.05)
        await metrics.refresh()
        await asyncio.sleep(0.1)
        assert metrics.current() is None  # too old: the next scrape makes page 2
        assert (await metrics.refresh())[2] == b"page 2\n"

    run(scenario)


def test_a_page_that_fails_is_a_500_and_the_server_goes_on() -> None:
    async def broken() -> Page:
        raise RuntimeError("no snapshot")

    async def scenario() -> None:
        server = await started(
            {"/metrics": Cached(broken, min_age=0.25), "/healthz": Immediate(lambda: HEALTHY)}
        )
        port = server.address()[1]
        try:
            status, _, body = await asyncio.to_thread(get, port, "/metrics")
            assert status == 500 and b"RuntimeError: no snapshot" in body
            assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200
        finally:
            server.close()

    run(scenario)


def test_held_connections_are_bounded_and_timed_out_with_408() -> None:
    limits = Limits(max_connections=8, timeout=1.0)

    def hold(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # never finished
        return sock

    async def scenario() -> None:
        server = await started({"/healthz": Immediate(lambda: HEALTHY)}, limits)
        port = server.address()[1]
        held = [await asyncio.to_thread(hold, port) for _ in range(20)]
        try:
            await asyncio.sleep(0.2)
            assert len(server.open) == 8 and server.evicted == 12
            started_at = time.monotonic()
            assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200
            assert time.monotonic() - started_at < 0.5
            await asyncio.sleep(2.2)  # past the timeout and the next sweep
            assert not server.open and server.timed_out >= 7
            last = await asyncio.to_thread(held[-1].recv, 4096)
            assert last.startswith(b"HTTP/1.1 408 ")
        finally:
            for sock in held:
                sock.close()
            server.close()

    run(scenario)


def test_the_accept_budget_holds_the_rest_in_the_backlog() -> None:
    limits = Limits(accepts_per_second=50)

    async def scenario() -> None:
        server = await started({"/healthz": Immediate(lambda: HEALTHY)}, limits)
        port = server.address()[1]
        try:
            begin = time.monotonic()
            answers = await asyncio.gather(
                *(asyncio.to_thread(get, port, "/healthz") for _ in range(30))
            )
            took = time.monotonic() - begin
            assert all(status == 200 for status, _, _ in answers)
            # 5 per 0.1 s window: 30 need at least 5 windows, and none is lost
            assert took >= 0.4 and server.accept_pauses >= 5, (took, server.accept_pauses)
        finally:
            server.close()

    run(scenario)


OUT_OF_FDS = textwrap.dedent(
    """
    import asyncio, os, resource, sys, uvloop
    from overlay.observe.health_server import HealthServer, Immediate, TEXT

    async def main():
        server = HealthServer({"/healthz": Immediate(lambda: (200, TEXT, b"ok\\n"))})
        server.start("127.0.0.1", 0)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # room for two connections, then EMFILE
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 1, hard))
        print(server.address()[1], flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the test has measured us
        print(server.accept_errors, server.accept_pauses, flush=True)
        server.close()

    uvloop.run(main())
    """
)


def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning() -> None:
    """A hostile environment for real: the server's process at its RLIMIT_NOFILE with
    connections waiting. The listener stays readable, so accepting must rest, not spin;
    once fds are free again, requests are answered."""
    proc = subprocess.Popen(
        [sys.executable, "-c", OUT_OF_FDS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port = int(proc.stdout.readline())
        time.sleep(0.2)
        held = []
        for _ in range(6):  # 2 fit the limit (held open), the rest wait in the backlog
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            held.append(sock)
        cpu_before = _cpu_seconds(proc.pid)
        time.sleep(2.0)
        busy = _cpu_seconds(proc.pid) - cpu_before
        assert busy < 0.5, f"{busy:.2f} s of CPU in 2 s while out of fds: spinning"
        proc.stdin.write("\n")
        proc.stdin.flush()
        errors, paused = map(int, proc.stdout.readline().split())
        assert errors >= 1 and paused >= 1
        for sock in held:
            sock.close()
    finally:
        proc.kill()
        proc.wait()


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_no_file_descriptor_outlives_its_connection() -> None:
    async def scenario() -> None:
        server = await started({"/healthz": Immediate(lambda: HEALTHY)})
        port = server.address()[1]
        try:
            fds = len(os.listdir("/proc/self/fd"))
            for _ in range(200):
                await asyncio.to_thread(get, port, "/healthz")
            await asyncio.sleep(0.1)
            assert len(os.listdir("/proc/self/fd")) <= fds + 1  # to_thread's pool may hold one
            assert not server.open and server.served == 200
        finally:
            server.close()

    run(scenario)


def test_a_port_in_use_is_an_os_error() -> None:
    async def scenario() -> None:
        taken = await started({})
        try:
            with pytest.raises(OSError) as raised:
                HealthServer({}).start("127.0.0.1", taken.address()[1])
            assert raised.value.errno == errno.EADDRINUSE
        finally:
            taken.close()

    run(scenario)
