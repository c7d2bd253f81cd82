"""An HTTP GET flood at a fixed rate, one new TCP connection per request, as many
scrapers (and anyone on the underlay) do: the program that runs in a namespace
(``python -m overlay.lab.http_flood URL --rate R --seconds S``) and ``flooding``, which
runs it for as long as a block runs. Also a prober: ``--rate 10 --path /healthz`` is a
liveness probe that records each answer's latency, and ``--partial`` holds connections
open (a request that never ends, as slowloris sends).

Open loop: a request starts when it is due, whether or not the earlier ones were
answered (at most ``--in-flight`` at once; one that finds the cap reached is counted
``skipped``), so a slow server meets the offered rate, not a politer one. One process,
non-blocking sockets on epoll: cheap enough that the flood costs the machine little
beyond what the server spends on it. Prints one JSON line at the end (``FloodReport``).
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_WAIT = 0.05  # seconds between two looks at the schedule and the timeouts, at most


@dataclass
class FloodReport:
    """What the flood saw; latencies in milliseconds, of the answered requests."""

    started: int = 0
    answered: int = 0  # a complete response with status 200
    failed: dict[str, int] = field(default_factory=dict)  # by kind: refused, reset, timeout, ...
    skipped: int = 0  # due while --in-flight requests were open
    seconds: float = 0.0
    cpu_s: float = 0.0  # this program's own CPU time (user + system)
    latencies_ms: list[float] = field(default_factory=list)

    def fail(self, kind: str) -> None:
        self.failed[kind] = self.failed.get(kind, 0) + 1

    def percentile(self, pct: float) -> float:
        """The ``pct`` percentile of the answered requests' latency (nearest rank)."""
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]

    def add(self, other: FloodReport) -> None:
        """Count ``other`` (another run's report) in this one."""
        self.started += other.started
        self.answered += other.answered
        for kind, n in other.failed.items():
            self.failed[kind] = self.failed.get(kind, 0) + n
        self.skipped += other.skipped
        self.seconds += other.seconds
        self.cpu_s += other.cpu_s
        self.latencies_ms += other.latencies_ms

    def summary(self) -> dict[str, Any]:
        """Everything but the latencies, which are summarised."""
        out = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        for pct in (50, 99, 100):
            out[f"p{pct}_ms"] = round(self.percentile(pct), 2)
        return out


class _Request:
    __slots__ = ("sock", "started", "asked", "response")

    def __init__(self, sock: socket.socket, started: float) -> None:
        self.sock = sock
        self.started = started
        self.asked = False
        self.response = b""


class Flood:
    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        rate: float,
        in_flight: int,
        timeout: float,
        partial: bool = False,
    ) -> None:
        self.address = (host, port)
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
        if not partial:  # else the request never ends: each connection is held open
            self.request += b"\r\n"
        self.rate = rate
        self.in_flight = in_flight
        self.timeout = timeout
        self.epoll = select.epoll()
        self.open: dict[int, _Request] = {}  # by fd, oldest first
        self.report = FloodReport()

    def _start(self, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.report.started += 1
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            self.report.fail(errno.errorcode.get(code, str(code)))
            sock.close()
            return
        fd = sock.fileno()
        self.open[fd] = _Request(sock, now)
        self.epoll.register(fd, select.EPOLLOUT)

    def _finish(self, fd: int, failure: str | None, now: float) -> None:
        req = self.open.pop(fd)
        req.sock.close()  # also takes it out of the epoll set
        if failure is not None:
            self.report.fail(failure)
        elif not req.response:
            self.report.fail("closed unanswered")
        elif not req.response.startswith(b"HTTP/1.") or req.response[9:13] != b"200 ":
            self.report.fail(f"status {req.response[9:12].decode('latin-1') or 'none'}")
        else:
            self.report.answered += 1
            self.report.latencies_ms.append((now - req.started) * 1000)

    def _ready(self, fd: int, events: int, now: float) -> None:
        req = self.open[fd]
        try:
            if not req.asked and events & select.EPOLLOUT:
                req.sock.send(self.request)  # a few dozen bytes: one send on a new socket
                req.asked = True
                self.epoll.modify(fd, select.EPOLLIN)
                return
            while data := req.sock.recv(1 << 16):
                req.response += data
        except BlockingIOError:
            return
        except OSError as e:
            self._finish(fd, errno.errorcode.get(e.errno or 0, type(e).__name__), now)
            return
        self._finish(fd, None, now)  # the server closed: the whole answer is in

    def _expire(self, now: float) -> None:
        for fd in [fd for fd, r in self.open.items() if now - r.started > self.timeout]:
            self._finish(fd, "timeout", now)

    def run(self, seconds: float) -> FloodReport:
        """Offer ``rate`` requests/s for ``seconds``, then wait for the open ones."""
        begin = time.monotonic()
        end = begin + seconds
        last_expiry = begin
        stop = False

        def on_term(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        while not stop:
            now = time.monotonic()
            wait = MAX_WAIT
            if now < end:
                scheduled = self.report.started + self.report.skipped
                for _ in range(int((now - begin) * self.rate) + 1 - scheduled):
                    if len(self.open) >= self.in_flight:
                        self.report.skipped += 1
                    else:
                        self._start(now)
                scheduled = self.report.started + self.report.skipped
                wait = min(wait, max(begin + scheduled / self.rate - now, 0.0))
            elif not self.open:
                break
            try:
                ready = self.epoll.poll(wait)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd, events in ready:
                self._ready(fd, events, now)
            if now - last_expiry > 0.1:
                self._expire(now)
                last_expiry = now
        for fd in list(self.open):
            self._finish(fd, "unfinished", time.monotonic())
        self.report.seconds = round(time.monotonic() - begin, 3)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.report.cpu_s = round(usage.ru_utime + usage.ru_stime, 3)
        return self.report


def command(url: str, rate: float, seconds: float, **options: Any) -> list[str]:
    """The argv of this program (``options``: in_flight, timeout, partial)."""
    argv = [sys.executable, "-m", "overlay.lab.http_flood", url]
    argv += ["--rate", str(rate), "--seconds", str(seconds)]
    for name, value in options.items():
        flag = f"--{name.replace('_', '-')}"
        argv += ([flag] if value else []) if isinstance(value, bool) else [flag, str(value)]
    return argv


def parse_report(stdout: str) -> FloodReport:
    """The report the program printed as its last line."""
    fields = json.loads(stdout.strip().splitlines()[-1])
    return FloodReport(**fields)


@contextmanager
def flooding(
    bed: Any, where: str, url: str, rate: float, seconds: float, **options: Any
) -> Iterator[list[FloodReport]]:
    """This program in the namespace ``where`` (a bed node/pod name, or a netns run through
    ``ip netns exec`` when ``bed`` is None) for as long as the block runs (at most
    ``seconds``); the list holds its report once the block ends."""
    argv = command(url, rate, seconds, **options)
    if bed is None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", where, *argv], stdout=subprocess.PIPE, text=True
        )
    else:
        proc = bed.popen(where, argv, stdout=subprocess.PIPE, text=True)
    reports: list[FloodReport] = []
    try:
        yield reports
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=float(options.get("timeout", 5)) + 15)
        if out.strip():
            reports.append(parse_report(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m overlay.lab.http_flood", description=__doc__)
    p.add_argument("url", help="http://HOST:PORT/PATH")
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--in-flight", type=int, default=2000, help="open requests at most")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds a request may take")
    p.add_argument(
        "--partial",
        action="store_true",
        help="never finish a request (hold each connection open, as slowloris does)",
    )
    args = p.parse_args(argv)
    url = urlsplit(args.url)
    if url.scheme != "http" or not url.hostname or not url.port:
        p.error(f"{args.url!r} is not http://HOST:PORT/PATH")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # --in-flight sockets at once
    flood = Flood(
        url.hostname,
        url.port,
        url.path or "/",
        args.rate,
        args.in_flight,
        args.timeout,
        args.partial,
    )
    report = flood.run(args.seconds)
    print(json.dumps(asdict(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
