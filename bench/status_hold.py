"""``python -m bench.status_hold [--peers 10000,50000]``: how long making one status
answer holds the event loop at a time, in this process, with the daemon's own code.

A table of N peers (``control.peer_table`` + ``overlay.node.peer_order``, frozen out of
the cyclic GC's reach as the daemon's is) and the rows and encoding the status socket
sends (``overlay.observe.status_socket.json_pieces``), on uvloop; meanwhile a callback
re-schedules itself with ``call_soon`` and notes the time between two of its runs: what
a drain woken by a packet would wait. ``bench.scale`` measures the same from outside, as
ping RTTs through a daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import uvloop

from control.lease import Lease
from control.peer_table import Peer, PeerTable
from overlay.node.peer_order import PeerOrder
from overlay.node.view import _rows
from overlay.observe.slices import LoopBudget
from overlay.observe.status_socket import json_pieces

ANSWERS = 5


def _order(count: int) -> PeerOrder:
    table, order = PeerTable(8285), PeerOrder()
    leases = [
        Lease(IPv4Network(f"10.{i >> 8}.{i & 255}.0/24"), IPv4Address(f"198.18.{i >> 8}.{i & 255}"))
        for i in range(1, count + 1)
    ]
    order.apply(table, *table.apply(leases, []))
    gc.collect()
    gc.freeze()  # as the daemon does after a listing (overlay.node.events)
    return order


async def _measure(order: PeerOrder) -> tuple[float, float, float]:
    """(ms per answer, the longest hold, the 99th percentile of holds in ms)."""
    loop = asyncio.get_running_loop()
    holds: list[float] = []
    last = time.perf_counter()
    done = False

    def tick() -> None:
        nonlocal last
        now = time.perf_counter()
        holds.append(now - last)
        last = now
        if not done:
            loop.call_soon(tick)

    loop.call_soon(tick)
    started = time.perf_counter()
    for _ in range(ANSWERS):
        pieces = json_pieces({"state": "running"}, order.peers, _rows_of, LoopBudget())
        async for _piece in pieces:
            pass
    elapsed = (time.perf_counter() - started) / ANSWERS
    done = True
    holds.sort()
    return elapsed * 1000, holds[-1] * 1000, holds[int(0.99 * len(holds))] * 1000


def _rows_of(peers: Sequence[Peer]) -> list[dict[str, Any]]:
    return _rows(peers, [], True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.status_hold", description=__doc__)
    parser.add_argument("--peers", default="10000,50000", help="peer counts (10000,50000)")
    args = parser.parse_args(argv)
    for count in (int(n) for n in args.peers.split(",")):
        order = _order(count)
        answer, longest, p99 = uvloop.run(_measure(order))
        print(
            f"{count:>6} peers: one status answer {answer:6.1f} ms, the loop held "
            f"at most {longest:.2f} ms at a time (p99 {p99:.2f} ms)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
