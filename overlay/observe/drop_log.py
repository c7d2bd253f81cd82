"""Drops in the log without a line per packet.

The dataplane only counts drops (by reason, ``Counters.drops``). A reason counted for the
first time gets one line, once, with the summary of a dropped packet (source,
destination, protocol, length, peer; never the payload). The dataplane does not keep the
packet that was dropped, so a trace that keeps only drops of that reason is attached for
up to ``SAMPLE_WAIT`` seconds (the dataplane takes its slower, reporting path meanwhile)
and detached at the first sample: the line describes the next packet dropped for the
same reason, or says none came. ``Drops`` notices a new reason the moment it is first
counted (``__missing__``, which counting a known reason never calls); a poll of the
counts every second catches the rest (the workers' drops, a dataplane that counts by
other means).

Later drops go into one summary line (counts per reason since the last one) at most every
``SUMMARY_INTERVAL`` seconds, ``SUMMARY_INTERVAL_V1`` with ``-v 1``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from overlay.observe import log as overlay_log

if TYPE_CHECKING:
    from overlay.observe.trace import Capture, TraceRequest

POLL = 1.0
SAMPLE_WAIT = 2.0
SUMMARY_INTERVAL = 60.0
SUMMARY_INTERVAL_V1 = 5.0

Start = Callable[["TraceRequest", Callable[["Capture"], None]], Any]
Stop = Callable[[Any], None]


class Drops(Counter[str]):
    """``Counters.drops`` that calls ``on_new(reason)`` when a reason is first counted."""

    on_new: Callable[[str], None] | None = None

    def __missing__(self, key: str) -> int:
        if self.on_new is not None:
            self.on_new(key)
        return 0


def summary(capture: Capture) -> dict[str, Any]:
    """What a log line may say about a dropped packet: addresses, protocol, length."""
    # loaded by the capture's trace
    from overlay.observe.trace import INNER, describe, outer_parts, vxlan_inner

    data = capture.data
    fields: dict[str, Any] = {"length": capture.length}
    parts = outer_parts(data) if capture.interface != INNER else None
    if parts is not None:
        source, port, _, _, payload = parts
        fields["peer"] = f"[{source}]:{port}" if ":" in source else f"{source}:{port}"
        fields["length"] = capture.length - (len(data) - len(payload))
        data = vxlan_inner(payload) or payload  # VXLAN + Ethernet in front of the packet
    fields["packet"] = describe(data)
    return fields


class DropLog:
    def __init__(
        self,
        log: Any,
        drops: Callable[[], dict[str, int]],
        start_capture: Start | None,
        stop_capture: Stop | None,
    ) -> None:
        self.log = log
        self.drops = drops
        self.start_capture = start_capture
        self.stop_capture = stop_capture
        self.seen: set[str] = set()
        self._reported: dict[str, int] = {}
        self._last_summary = time.monotonic()
        self._firsts: set[asyncio.Task[None]] = set()

    def notice_soon(self, loop: asyncio.AbstractEventLoop, reason: str) -> None:
        """``notice`` once the loop's current callback (a drain) has returned."""
        loop.call_soon(self.notice, reason)

    def notice(self, reason: str) -> None:
        """A reason counted for the first time: sample a packet of it, then log it once."""
        if reason in self.seen:
            return
        self.seen.add(reason)
        task = asyncio.get_running_loop().create_task(self._first(reason))
        self._firsts.add(task)
        task.add_done_callback(self._firsts.discard)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(POLL)
                self.check()
        finally:
            for task in list(self._firsts):
                task.cancel()

    def check(self) -> None:
        drops = self.drops()
        for reason, n in drops.items():
            if n and reason not in self.seen:
                self.notice(reason)
        interval = SUMMARY_INTERVAL_V1 if overlay_log.enabled(1) else SUMMARY_INTERVAL
        if time.monotonic() - self._last_summary < interval:
            return
        self._last_summary = time.monotonic()
        grown = {
            reason: n - self._reported[reason]
            for reason, n in sorted(drops.items())
            if reason in self._reported and n > self._reported[reason]
        }
        if grown:
            self._reported.update({reason: drops[reason] for reason in grown})
            self.log.info("packets_dropped", since_s=round(interval), **grown)

    async def _first(self, reason: str) -> None:
        fields = await self._sample(reason)
        count = self.drops().get(reason, 0)
        self.log.warning("packet_dropped", reason=reason, first=True, count=count, **fields)
        self._reported[reason] = count  # the summaries count what comes after this line

    async def _sample(self, reason: str) -> dict[str, Any]:
        if self.start_capture is None or self.stop_capture is None:
            return {"packet": "(no sample: this datapath keeps none)"}
        caught: list[dict[str, Any]] = []
        got = asyncio.Event()

        def emit(capture: Capture) -> None:
            if not caught:
                caught.append(summary(capture))
                got.set()

        # Here: the trace modules load at the first drop sampled, not in every daemon.
        from overlay.observe.trace import TraceRequest

        handle = self.start_capture(TraceRequest(f"reason {reason}", 1, 128), emit)
        try:
            await asyncio.wait_for(got.wait(), SAMPLE_WAIT)
        except TimeoutError:
            pass
        finally:
            self.stop_capture(handle)
        return caught[0] if caught else {"packet": f"(none dropped within {SAMPLE_WAIT:g} s)"}
