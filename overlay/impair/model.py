"""What netem does to each packet of one link, as a pure model: no sockets, no clock of
its own (``offer`` is told the time), randomness from the ``random.Random`` it is given.

Per packet, in netem's order (sch_netem.c, netem_enqueue): a duplicate is decided, then
loss (random, or the Gilbert-Elliott chain); a packet both lost and duplicated still
goes once, a duplicate goes through the whole model again with duplication off (netem
re-enqueues its clone); then corruption (one random bit of the packet flipped), then the
queue limit (``limit`` packets held at once, more are dropped), then the time it leaves:

- reordering (``reorder P gap N``): once N-1 packets have been delayed, the next leaves at
  once with probability P, ahead of the delayed ones;
- else ``delay`` plus jitter drawn from the distribution (uniform in +-jitter, or
  normal/pareto/paretonormal scaled by jitter and cut at 4 jitters, as netem's 16-bit
  tables cut them); a negative sum leaves at once. Without a rate the packets leave in
  the order of their times, so jitter reorders them, as netem's does;
- with ``rate``: after the last packet still queued, plus its own time on the wire,
  ``(length + packet overhead) * 8 / rate``: a FIFO at that rate behind the delay.

Correlations are netem's: the next random number is ``(1 - rho) * fresh + rho * last``.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from overlay.impair.spec import Spec

if TYPE_CHECKING:
    from statistics import NormalDist

TAIL_CUT = 4.0  # jitters: the most a distribution's sample may stray from the delay
_PARETO_SHAPE = 3.0
_PARETO_MEAN = _PARETO_SHAPE / (_PARETO_SHAPE - 1)  # with scale 1
_PARETO_SD = math.sqrt(_PARETO_SHAPE / ((_PARETO_SHAPE - 1) ** 2 * (_PARETO_SHAPE - 2)))
_PARETONORMAL_SD = math.sqrt(0.75**2 + 0.25**2)  # of the mix of two independent samples


class Send(NamedTuple):
    """One copy of a packet that leaves: when (the caller's clock), and which bit of it
    to flip (-1: none)."""

    at: float
    flip_bit: int = -1
    reordered: bool = False


class Verdict(NamedTuple):
    """What becomes of one packet: the copies that leave, and the reasons of those that
    do not (``loss``, ``limit``): a packet may be sent and its duplicate dropped."""

    sends: tuple[Send, ...]
    drops: tuple[str, ...] = ()
    duplicated: bool = False


class _Correlated:
    """netem's get_crandom: uniform numbers in [0, 1), each leaning on the last by rho."""

    __slots__ = ("last", "rho", "rng")

    def __init__(self, rho: float, rng: random.Random) -> None:
        self.rho = rho
        self.rng = rng
        self.last = rng.random()

    def __call__(self) -> float:
        fresh = self.rng.random()
        if not self.rho:
            return fresh
        self.last = (1 - self.rho) * fresh + self.rho * self.last
        return self.last


def standard_sample(distribution: str, u: float, rng: random.Random) -> float:
    """A sample of mean 0 and standard deviation 1 (uniform: in [-1, 1]) from ``u`` in
    [0, 1), cut at +-TAIL_CUT; paretonormal mixes a quarter of a pareto sample (from a
    second, fresh number) into three quarters of a normal one, scaled back to sd 1."""
    if distribution == "uniform":
        return 2 * u - 1
    if distribution == "normal":
        value = _normal(u)
    elif distribution == "pareto":
        value = _pareto(u)
    else:
        value = (0.75 * _normal(u) + 0.25 * _pareto(rng.random())) / _PARETONORMAL_SD
    return max(-TAIL_CUT, min(TAIL_CUT, value))


def _normal(u: float) -> float:
    return float(_standard_normal().inv_cdf(min(max(u, 1e-12), 1 - 1e-12)))


@functools.cache
def _standard_normal() -> NormalDist:
    """Imported at the first normal-distributed jitter, for memory: statistics brings
    decimal and fractions, which a daemon without such a jitter never uses (README,
    "Memory of a daemon")."""
    from statistics import NormalDist

    return NormalDist()


def _pareto(u: float) -> float:
    value: float = (1 - u) ** (-1 / _PARETO_SHAPE)
    return (value - _PARETO_MEAN) / _PARETO_SD


@dataclass
class _GilbertElliott:
    """The two-state chain: a packet's fate is drawn in the state it meets, then the
    state moves (netem's loss_gilb_ell order)."""

    p: float
    r: float
    bad_loss: float
    good_loss: float
    bad: bool = False

    def lost(self, rng: random.Random) -> bool:
        if self.bad:
            lost = rng.random() < self.bad_loss
            if rng.random() < self.r:
                self.bad = False
        else:
            lost = rng.random() < self.good_loss
            if rng.random() < self.p:
                self.bad = True
        return lost


class LinkModel:
    """One direction of one link, impaired as ``spec`` says."""

    def __init__(self, spec: Spec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self._delay_random = _Correlated(spec.delay_correlation, rng)
        self._loss_random = _Correlated(spec.loss_correlation, rng)
        self._duplicate_random = _Correlated(spec.duplicate_correlation, rng)
        self._corrupt_random = _Correlated(spec.corrupt_correlation, rng)
        self._reorder_random = _Correlated(spec.reorder_correlation, rng)
        ge = spec.gemodel
        self._chain = (
            _GilbertElliott(ge.p, ge.r, ge.bad_loss, ge.good_loss) if ge is not None else None
        )
        self._held: list[float] = []  # when each packet still queued leaves (a heap)
        self._last_departure = 0.0  # with a rate: when the last packet queued leaves
        self._counter = 0  # packets delayed since the last reordered one (netem's)

    @property
    def queued(self) -> int:
        """Packets held at the last ``offer`` (the queue ``limit`` applies to)."""
        return len(self._held)

    def offer(self, now: float, length: int) -> Verdict:
        """What happens to a packet of ``length`` bytes that arrives at ``now``."""
        held = self._held
        while held and held[0] <= now:
            heapq.heappop(held)
        spec = self.spec
        duplicate = bool(spec.duplicate) and self._duplicate_random() < spec.duplicate
        lost = self._lost()
        if lost and not duplicate:
            return Verdict((), ("loss",))
        sends: list[Send] = []
        drops: list[str] = []
        if duplicate and not lost:  # the clone goes through again, duplication off
            self._one(now, length, sends, drops, roll_loss=True)
        self._one(now, length, sends, drops, roll_loss=False)
        return Verdict(tuple(sends), tuple(drops), duplicate and not lost)

    def _lost(self) -> bool:
        if self._chain is not None:
            return self._chain.lost(self.rng)
        return bool(self.spec.loss) and self._loss_random() < self.spec.loss

    def _one(
        self, now: float, length: int, sends: list[Send], drops: list[str], *, roll_loss: bool
    ) -> None:
        """One copy through corruption, the queue limit and the clock."""
        spec = self.spec
        if roll_loss and self._lost():
            drops.append("loss")
            return
        flip = -1
        if spec.corrupt and self._corrupt_random() < spec.corrupt and length > 0:
            flip = self.rng.randrange(length * 8)
        if len(self._held) >= spec.limit:
            drops.append("limit")
            return
        gap = spec.gap
        if gap and self._counter >= gap - 1 and self._reorder_random() < spec.reorder:
            self._counter = 0
            sends.append(Send(now, flip, True))
            return
        self._counter += 1
        at = now + self._delay(now, length)
        if at > now:
            heapq.heappush(self._held, at)
        sends.append(Send(at, flip))

    def _delay(self, now: float, length: int) -> float:
        """netem's delay for a packet arriving at ``now``, the rate's wait included."""
        spec = self.spec
        delay = spec.delay
        if spec.jitter:
            sample = standard_sample(spec.distribution, self._delay_random(), self.rng)
            delay += spec.jitter * sample
        delay = max(delay, 0.0)
        if not spec.rate:
            return delay
        # Behind the last packet still queued (netem: "the last packet in queue is the
        # reference point"), then its own time on the wire.
        start = max(now + delay, self._last_departure)
        self._last_departure = start + max(length + spec.packet_overhead, 0) * 8 / spec.rate
        return self._last_departure - now
