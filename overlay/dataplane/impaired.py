"""Impairment in the dataplane, both directions: netem's model (``overlay.impair``) applied
per peer to what we send (``out``) and what we receive (``in``).

It costs nothing while nothing is impaired: the reader callbacks are the usual ones (the
native drains, or the Python methods) and no path checks anything per packet or per
wake-up. While a direction is impaired its reader is this module's instead: the same
stages as the Python reference (``_read_tun`` then ``_send_groups``/``_send_each``;
``_receive`` then ``_deliver``), with the model asked for each datagram in between.
What leaves at once stays in place (compacted, so a GSO send or a GRO run still goes
whole); a copy that leaves later, or twice, or with a bit flipped, is held (a heap by
release time, bounded by the model's ``limit``) and released by a ``MonotonicTimer`` on
the event loop, never blocking the drains: sent (``out``) or validated and written to
the TUN (``in``) with the usual counts and trace reports. Drops are counted as
``tx_impair_loss``, ``rx_impair_limit``, ...; ``counters.impaired`` counts what was
delayed, duplicated, corrupted and reordered, ``counters.impair_queued`` what is held.
Rates and delays apply to inner packets (the length of the IPv4 packet), as netem on
flannel0 would count them.

vxlan's IPv6 half (``overlay.dataplane.ipv6``) asks ``impair6`` for each datagram while
its ``impair`` attribute is set, going one datagram at a time then (a super-packet's
segments, a GRO receive's datagrams; one None test per packet, super-packet or receive
otherwise): the same models (its PublicIPv6 is a link of its own), counts (its drops
also in ``drops6``), trace reports and timer; what it holds is released through its own
``_held``/``_received_held``.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from mmap import mmap
from typing import TYPE_CHECKING, NamedTuple

from encap import gso
from overlay.dataplane import busy_poll
from overlay.dataplane.receive import ReceivePath
from overlay.dataplane.send import SendPath
from overlay.dataplane.timer import MonotonicTimer
from overlay.impair.rules import Rules

if TYPE_CHECKING:
    from overlay.impair.model import Verdict

# Our names for the rules' directions, as the counters and the trace spell them.
SIDE = {"out": "tx", "in": "rx"}


# Releases a held datagram (data, peer, now) another way than the IPv4 path's own.
Release = Callable[[bytes | bytearray | memoryview, tuple[str, int], float], None]


class _Held(NamedTuple):
    at: float  # when it leaves (time.monotonic())
    order: int  # ties leave in the order they came
    side: str  # "tx": to send to ``peer``; "rx": received from ``peer``, to deliver
    data: bytes | bytearray
    peer: tuple[str, int]
    release: Release | None  # None: the IPv4 path's (send or deliver, by ``side``)


class ImpairPath(SendPath, ReceivePath):
    """The impaired wake-ups, and the reader callbacks a dataplane registers."""

    _loop: asyncio.AbstractEventLoop | None = None
    _held: list[_Held]
    _timer: MonotonicTimer | None = None
    _armed = float("inf")
    _order = 0

    def set_impairment(self, rules: Rules) -> None:
        """Impair as ``rules`` say from the next wake-up on (none: stop impairing; what
        is held still leaves at its time)."""
        if rules:
            if self.links is None:
                # Here, not at the top: the models (overlay.impair.model, random) are for a
                # dataplane that is impaired, not in every daemon (README, "Memory of a daemon").
                from overlay.impair.links import Links

                self.links = Links(rules, self.peers)
            else:
                self.links.set_rules(rules)
        else:
            self.links = None
        self.impaired = frozenset(rules.directions())
        if self._loop is not None:
            self._register(self._loop)

    def reader_callbacks(self) -> tuple[Callable[[], object], Callable[[], object]]:
        """(TUN readable, socket readable) of an unimpaired dataplane: the native drains'
        C methods (no Python per wake-up; with a trace attached they hand the wake-up to
        the Python methods), else those methods; with ``busy_poll_us`` each wrapped to poll
        both fds after its wake-up (``busy_poll``: in C with the native drains), without
        it the drains themselves."""
        drains = self._native_drains()
        tx: Callable[[], object]
        rx: Callable[[], object]
        if drains is not None:
            tx, rx = drains.tx, drains.rx
        else:
            tx = self.on_tun_readable
            rx = self.on_socket_readable_gro if self.gro else self.on_socket_readable
        if not self.busy_poll_us:
            return tx, rx
        tun_fd, sock_fd, window = self.tun.fd, self.sock.fileno(), self.busy_poll_us
        wrap = busy_poll.native_polling_after if drains is not None else busy_poll.polling_after
        return wrap(tx, tun_fd, rx, sock_fd, window), wrap(rx, sock_fd, tx, tun_fd, window)

    def _register(self, loop: asyncio.AbstractEventLoop) -> None:
        """The reader callbacks: impaired directions get this module's, the others
        ``reader_callbacks``'."""
        self._loop = loop
        tx, rx = self.reader_callbacks()
        if "out" in self.impaired:
            tx = self.on_tun_readable_impaired
        if "in" in self.impaired:
            rx = self.on_socket_readable_impaired
        loop.remove_reader(self.tun.fd)
        loop.add_reader(self.tun.fd, tx)
        loop.remove_reader(self.sock.fileno())
        loop.add_reader(self.sock.fileno(), rx)

    def _unregister(self, loop: asyncio.AbstractEventLoop) -> None:
        """Readers off, the timer closed, what was held forgotten."""
        loop.remove_reader(self.tun.fd)
        loop.remove_reader(self.sock.fileno())
        timer, self._timer = self._timer, None
        if timer is not None:
            loop.remove_reader(timer.fd)
            timer.close()
        self._held = []
        self._armed = float("inf")
        self.counters.impair_queued = 0
        self._loop = None

    # -- the wake-ups ----------------------------------------------------------------

    def on_tun_readable_impaired(self) -> None:
        """``on_tun_readable`` with each datagram put to its link's model first."""
        lengths, addrs = self._read_tun()
        if not lengths:
            return
        links = self.links
        now = time.monotonic()
        arena = self._tx_arena
        headroom = self.headroom
        kept_lengths: list[int] = []
        kept_addrs: list[tuple[str, int]] = []
        read = written = 0
        for length, addr in zip(lengths, addrs, strict=True):
            first = read
            read += length
            model = links.model(addr[0], "out") if links is not None else None
            if model is not None:
                verdict = model.offer(now, length - headroom)
                if not self._impair(verdict, now, arena, first, read, addr, "tx"):
                    continue
            if written != first:
                arena[written : written + length] = arena[first:read]
            written += length
            kept_lengths.append(length)
            kept_addrs.append(addr)
        if not kept_lengths:
            return
        if self.gso and len(kept_lengths) > 1 and self.tap is None:
            self._send_groups(kept_lengths, kept_addrs)
        else:
            self._send_each(kept_lengths, kept_addrs, 0, len(kept_lengths))

    def on_socket_readable_impaired(self) -> None:
        """``on_socket_readable[_gro]`` with each datagram put to its link's model first."""
        self._receive(self._deliver_impaired)

    def _deliver_impaired(self, source: tuple[str, int], size: int, segment: int) -> None:
        links = self.links
        model = links.model(source[0], "in") if links is not None else None
        if model is None:
            self._deliver(source, size, segment)
            return
        now = time.monotonic()
        buf = self._rx_buffer
        headroom = self.headroom
        kept = 0
        for start, end in gso.split_points(size, segment):
            verdict = model.offer(now, max(end - start - headroom, 0))
            if self._impair(verdict, now, buf, start, end, source, "rx"):
                if kept != start:  # only the last datagram may be short: still a run
                    buf[kept : kept + end - start] = buf[start:end]
                kept += end - start
        if kept:
            self._deliver(source, kept, segment)

    def impair6(
        self,
        side: str,
        buf: bytes | bytearray | memoryview,
        size: int,
        peer: tuple[str, int],
        release: Release,
    ) -> bool:
        """The IPv6 half's datagram ``buf[:size]`` (``side`` "tx": to send to ``peer``;
        "rx": received from it) put to its link's model: True when it goes on now, as
        it is; else it was dropped or held (released later through ``release``)."""
        links = self.links
        model = links.model(peer[0], "out" if side == "tx" else "in") if links else None
        if model is None:
            return True
        now = time.monotonic()
        verdict = model.offer(now, max(size - self.headroom, 0))
        for reason in verdict.drops:
            self.counters.drops6[f"{side}_impair_{reason}"] += 1
        return self._impair(verdict, now, buf, 0, size, peer, side, release)

    def _impair(
        self,
        verdict: Verdict,
        now: float,
        buf: bytes | bytearray | memoryview | mmap,
        start: int,
        end: int,
        peer: tuple[str, int],
        side: str,
        release: Release | None = None,
    ) -> bool:
        """Count and trace ``verdict`` for the datagram ``buf[start:end]`` and hold the
        copies that leave later, changed, or twice; True when one copy leaves now, as
        it is, from where it lies."""
        counts = self.counters.impaired
        for reason in verdict.drops:
            self.counters.drops[f"{side}_impair_{reason}"] += 1
            if self.tap is not None:
                packet = memoryview(buf)[start + self.headroom if side == "tx" else start : end]
                self.tap.drop(f"{side}_impair_{reason}", packet, peer if side == "rx" else None)
        if verdict.duplicated:
            counts[f"{side}_duplicated"] += 1
        in_place = False
        for send in verdict.sends:
            if send.reordered:
                counts[f"{side}_reordered"] += 1
            if send.flip_bit < 0 and send.at <= now and not in_place:
                in_place = True
                continue
            data = bytearray(buf[start:end])
            if send.flip_bit >= 0:
                counts[f"{side}_corrupted"] += 1
                data[self.headroom + send.flip_bit // 8] ^= 1 << (send.flip_bit % 8)
            if send.at > now:
                counts[f"{side}_delayed"] += 1
            self._hold(send.at, side, data, peer, release)
        return in_place

    # -- holding and releasing ---------------------------------------------------------

    def _hold(
        self,
        at: float,
        side: str,
        data: bytearray,
        peer: tuple[str, int],
        release: Release | None = None,
    ) -> None:
        if self._timer is None:
            assert self._loop is not None, "impairment before start()"
            self._held = []
            self._timer = MonotonicTimer()
            self._loop.add_reader(self._timer.fd, self._release_due)
        self._order += 1
        heapq.heappush(self._held, _Held(at, self._order, side, data, peer, release))
        self.counters.impair_queued = len(self._held)
        if at < self._armed:
            self._armed = at
            self._timer.arm(at)

    def _release_due(self) -> None:
        """The timer fired: everything due leaves, in the order of its time."""
        timer = self._timer
        if timer is None:
            return
        timer.clear()
        held = self._held
        now = time.monotonic()
        while held and held[0].at <= now:
            item = heapq.heappop(held)
            if item.release is not None:
                item.release(item.data, item.peer, now)
            elif item.side == "tx":
                self._send_held(item.data, item.peer, now)
            else:
                self._rx_buffer[: len(item.data)] = item.data
                self._deliver(item.peer, len(item.data), len(item.data))
        self.counters.impair_queued = len(held)
        self._armed = held[0].at if held else float("inf")
        if held:
            timer.arm(self._armed)

    def _send_held(self, data: bytes | bytearray, addr: tuple[str, int], now: float) -> None:
        """One held datagram to its peer, counted and traced as ``_send_each`` does."""
        tap = self.tap
        try:
            self.sock.sendto(data, addr)
        except OSError as e:
            reason = "tx_socket_full" if isinstance(e, BlockingIOError) else "tx_send_error"
            self.counters.drops[reason] += 1
            if tap is not None:
                tap.drop(reason, memoryview(data)[self.headroom :], None)
            return
        self.counters.tx_packets += 1
        self.counters.tx_bytes += len(data)
        self._sent(addr, 1, len(data), now)
        if tap is not None:
            tap.inner("tx", memoryview(data)[self.headroom :])
            tap.outer("tx", data, addr)
