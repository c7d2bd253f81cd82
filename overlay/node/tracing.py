"""`overlay trace` on a node: the captures of its in-process datapath (the main process's
dataplane and its workers'), and the status-socket request that streams them."""

from __future__ import annotations

import asyncio
import json

from overlay.node.state import NodeState
from overlay.observe import trace


def attach_captures(node: NodeState) -> None:
    """Make the node's captures, when its packets cross this process."""
    backend = node.backend
    if backend is None or backend.dataplane is None or node.peers is None:
        return
    dataplane = backend.dataplane
    address, port = dataplane.sock.getsockname()
    endpoint = trace.Endpoint(address, port, dataplane.headroom)
    node.captures = trace.Captures(dataplane, endpoint, node.peers, backend.workers)


async def serve_trace(
    node: NodeState, argument: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One `overlay trace` client: stream pcapng until its count or its EOF."""
    captures, backend = node.captures, node.backend
    dataplane = backend.dataplane if backend is not None else None
    if captures is None or dataplane is None:
        link = backend.kernel_link() if backend is not None else None
        where = link.name if link is not None else node.underlay.iface
        writer.write(
            f"error: this node's packets cross the kernel's datapath, not this process "
            f"(trace them with tcpdump -i {where})\n".encode()
        )
        return
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
