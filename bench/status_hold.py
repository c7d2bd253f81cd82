"""``python -m bench.status_hold [--peers 10000,50000] [--active 0.01]``: the CPU one status
answer and one /metrics pick of the busiest peers cost, and how long they hold the event
loop at a time, in this process, with the daemon's own code.

A table of N peers (``control.peer_table`` + ``overlay.node.peer_order``, frozen out of
the cyclic GC's reach as the daemon's is), ``--active`` of them with traffic counted, on
uvloop. Two ways side by side, in the same run: the reference (a dict per peer made and
encoded every answer, ``peer_rows.rows`` through ``json_pieces``; every peer offered to the
busiest-heap) and the daemon's (``peer_rows.PeerRows`` kept between answers through
``encoded_pieces``; ``BusiestWalk``). Both answers are checked to be the same bytes.
Meanwhile a callback re-schedules itself with ``call_soon`` and notes the time between two
of its runs: what a drain woken by a packet would wait. ``bench.scale`` measures the same
from outside, as ping RTTs through a daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import uvloop

from control.lease import Lease
from control.peer_table import Peer, PeerTable
from overlay.node.peer_order import Busiest, PeerOrder
from overlay.node.peer_rows import BusiestWalk, PeerRows, rows, traffic
from overlay.observe.slices import LoopBudget
from overlay.observe.status_socket import encoded_pieces, json_pieces

ANSWERS = 5
METRICS_LIMIT = 100  # the daemon's default --metrics-peer-limit


def _order(count: int, active: float) -> PeerOrder:
    """``count`` peers, every (1/active)th with traffic (as the dataplane counts it)."""
    table, order = PeerTable(8285), PeerOrder()
    leases = [
        Lease(IPv4Network(f"10.{i >> 8}.{i & 255}.0/24"), IPv4Address(f"198.18.{i >> 8}.{i & 255}"))
        for i in range(1, count + 1)
    ]
    order.apply(table, *table.apply(leases, []))
    every = round(1 / active) if active > 0 else 0
    now = time.monotonic()
    for n, peer in enumerate(order.peers):
        if every and n % every == 0:
            s = peer.stats
            s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes = n, 1400 * n, n + 1, 1400 * n
            s.last_tx, s.last_rx = now - n / 1000, now - n / 2000
    gc.collect()
    gc.freeze()  # as the daemon does after a listing (overlay.node.events)
    return order


@dataclass
class Held:
    answer_ms: float  # CPU (wall, in this process) per answer
    longest_ms: float  # the longest the loop was held at a time
    p99_ms: float


async def _held(answer: Callable[[], AsyncIterator[bytes]], answers: int) -> tuple[Held, bytes]:
    """Run ``answer`` ``answers`` times with the hold-noting callback beside it."""
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
    pieces: list[bytes] = []
    for _ in range(answers):  # the pieces as the socket would take them, not joined
        pieces = [piece async for piece in answer()]
    elapsed = (time.perf_counter() - started) / answers
    done = True
    body = b"".join(pieces)
    await asyncio.sleep(0)
    holds.sort()
    return Held(elapsed * 1000, holds[-1] * 1000, holds[int(0.99 * len(holds))] * 1000), body


def _reference(peers: Sequence[Peer]) -> Callable[[], AsyncIterator[bytes]]:
    def rows_of(some: Sequence[Peer]) -> list[dict[str, Any]]:
        return rows(some, [], True)

    return lambda: json_pieces({"state": "running"}, peers, rows_of, LoopBudget())


def _kept(peers: Sequence[Peer], kept: PeerRows) -> Callable[[], AsyncIterator[bytes]]:
    def encode(start: int, stop: int) -> str:
        return kept.encode(peers, start, stop, [], True)

    async def answer() -> AsyncIterator[bytes]:
        kept.begin(len(peers))
        pieces = encoded_pieces({"state": "running"}, len(peers), encode, LoopBudget())
        async for piece in pieces:
            yield piece
        kept.end()

    return answer


def _picks_ms(peers: Sequence[Peer]) -> tuple[float, float]:
    """(ms to pick the busiest offering every peer, ms with ``BusiestWalk``); the same
    peers picked."""
    started = time.perf_counter()
    heap = Busiest(METRICS_LIMIT)
    for peer in peers:
        heap.offer(peer, traffic(peer, []))
    offered = time.perf_counter()
    walk = BusiestWalk([], METRICS_LIMIT)
    walk.walk(peers)
    walked = time.perf_counter()
    assert walk.chosen() == heap.chosen()
    return (offered - started) * 1000, (walked - offered) * 1000


def _same_rows(one: bytes, other: bytes) -> None:
    """The two answers are the same rows (their clocks read a moment apart: the rows'
    ``last_*`` fields may differ in their last digit)."""
    a, b = json.loads(one)["peers"], json.loads(other)["peers"]
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert all(x[k] == y[k] for k in x if not k.startswith("last_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.status_hold", description=__doc__)
    parser.add_argument("--peers", default="10000,50000", help="peer counts (10000,50000)")
    parser.add_argument("--active", type=float, default=0.01, help="share with traffic (0.01)")
    args = parser.parse_args(argv)
    print(f"ms per answer, loop held p99 / max ms; {args.active:.0%} of the peers with traffic")
    for count in (int(n) for n in args.peers.split(",")):
        peers = _order(count, args.active).peers
        kept = PeerRows()
        ref, ref_body = uvloop.run(_held(_reference(peers), ANSWERS))
        first, _ = uvloop.run(_held(_kept(peers, kept), 1))
        now, body = uvloop.run(_held(_kept(peers, kept), ANSWERS))
        _same_rows(ref_body, body)
        old_pick, new_pick = _picks_ms(peers)
        print(
            f"{count:>6} peers: status answer {ref.answer_ms:6.1f} ms a dict per peer "
            f"(held p99 {ref.p99_ms:.2f}, max {ref.longest_ms:.2f}), {now.answer_ms:6.1f} ms "
            f"rows kept (first {first.answer_ms:.1f}; held p99 {now.p99_ms:.2f}, max "
            f"{now.longest_ms:.2f}): {ref.answer_ms / now.answer_ms:.1f}x less; /metrics "
            f"pick {old_pick:.1f} -> {new_pick:.1f} ms ({old_pick / new_pick:.1f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
