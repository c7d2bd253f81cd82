"""Work that walks every peer (a status answer, a /metrics page) cut into slices of the
event loop's time, so the drains forwarding on the same loop wait for one slice at
most, not for the whole walk (README, "Scale")."""

from __future__ import annotations

import asyncio
import time

# The most a slice holds the loop before giving it a turn (plus one STEP of work): the
# drains wait at most this long for a status answer or a scrape at any number of peers.
SLICE_SECONDS = 0.0002
STEP = 16  # items between two looks at the clock (a peer's row is a few microseconds)


class LoopBudget:
    """How long a piece of work has held the loop since it last gave the loop a turn."""

    def __init__(self, seconds: float = SLICE_SECONDS) -> None:
        self.seconds = seconds
        self.began = time.perf_counter()
        self.turns = 0  # turns given

    def spent(self) -> bool:
        return time.perf_counter() - self.began > self.seconds

    def restart(self) -> None:
        """A new slice from now (after an await that gave the loop its turn anyway)."""
        self.began = time.perf_counter()

    async def turn(self) -> None:
        """Let every ready callback (the drains) run, then start a new slice."""
        await asyncio.sleep(0)
        self.turns += 1
        self.restart()
