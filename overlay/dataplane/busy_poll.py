"""``--busy-poll-us N``: after a wake-up, keep polling the TUN and the socket for up to N
microseconds before going back to the event loop, in the spirit of the kernel's
``net.core.busy_read``.

A round trip at a low packet rate crosses each daemon twice, and each crossing that finds
the process asleep pays an idle vCPU's wake-up plus the event loop's dispatch (the
README's Benchmarks section measures it). After a wake-up in one direction the next hop
of the round trip is the other direction (a request sent, its reply received), so the
poll watches both fds with a zero-timeout ``poll()``: more of the same direction is
drained at once, and the first time the other direction is readable it is drained and
the poll ends (as busy_read returns once data arrived), so the process goes back to
sleep as soon as the hop it waited for is served. Between two empty polls it yields the
CPU (``sched_yield``): the vCPU stays awake for the next hop, but a runnable pod process
on it runs at once; on 2 vCPUs a poll that did not yield delayed the very pod it waited
for (README, "Ping and busy-poll"). The window starts at the wake-up and is not
extended: the loop's other work (status, watch, renewals) waits at most N microseconds
more, an idle daemon (no wake-ups) polls nothing, and under load the other direction is
ready at once, so the poll ends at its first check. With N = 0 (the default)
``UdpDataplane.start`` registers the drains themselves, exactly as without this module:
nothing added per wake-up.

``polling_after`` is the reference (and the callback without the native module);
``native_polling_after`` the same wake-up as one C call (``encap.native.poll_after``),
which waits with the GIL released and calls the drains from C.
"""

from __future__ import annotations

import functools
import os
import select
import time
from collections.abc import Callable

from encap import native

Drain = Callable[[], object]


def polling_after(
    first: Drain,
    first_fd: int,
    other: Drain,
    other_fd: int,
    window_us: int,
    clock: Callable[[], int] = time.monotonic_ns,
    yield_cpu: Callable[[], None] = os.sched_yield,
) -> Callable[[], None]:
    """The reader callback of ``first_fd``: ``first`` (the drain the loop woke us for),
    then poll both fds until ``window_us`` microseconds after the wake-up: ``first``
    again while only its fd is readable; ``other`` once, and return, when its fd is;
    ``yield_cpu`` after each poll that found neither."""
    window_ns = window_us * 1000
    poller = select.poll()
    poller.register(first_fd, select.POLLIN)
    poller.register(other_fd, select.POLLIN)

    def wake() -> None:
        deadline = clock() + window_ns
        first()
        while clock() < deadline:
            ready = poller.poll(0)
            if not ready:
                yield_cpu()
                continue
            if any(fd == other_fd for fd, _ in ready):
                other()
                return
            first()

    return wake


def native_polling_after(
    first: Drain, first_fd: int, other: Drain, other_fd: int, window_us: int
) -> Callable[[], object]:
    """``polling_after`` as one C call per wake-up (``encap.native.poll_after``, which
    returns how often it polled); ImportError without the native module."""
    return functools.partial(
        native.module().poll_after, first, first_fd, other, other_fd, window_us * 1000
    )
