"""One forwarding process of `overlay run --workers N` (``python -m
overlay.dataplane.worker``): it builds the main process's dataplane on the TUN queue and
socket it was handed, keeps its own copy of the peer table from the main process's
messages, reports its counters every second and traces when asked
(``overlay.dataplane.worker_protocol``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from typing import Any

import structlog
import uvloop

from overlay.dataplane.counters import Counters
from overlay.dataplane.spec import build_dataplane
from overlay.dataplane.udp import UdpDataplane
from overlay.dataplane.worker_protocol import (
    LINE_LIMIT,
    REPORT_BACKLOG,
    REPORT_INTERVAL,
    WorkerSpec,
    apply_message,
    peer_report,
)
from overlay.impair.rules import Rules
from overlay.observe import log as overlay_log
from overlay.observe.trace import Capture, Endpoint, TapSet, Tracer, TraceRequest
from tun.device import TunDevice


def _report(writer: asyncio.StreamWriter, dataplane: UdpDataplane) -> None:
    if writer.is_closing() or writer.transport.get_write_buffer_size() > REPORT_BACKLOG:
        return
    dataplane.counters.settle()  # the native drains' counts, PeerStats included, first
    report = {
        "counters": dataplane.counters.snapshot(),
        "features": dataplane.features(),
        "mtu": dataplane.mtu,
        "arp_replies": dataplane.arp_replies,
        "ipv6": dataplane.ipv6_status(),  # vxlan's IPv6 half: NDP replies, its offloads
        "peers": peer_report(dataplane.peers),
    }
    writer.write(json.dumps(report, separators=(",", ":")).encode() + b"\n")


async def _reporting(writer: asyncio.StreamWriter, dataplane: UdpDataplane) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL)
        _report(writer, dataplane)


class _WorkerTraces:
    """A worker's end of ``overlay trace``: its tracers, whose captures go to the main
    process (missed, not queued, while it lags more than REPORT_BACKLOG behind)."""

    def __init__(self, writer: asyncio.StreamWriter, dataplane: UdpDataplane) -> None:
        self.writer = writer
        self.dataplane = dataplane
        self.taps = TapSet(dataplane)
        self.endpoint = Endpoint.of(dataplane.sockets(), dataplane.headroom)
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


def _built(
    spec: WorkerSpec, tun: TunDevice, sock: socket.socket, sock6: socket.socket | None
) -> UdpDataplane:
    """The main process's dataplane on our queue and socket(s), with our own peer table
    (``sock6``: vxlan's IPv6 half's, with EnableIPv6)."""
    if spec.dataplane.subnet6 is not None and sock6 is None:
        raise RuntimeError("the spec has an IPv6 half but no IPv6 socket was handed over")
    peers = spec.dataplane.peer_table()
    dataplane = build_dataplane(spec.dataplane, tun, sock, peers, Counters(), sock6)
    if dataplane.features() != spec.features:
        # Offloads are probed per socket and queue; a worker that ended up with other
        # ones than the main process could mishandle what the shared device hands it.
        raise RuntimeError(
            f"worker dataplane features {dataplane.features()} differ from the main "
            f"process's {spec.features}"
        )
    return dataplane


async def serve(args: argparse.Namespace) -> int:
    control = socket.socket(fileno=args.control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=control, limit=LINE_LIMIT)
    first = await reader.readline()
    if not first:
        return 0  # the main process went away before telling us anything
    spec = WorkerSpec.from_json(json.loads(first))
    overlay_log.configure(spec.log.format, spec.log.verbosity)
    log = structlog.get_logger().bind(node=spec.node, worker=args.index)
    tun = TunDevice.adopt_queue(
        args.tun_fd, spec.tun, vnet_hdr=spec.vnet_hdr, offload_features=spec.offload_features
    )
    sock = socket.socket(fileno=args.socket_fd)
    sock.setblocking(False)
    sock6 = socket.socket(fileno=args.socket6_fd) if args.socket6_fd >= 0 else None
    if sock6 is not None:
        sock6.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        dataplane = _built(spec, tun, sock, sock6)
        apply_message(dataplane.peers, json.loads(await reader.readline() or b"{}"))
        dataplane.set_impairment(Rules.from_json(spec.impairment))
        dataplane.start(loop)
    except Exception as e:
        log.error("worker_failed", error=str(e) or type(e).__name__)
        for s in (sock, sock6):
            if s is not None:
                s.close()
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
            elif "mtu" in message:
                dataplane.set_mtu(int(message["mtu"]))
            elif "impair" in message:
                dataplane.set_impairment(Rules.from_json(message["impair"]))
            else:
                apply_message(dataplane.peers, message)
    except ConnectionResetError:
        pass  # the main process closed with our reports unread: the same as EOF
    finally:
        reporting.cancel()
        tracing.stop_all()
        dataplane.stop(loop)
        for s in dataplane.sockets():
            s.close()
        tun.close()
        writer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="overlay.dataplane.worker",
        description="One forwarding process of `overlay run --workers`.",
    )
    for name in ("--index", "--control-fd", "--tun-fd", "--socket-fd"):
        parser.add_argument(name, type=int, required=True)
    # vxlan's IPv6 half (EnableIPv6): its socket on our IPv6 underlay address, SO_REUSEPORT.
    parser.add_argument("--socket6-fd", type=int, default=-1)
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
