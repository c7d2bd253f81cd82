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
from overlay.observe.status_socket import json_pieces


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
