"""`overlay trace` on a node: the captures of its in-process datapath (the main process's
dataplane and its workers'), and the status-socket request that streams them.

The captures are made at the first trace (or the drop log's first sample), not as the
daemon starts: the trace modules (the filter compiler, the pcapng writer) are for a
daemon someone traces, not for every daemon (README, "Memory of a daemon").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from overlay.node.state import NodeState
from overlay.observe.drop_log import Start, Stop

if TYPE_CHECKING:
    from overlay.observe.trace import Capture, Captures, TraceRequest


def can_capture(node: NodeState) -> bool:
    """Whether the node's packets cross this process (a userspace datapath)."""
    backend = node.backend
    return backend is not None and backend.dataplane is not None and node.peers is not None


def captures_of(node: NodeState) -> Captures | None:
    """The node's captures, made at the first call; None if it has nothing to capture."""
    if node.captures is None and can_capture(node):
        from overlay.observe import trace  # here: see the module's docstring

        backend = node.backend
        assert backend is not None and backend.dataplane is not None and node.peers is not None
        dataplane = backend.dataplane
        endpoint = trace.Endpoint.of(dataplane.sockets(), dataplane.headroom)
        node.captures = trace.Captures(dataplane, endpoint, node.peers, backend.workers)
    return node.captures


def capture_hooks(node: NodeState) -> tuple[Start, Stop] | None:
    """(start, stop) of captures for the drop log, None when the node can capture nothing;
    the captures are made at the first start."""
    if not can_capture(node):
        return None

    def start(request: TraceRequest, emit: Callable[[Capture], None]) -> int:
        captures = captures_of(node)
        assert captures is not None
        return captures.start(request, emit)

    def stop(handle: Any) -> None:
        if node.captures is not None:
            node.captures.stop(handle)

    return start, stop


async def serve_trace(
    node: NodeState, argument: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One `overlay trace` client: stream pcapng until its count or its EOF."""
    captures, backend = captures_of(node), node.backend
    dataplane = backend.dataplane if backend is not None else None
    if captures is None or dataplane is None:
        link = backend.kernel_link() if backend is not None else None
        where = link.name if link is not None else node.underlay.iface
        writer.write(
            f"error: this node's packets cross the kernel's datapath, not this process "
            f"(trace them with tcpdump -i {where})\n".encode()
        )
        return
    from overlay.observe import trace  # loaded by captures_of already

    try:
        request = trace.TraceRequest.parse(json.loads(argument or "{}"))
    except ValueError as e:
        writer.write(f"error: {e}\n".encode())
        return
    stream = trace.PcapngStream(
        writer,
        request,
        dataplane.tun.name,
        trace.outer_name(node.underlay.iface, captures.endpoint.port),
    )
    handle = captures.start(request, stream.emit)
    node.log.info("trace_started", filter=request.filter, count=request.count)
    waits = [
        asyncio.create_task(reader.read(1)),  # b"" when the client goes away
        asyncio.create_task(stream.done.wait()),
        asyncio.create_task(node.stopping.wait()),
    ]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        captures.stop(handle)
        for task in waits:
            task.cancel()
        stream.close()
        node.log.info("trace_stopped", packets=sum(stream.captured), missed=sum(stream.missed))
