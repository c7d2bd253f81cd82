"""Work that walks every peer (a status answer, a /metrics page) cut into slices of the
event loop's time, so the drains forwarding on the same loop wait for one slice at
most, not for the whole walk (README, "Scale")."""

from __future__ import annotations

import asyncio
import os
import time

# The most a slice holds the loop before giving it a turn (plus one STEP of work): the
# drains wait at most this long for a status answer or a scrape at any number of peers.
SLICE_SECONDS = 0.0001
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
        """Let every ready callback (the drains) run, and any other runnable thread on
        this CPU (a pod's, a ping's, a peer's), then start a new slice. The loop's turn
        alone leaves the thread on its CPU: to the scheduler a walk of tens of
        thousands of peers is one busy spell, and a process woken on the same CPU waited
        for it (a ping's p99 during a scrape loop: README, "Scale")."""
        await asyncio.sleep(0)
        os.sched_yield()
        self.turns += 1
        self.restart()
