"""`overlay run --workers N`, the main process's side: it starts and watches the
forwarding processes of queues 1..N-1 (``overlay.dataplane.worker``; the protocol is
``overlay.dataplane.worker_protocol``).

The main process keeps the control plane (registry, lease, watch, status) and forwards
queue 0 itself. For each other queue it attaches another TUN queue, opens another UDP
socket on the same address with SO_REUSEPORT (and, for userspace vxlan's IPv6 half, one
on our IPv6 underlay address), and starts ``python -m
overlay.dataplane.worker`` with both fds and one end of a socketpair (exec, never fork:
the daemon has gRPC threads running). A worker exits on EOF, so a killed main leaves no
orphan; the main process warns once when a worker dies and does not restart it: its TUN
queue and socket close with it, so the kernel steers its share of the traffic to the
queues that are left.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from control.lease import Lease
from overlay.dataplane.counters import Counters
from overlay.dataplane.worker_protocol import LINE_LIMIT, WorkerSpec, lease_message
from overlay.impair.rules import Rules

if TYPE_CHECKING:
    from overlay.observe.trace import Capture, TraceRequest

START_TIMEOUT = 15.0  # a worker imports the dataplane modules, ~0.5 s on a quiet machine
STOP_TIMEOUT = 2.0


class WorkerError(OSError):
    """A worker could not be started; the message says which and why."""


@dataclass(frozen=True)
class _Sockets:
    """How a worker's sockets are opened: the backend's, and vxlan's IPv6 half's."""

    open4: Callable[[], socket.socket]
    open6: Callable[[], socket.socket] | None

    def open(self) -> list[socket.socket]:
        """Both (the IPv4 one first); the first is closed if the second cannot open."""
        first = self.open4()
        if self.open6 is None:
            return [first]
        try:
            return [first, self.open6()]
        except BaseException:
            first.close()
            raise


def worker_fd_args(fds: tuple[int, ...]) -> list[str]:
    """The worker's fd flags for (control, TUN queue, socket[, IPv6 socket])."""
    names = ("--control-fd", "--tun-fd", "--socket-fd", "--socket6-fd")
    return [arg for name, fd in zip(names, fds, strict=False) for arg in (name, str(fd))]


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    ready: asyncio.Future[None]
    report: dict[str, Any] = field(default_factory=dict)
    reported: float = 0.0  # time.monotonic() of the last report
    exit_code: int | None = None
    monitor: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.exit_code is None


class Workers:
    """The worker processes of queues 1..N-1, as the main process sees them."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.workers: list[Worker] = []
        self._stopping = False
        self._traces: dict[int, Callable[[Capture], None]] = {}  # trace id -> its emit

    async def start(
        self,
        count: int,
        open_queue: Callable[[], int],
        open_socket: Callable[[], socket.socket],
        spec: WorkerSpec,
        peers: list[Lease],
        open_socket6: Callable[[], socket.socket] | None = None,
    ) -> None:
        """Start workers 1..count, each with the full peer table; return when all forward.
        ``open_socket6``: vxlan's IPv6 half's socket (EnableIPv6), one more per worker.
        On failure the caller's ``stop()`` reaps whatever was started."""
        sockets = _Sockets(open_socket, open_socket6)
        for index in range(1, count + 1):
            self.workers.append(await self._spawn(index, open_queue, sockets, spec, peers))
        pending = [w.ready for w in self.workers]
        done, _ = await asyncio.wait(pending, timeout=START_TIMEOUT)
        for worker in self.workers:
            if worker.ready not in done:
                raise WorkerError(
                    0,
                    f"worker {worker.index} (pid {worker.proc.pid}) did not start forwarding "
                    f"within {START_TIMEOUT:g} s",
                )
            if (error := worker.ready.exception()) is not None:
                raise error
        self.log.info("workers_started", pids=[w.proc.pid for w in self.workers])

    async def _spawn(
        self,
        index: int,
        open_queue: Callable[[], int],
        sockets: _Sockets,
        spec: WorkerSpec,
        peers: list[Lease],
    ) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        tun_fd: int | None = None
        opened: list[socket.socket] = []
        try:
            tun_fd = open_queue()
            opened = sockets.open()
            fds = (theirs.fileno(), tun_fd, *(s.fileno() for s in opened))
            argv = [sys.executable, "-m", "overlay.dataplane.worker", "--index", str(index)]
            argv += worker_fd_args(fds)
            proc = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            # The worker holds its own copies now: when it dies, its queue and sockets
            # close and the kernel stops steering traffic to them.
            theirs.close()
            if tun_fd is not None:
                os.close(tun_fd)
            for sock in opened:
                sock.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT)
        worker = Worker(index, proc, reader, writer, asyncio.get_running_loop().create_future())
        writer.write(json.dumps(spec.to_json(index)).encode() + b"\n")
        writer.write(lease_message(peers, []))
        worker.monitor = asyncio.create_task(self._monitor(worker))
        return worker

    async def _monitor(self, worker: Worker) -> None:
        """Collect the worker's reports until EOF, then reap it (and say so if unexpected)."""
        try:
            while line := await worker.reader.readline():
                message = json.loads(line)
                if "capture" in message:
                    self._captured(message["capture"])
                    continue
                worker.report = message
                worker.reported = time.monotonic()
                if not worker.ready.done():
                    worker.ready.set_result(None)
        except ConnectionResetError:
            pass  # it died with our messages unread: the same as EOF
        except (OSError, ValueError) as e:  # a broken line or socket: treat it as dead
            self.log.warning("worker_protocol_error", worker=worker.index, error=str(e))
        worker.writer.close()
        try:
            code = await asyncio.to_thread(worker.proc.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:  # closed its socket but lives on: not ours to keep
            worker.proc.kill()
            code = await asyncio.to_thread(worker.proc.wait)
        worker.exit_code = code
        if not worker.ready.done():
            worker.ready.set_exception(
                WorkerError(
                    0,
                    f"worker {worker.index} (pid {worker.proc.pid}) exited with code {code} "
                    "while starting (its error is logged above)",
                )
            )
        elif not self._stopping:
            left = sum(w.alive for w in self.workers)
            self.log.warning(
                "worker_exited",
                worker=worker.index,
                pid=worker.proc.pid,
                code=code,
                forwarding_processes=left + 1,
                note="not restarted; its queue and socket are closed, the others carry on",
            )

    def peers_changed(self, added: list[Lease], removed: list[Lease]) -> None:
        message = lease_message(added, removed)
        for worker in self.workers:
            if worker.alive and not worker.writer.is_closing():
                worker.writer.write(message)

    def set_mtu(self, mtu: int) -> None:
        """The TUN's MTU changed: every worker's dataplane takes it (``set_mtu``)."""
        self._send({"mtu": mtu})

    def impair(self, rules: Rules) -> None:
        """Every worker impairs as ``rules`` say, from its next wake-up on."""
        self._send({"impair": rules.to_json()})

    def _captured(self, value: list[Any]) -> None:
        emit = self._traces.get(value[0])
        if emit is not None:
            from overlay.observe.trace import Capture  # loaded: start_trace's caller traces

            emit(Capture.from_json(value[1:]))

    def start_trace(
        self, handle: int, request: TraceRequest, emit: Callable[[Capture], None]
    ) -> None:
        """Every worker traces its queue for ``request`` and sends what it keeps to ``emit``."""
        self._traces[handle] = emit
        self._send({"trace": {"id": handle, **request.to_json()}})

    def stop_trace(self, handle: int) -> None:
        if self._traces.pop(handle, None) is not None:
            self._send({"trace_stop": handle})

    def _send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        for worker in self.workers:
            if worker.alive and not worker.writer.is_closing():
                worker.writer.write(line)

    def status(self) -> list[dict[str, Any]]:
        """Per worker: pid, whether it lives, and its last report (counters, features,
        the MTU its dataplane has, per-peer traffic)."""
        now = time.monotonic()
        return [
            {
                "index": w.index,
                "pid": w.proc.pid,
                "alive": w.alive,
                **({} if w.alive else {"exit_code": w.exit_code}),
                "report_age_s": round(now - w.reported, 1) if w.reported else None,
                "counters": w.report.get("counters", Counters().snapshot()),
                "features": w.report.get("features", {}),
                "mtu": w.report.get("mtu"),
                "arp_replies": w.report.get("arp_replies", 0),
                "ipv6": w.report.get("ipv6", {}),
                "peers": w.report.get("peers", {}),
            }
            for w in self.workers
        ]

    async def stop(self) -> None:
        """EOF to every worker (they exit on it), then SIGKILL whoever is still there."""
        self._stopping = True
        for worker in self.workers:
            worker.writer.close()
        monitors = [w.monitor for w in self.workers if w.monitor is not None]
        if not monitors:
            return
        _, late = await asyncio.wait(monitors, timeout=STOP_TIMEOUT + 1)
        if late:
            for worker in self.workers:
                if worker.proc.poll() is None:
                    worker.proc.kill()
            await asyncio.wait(late)
