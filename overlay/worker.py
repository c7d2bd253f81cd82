"""`overlay run --workers N`: forwarding processes, one per queue of a multi-queue TUN.

The main process keeps the control plane (registry, lease, watch, status) and forwards
queue 0 itself. For queues 1..N-1 it attaches another TUN queue, opens another UDP socket
on the same address with SO_REUSEPORT, and starts ``python -m overlay.worker`` with both
fds and one end of a socketpair (exec, never fork: the daemon has gRPC threads running).
Each worker runs the backend's own dataplane class on its own uvloop.

The socketpair carries JSON lines. Main -> worker: the spec (what the dataplane needs),
then the full peer table, then every change (``{"add": [[key, value, create_revision]],
"remove": [key]}``, leases in the registry's own key/value form, parsed with
``control.lease``, and their age, which orders a public IP's leases). Worker -> main:
a report (counters, features, per-peer traffic) when forwarding starts and every second
after. ``overlay trace`` adds ``{"trace": {"id": N, ...request}}`` and
``{"trace_stop": N}`` (main -> worker) and ``{"capture": [N, ...]}`` (worker -> main: one
packet the worker's tracer kept, merged into the client's stream).
A worker exits on EOF, so a killed main leaves no orphan; the main process warns once
when a worker dies and does not restart it: its TUN queue and socket close with it, so
the kernel steers its share of the traffic to the queues that are left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import uvloop

from control.lease import Lease, parse_lease, parse_subnet_key
from control.peer_table import PeerTable
from overlay import log as overlay_log
from overlay.counters import Counters
from overlay.trace import Capture, Endpoint, TapSet, Tracer, TraceRequest

REPORT_INTERVAL = 1.0
START_TIMEOUT = 15.0  # a worker imports the dataplane modules, ~0.5 s on a quiet machine
STOP_TIMEOUT = 2.0
LINE_LIMIT = 64 * 1024 * 1024  # one peer message may carry a large cluster's table
REPORT_BACKLOG = 1024 * 1024  # a main process that stopped reading gets no more reports


class WorkerError(OSError):
    """A worker could not be started; the message says which and why."""


def lease_message(added: list[Lease], removed: list[Lease]) -> bytes:
    """One peer-table change as a JSON line, leases as the registry stores them."""
    message = {
        "add": [[lease.key, lease.value_json(), lease.create_revision] for lease in added],
        "remove": [lease.key for lease in removed],
    }
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def apply_message(peers: PeerTable, message: dict[str, Any]) -> None:
    """Apply a ``lease_message`` to a worker's copy of the peer table."""
    for key in message.get("remove", []):
        peers.remove(parse_subnet_key(key)[0])
    for key, value, *age in message.get("add", []):  # age: the create revision
        peers.upsert(parse_lease(key, value, create_revision=int(age[0]) if age else 0))


# -- the main process's side -----------------------------------------------------------


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
        spec: dict[str, Any],
        peers: list[Lease],
    ) -> None:
        """Start workers 1..count, each with the full peer table; return when all forward.
        On failure the caller's ``stop()`` reaps whatever was started."""
        for index in range(1, count + 1):
            self.workers.append(await self._spawn(index, open_queue, open_socket, spec, peers))
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
        open_socket: Callable[[], socket.socket],
        spec: dict[str, Any],
        peers: list[Lease],
    ) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        tun_fd: int | None = None
        sock: socket.socket | None = None
        try:
            tun_fd = open_queue()
            sock = open_socket()
            fds = (theirs.fileno(), tun_fd, sock.fileno())
            argv = [sys.executable, "-m", "overlay.worker", "--index", str(index)]
            argv += ["--control-fd", str(fds[0]), "--tun-fd", str(fds[1])]
            argv += ["--socket-fd", str(fds[2])]
            proc = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            # The worker holds its own copies now: when it dies, its queue and socket
            # close and the kernel stops steering traffic to them.
            theirs.close()
            if tun_fd is not None:
                os.close(tun_fd)
            if sock is not None:
                sock.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT)
        worker = Worker(index, proc, reader, writer, asyncio.get_running_loop().create_future())
        writer.write(json.dumps({**spec, "index": index}).encode() + b"\n")
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

    def _captured(self, value: list[Any]) -> None:
        emit = self._traces.get(value[0])
        if emit is not None:
            emit(Capture.from_json(value[1:]))

    def start_trace(
        self, handle: int, request: TraceRequest, emit: Callable[[Capture], None]
    ) -> None:
        """Every worker traces its queue for ``request`` and sends what it keeps to ``emit``."""
        self._traces[handle] = emit
        self._send({"trace": {"id": handle, **request._asdict()}})

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
        per-peer traffic)."""
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
                "arp_replies": w.report.get("arp_replies", 0),
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


# -- the worker's side -----------------------------------------------------------------


def peer_report(peers: PeerTable) -> dict[str, list[float]]:
    """Per-peer traffic of this process, by subnet (peers that saw some only):
    [tx packets, tx bytes, rx packets, rx bytes, last tx, last rx (time.monotonic())]."""
    report = {}
    for peer in peers.peers():
        s = peer.stats
        if s.last_tx or s.last_rx:
            row = [s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes, s.last_tx, s.last_rx]
            report[str(peer.lease.subnet)] = row
    return report


def _report(writer: asyncio.StreamWriter, dataplane: Any) -> None:
    if writer.is_closing() or writer.transport.get_write_buffer_size() > REPORT_BACKLOG:
        return
    dataplane.counters.settle()  # the native drains' counts, PeerStats included, first
    report = {
        "counters": dataplane.counters.snapshot(),
        "features": dataplane.features(),
        "arp_replies": getattr(dataplane, "arp_replies", 0),
        "peers": peer_report(dataplane.peers),
    }
    writer.write(json.dumps(report, separators=(",", ":")).encode() + b"\n")


async def _reporting(writer: asyncio.StreamWriter, dataplane: Any) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL)
        _report(writer, dataplane)


class _WorkerTraces:
    """A worker's end of ``overlay trace``: its tracers, whose captures go to the main
    process (missed, not queued, while it lags more than REPORT_BACKLOG behind)."""

    def __init__(self, writer: asyncio.StreamWriter, dataplane: Any) -> None:
        self.writer = writer
        self.dataplane = dataplane
        self.taps = TapSet(dataplane)
        address = dataplane.sock.getsockname()
        self.endpoint = Endpoint(address[0], address[1], dataplane.headroom)
        self.tracers: dict[int, Tracer] = {}

    def start(self, message: dict[str, Any]) -> None:
        handle = message.pop("id")
        writer = self.writer

        def emit(capture: Capture) -> None:
            if writer.is_closing() or writer.transport.get_write_buffer_size() > REPORT_BACKLOG:
                return
            line = json.dumps({"capture": [handle, *capture.to_json()]}, separators=(",", ":"))
            writer.write(line.encode() + b"\n")

        tracer = Tracer(TraceRequest.parse(message), emit, self.endpoint, self.dataplane.peers)
        self.tracers[handle] = tracer
        self.taps.add(tracer)

    def stop(self, handle: int) -> None:
        tracer = self.tracers.pop(handle, None)
        if tracer is not None:
            self.taps.remove(tracer)

    def stop_all(self) -> None:
        for handle in list(self.tracers):
            self.stop(handle)


async def serve(args: argparse.Namespace) -> int:
    from overlay.backends.userspace import worker_dataplane  # the heavy imports, here
    from tun.device import TunDevice

    control = socket.socket(fileno=args.control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=control, limit=LINE_LIMIT)
    first = await reader.readline()
    if not first:
        return 0  # the main process went away before telling us anything
    spec = json.loads(first)
    overlay_log.configure(spec.get("log_format", "console"), spec.get("v", 0))
    log = structlog.get_logger().bind(node=spec.get("node"), worker=args.index)
    tun = TunDevice.adopt_queue(
        args.tun_fd,
        spec["tun"],
        vnet_hdr=spec["vnet_hdr"],
        offload_features=spec["offload_features"],
    )
    sock = socket.socket(fileno=args.socket_fd)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        dataplane, peers = worker_dataplane(spec, tun, sock, Counters())
        apply_message(peers, json.loads(await reader.readline() or b"{}"))
        dataplane.start(loop)
    except Exception as e:
        log.error("worker_failed", error=str(e) or type(e).__name__)
        sock.close()
        tun.close()
        return 1
    _report(writer, dataplane)  # "forwarding": the main process waits for this
    reporting = asyncio.create_task(_reporting(writer, dataplane))
    tracing = _WorkerTraces(writer, dataplane)
    try:
        while line := await reader.readline():
            message = json.loads(line)
            if "trace" in message:
                tracing.start(message["trace"])
            elif "trace_stop" in message:
                tracing.stop(message["trace_stop"])
            else:
                apply_message(peers, message)
    except ConnectionResetError:
        pass  # the main process closed with our reports unread: the same as EOF
    finally:
        reporting.cancel()
        tracing.stop_all()
        dataplane.stop(loop)
        sock.close()
        tun.close()
        writer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="overlay.worker", description="One forwarding process of `overlay run --workers`."
    )
    for name in ("--index", "--control-fd", "--tun-fd", "--socket-fd"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group; the main process decides when we stop
    # (EOF on the control socket), so it never sees us die first and warns for nothing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return uvloop.run(serve(args))
    except (OSError, ValueError, KeyError) as e:
        return overlay_log.fatal(f"overlay worker {args.index}", str(e))


if __name__ == "__main__":
    sys.exit(main())
