"""The status answer is made and encoded in slices of the loop's time (issue 19: tens
of thousands of peers are not one long pause of the drains); the slices must still join
into the same JSON, and the loop must get its turn between two."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest

from overlay.observe.slices import STEP, LoopBudget
from overlay.observe.status_socket import PIECE_BYTES, json_pieces


def _rows(items: Sequence[int]) -> list[dict[str, Any]]:
    return [{"subnet": f"10.0.{i}.0/24", "tx": i} for i in items]


async def _pieces(doc: dict[str, Any], items: list[int], budget: LoopBudget) -> list[bytes]:
    return [piece async for piece in json_pieces(doc, items, _rows, budget)]


@pytest.mark.parametrize("count", [0, 1, STEP, STEP + 1, 3 * STEP + 7])
@pytest.mark.parametrize("rest", [{}, {"state": "ready", "counters": {"drops": {"x": 1}}}])
@pytest.mark.parametrize("seconds", [0.0, 60.0])
def test_the_pieces_join_into_the_document(
    count: int, rest: dict[str, Any], seconds: float
) -> None:
    items = list(range(count))
    pieces = asyncio.run(_pieces(rest, items, LoopBudget(seconds)))
    assert json.loads(b"".join(pieces)) == {**rest, "peers": _rows(items)}


def test_the_loop_runs_between_two_slices() -> None:
    """With the budget spent at every step, each STEP rows are a piece of their own and
    a callback that became ready meanwhile (a drain's wake-up) runs before the next."""

    async def main() -> tuple[list[bytes], list[int], LoopBudget]:
        loop = asyncio.get_running_loop()
        ran: list[int] = []
        budget = LoopBudget(0.0)
        pieces = []
        async for piece in json_pieces({}, list(range(5 * STEP)), _rows, budget):
            pieces.append(piece)
            loop.call_soon(ran.append, len(pieces))
        return pieces, ran, budget

    pieces, ran, budget = asyncio.run(main())
    assert len(pieces) == 6  # five slices of rows, then the closing one
    assert budget.turns == 5
    assert ran[:5] == [1, 2, 3, 4, 5]  # each ran before the next piece was made


def test_a_long_slice_is_handed_over_in_pieces_without_a_turn() -> None:
    """Rows made within one slice are handed over every PIECE_BYTES, so the caller's
    write of them falls inside the slice, not all at once after it was spent; the loop
    gets no extra turn for it."""

    def big_rows(items: Sequence[int]) -> list[dict[str, Any]]:
        return [{"subnet": f"10.0.{i}.0/24", "pad": "x" * 1000} for i in items]

    async def main() -> tuple[list[bytes], LoopBudget]:
        budget = LoopBudget(60.0)
        items = list(range(10 * STEP))
        return [p async for p in json_pieces({}, items, big_rows, budget)], budget

    pieces, budget = asyncio.run(main())
    assert budget.turns == 0
    assert len(pieces) >= 4
    assert all(len(p) < PIECE_BYTES + STEP * 1100 for p in pieces)
    assert json.loads(b"".join(pieces))["peers"] == big_rows(range(10 * STEP))


def test_a_turn_also_yields_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each turn between two slices also offers the CPU to other runnable threads (a
    ping, a pod): the loop's turn alone left a long walk one busy spell to the
    scheduler, and what woke on its CPU waited for the spell's end."""
    from overlay.observe import slices

    yields: list[int] = []
    monkeypatch.setattr(slices.os, "sched_yield", lambda: yields.append(1))

    async def main() -> LoopBudget:
        budget = LoopBudget(0.0)
        async for _ in json_pieces({}, list(range(3 * STEP)), _rows, budget):
            pass
        return budget

    budget = asyncio.run(main())
    assert budget.turns == 3 and len(yields) == 3
