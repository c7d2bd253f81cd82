"""netem's model (overlay.impair.model) without sockets: a seeded ``random.Random`` and
times we choose. The statistics are checked against what netem's semantics give, within
5 standard deviations of the sample (so a seed cannot make them flaky, and a wrong rule
is off by far more); the invariants hold for any spec and any arrival times
(hypothesis)."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.impair.model import TAIL_CUT, LinkModel, standard_sample
from overlay.impair.spec import DISTRIBUTIONS, GilbertElliott, Spec, parse_spec

N = 20_000


def model(words: str, seed: int = 1) -> LinkModel:
    return LinkModel(parse_spec(words), random.Random(seed))


def binomial_band(p: float, n: int) -> tuple[float, float]:
    """The fraction a Bernoulli(p) sample of n lands in, 5 standard deviations wide."""
    spread = 5 * math.sqrt(p * (1 - p) / n)
    return p - spread, p + spread


def offer_spaced(link: LinkModel, n: int, gap: float = 1.0, length: int = 1000) -> list:
    """n packets a ``gap`` apart (long enough that nothing queues unless asked to)."""
    return [link.offer(i * gap, length) for i in range(n)]


def test_random_loss_rate() -> None:
    verdicts = offer_spaced(model("loss 3%"), N)
    lost = sum(v.drops == ("loss",) and not v.sends for v in verdicts)
    low, high = binomial_band(0.03, N)
    assert low <= lost / N <= high


def test_gilbert_elliott_loss_comes_in_bursts_of_mean_one_over_r() -> None:
    ge = GilbertElliott(p=0.01, r=0.25)  # 1-h = 100%, 1-k = 0%: lost exactly while bad
    verdicts = offer_spaced(LinkModel(Spec(gemodel=ge), random.Random(3)), 200_000)
    lost = [not v.sends for v in verdicts]
    assert ge.mean_loss() == pytest.approx(0.01 / 0.26)
    assert sum(lost) / len(lost) == pytest.approx(ge.mean_loss(), rel=0.15)
    bursts, run = [], 0
    for gone in lost:
        if gone:
            run += 1
        elif run:
            bursts.append(run)
            run = 0
    assert statistics.mean(bursts) == pytest.approx(1 / ge.r, rel=0.15)
    # Random loss at the same mean has bursts of ~1 / (1 - p): the chain is what differs.
    assert statistics.mean(bursts) > 3


def test_gemodel_with_p_alone_is_random_loss_at_p() -> None:
    verdicts = offer_spaced(model("loss gemodel 4%", seed=5), N)
    low, high = binomial_band(0.04, N)
    assert low <= sum(not v.sends for v in verdicts) / N <= high


def test_duplicates_leave_twice_and_lost_duplicates_leave_once() -> None:
    verdicts = offer_spaced(model("duplicate 10%"), N)
    twice = sum(len(v.sends) == 2 for v in verdicts)
    assert sum(v.duplicated for v in verdicts) == twice
    low, high = binomial_band(0.1, N)
    assert low <= twice / N <= high
    # netem: a packet both lost and duplicated goes once; a clone rolls loss again.
    both = offer_spaced(model("duplicate 100% loss 100%"), 100)
    assert all(len(v.sends) == 1 and not v.duplicated for v in both)


def test_corruption_flips_one_bit_inside_the_packet() -> None:
    verdicts = offer_spaced(model("corrupt 5%"), N, length=60)
    flips = [s.flip_bit for v in verdicts for s in v.sends if s.flip_bit >= 0]
    low, high = binomial_band(0.05, N)
    assert low <= len(flips) / N <= high
    assert all(0 <= bit < 60 * 8 for bit in flips)
    assert len(set(flips)) > 200  # all over the packet, not one place


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_delay_is_delay_plus_jitter_from_the_distribution(distribution: str) -> None:
    words = (
        f"delay 20ms 4ms distribution {distribution}"
        if distribution != "uniform"
        else ("delay 20ms 4ms")
    )
    verdicts = offer_spaced(model(words, seed=11), N)
    delays = [v.sends[0].at - i for i, v in enumerate(verdicts)]
    assert all(
        0.02 - TAIL_CUT * 0.004 - 1e-9 <= d <= 0.02 + TAIL_CUT * 0.004 + 1e-9 for d in delays
    )
    assert statistics.mean(delays) == pytest.approx(0.02, abs=0.0004)
    if distribution == "uniform":  # +-jitter, flat: sd = jitter / sqrt(3)
        assert min(delays) >= 0.016 - 1e-9 and max(delays) <= 0.024 + 1e-9
        assert statistics.stdev(delays) == pytest.approx(0.004 / math.sqrt(3), rel=0.05)
    elif distribution == "normal":  # sd = jitter, symmetric, p99 at 2.326 jitters
        assert statistics.stdev(delays) == pytest.approx(0.004, rel=0.05)
        assert statistics.median(delays) == pytest.approx(0.02, abs=0.0002)
        ordered = sorted(delays)
        assert ordered[int(0.99 * N)] == pytest.approx(0.02 + 2.326 * 0.004, abs=0.0005)
    elif distribution == "pareto":  # sd = jitter before the cut takes its tail; skewed
        assert 0.6 * 0.004 < statistics.stdev(delays) < 0.004
        assert statistics.median(delays) < statistics.mean(delays) - 0.0004
    else:  # a quarter of that in a normal: sd close to jitter, a little skewed
        assert statistics.stdev(delays) == pytest.approx(0.004, rel=0.1)
        assert statistics.median(delays) < statistics.mean(delays)


def test_correlated_delays_lean_on_the_last() -> None:
    plain = [
        s.at - i for i, v in enumerate(offer_spaced(model("delay 20ms 5ms"), 5000)) for s in v.sends
    ]
    leaning = [
        s.at - i
        for i, v in enumerate(offer_spaced(model("delay 20ms 5ms 90%"), 5000))
        for s in v.sends
    ]

    def lag1(xs: list[float]) -> float:
        return statistics.correlation(xs[:-1], xs[1:])

    assert abs(lag1(plain)) < 0.1 < 0.8 < lag1(leaning)


def test_jitter_reorders_without_a_rate_and_not_with_one() -> None:
    """netem's tfifo sends by time: jitter larger than the gap between packets reorders
    them; with a rate each packet leaves after the last one queued."""
    jittery = [v.sends[0].at for v in offer_spaced(model("delay 20ms 10ms"), 2000, gap=0.001)]
    assert jittery != sorted(jittery)
    paced = [
        v.sends[0].at for v in offer_spaced(model("delay 20ms 10ms rate 1gbit"), 2000, gap=0.001)
    ]
    assert paced == sorted(paced)


def test_rate_is_a_fifo_at_that_rate() -> None:
    link = model("rate 8mbit limit 100000")  # 1 byte per microsecond
    verdicts = [link.offer(0.0, 1000) for _ in range(500)]  # a burst at once
    departures = [v.sends[0].at for v in verdicts]
    assert departures == pytest.approx([(i + 1) * 0.001 for i in range(500)])
    assert link.queued == 500
    # The overhead counts, and a link that drained starts from now again.
    link = model("rate 8mbit 24")
    assert link.offer(0.0, 1000).sends[0].at == pytest.approx(0.001024)
    assert link.offer(5.0, 1000).sends[0].at == pytest.approx(5.001024)


def test_the_queue_limit_drops_beyond_it_and_frees_as_packets_leave() -> None:
    link = model("delay 1s limit 10")
    verdicts = [link.offer(0.0, 100) for _ in range(15)]
    assert [v.drops for v in verdicts] == [()] * 10 + [("limit",)] * 5
    assert link.queued == 10
    assert link.offer(1.0, 100).sends  # the first ten left at 1.0
    assert link.queued == 1


def test_reorder_sends_every_gap_th_packet_at_once() -> None:
    link = model("delay 10ms reorder 100% gap 3")
    sends = [link.offer(float(i), 100).sends[0] for i in range(9)]
    assert [s.reordered for s in sends] == [False, False, True] * 3
    assert all(s.at == float(i) for i, s in enumerate(sends) if s.reordered)
    half = [m.sends[0] for m in offer_spaced(model("delay 10ms reorder 25%"), N)]
    low, high = binomial_band(0.25, N)
    assert low <= sum(s.reordered for s in half) / N <= high


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@given(u=st.floats(0, 1, exclude_max=True))
@settings(max_examples=200, deadline=None)
def test_standard_samples_stay_within_the_cut(distribution: str, u: float) -> None:
    value = standard_sample(distribution, u, random.Random(0))
    assert -TAIL_CUT <= value <= TAIL_CUT


_specs = st.builds(
    Spec,
    delay=st.floats(0, 0.5),
    jitter=st.floats(0, 0.5),
    delay_correlation=st.floats(0, 1),
    distribution=st.sampled_from(DISTRIBUTIONS),
    loss=st.floats(0, 1),
    loss_correlation=st.floats(0, 1),
    duplicate=st.floats(0, 1),
    corrupt=st.floats(0, 1),
    reorder=st.floats(0, 1),
    gap=st.integers(0, 5),
    rate=st.one_of(st.just(0.0), st.floats(8, 1e10)),
    packet_overhead=st.integers(-100, 100),
    limit=st.integers(1, 50),
)


@given(_specs, st.lists(st.tuples(st.floats(0, 0.01), st.integers(0, 65535)), max_size=200))
@settings(max_examples=200, deadline=None)
def test_any_spec_any_arrivals_keep_the_invariants(
    spec: Spec, arrivals: list[tuple[float, int]]
) -> None:
    link = LinkModel(spec, random.Random(0))
    now = 0.0
    for gap, length in arrivals:
        now += gap
        verdict = link.offer(now, length)
        assert len(verdict.sends) + len(verdict.drops) in (1, 2)
        assert set(verdict.drops) <= {"loss", "limit"}
        for send in verdict.sends:
            assert send.at >= now
            assert -1 <= send.flip_bit < max(length * 8, 1)
        assert link.queued <= spec.limit
