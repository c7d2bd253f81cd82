"""netem's words (overlay.impair.spec): what tc-netem(8) accepts parses to the values it
means, prints back to words that parse to the same, and anything else is one
ImpairError line, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.impair.spec import (
    DISTRIBUTIONS,
    GilbertElliott,
    ImpairError,
    Spec,
    format_spec,
    parse_rate,
    parse_spec,
    parse_time,
)


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("delay 20ms", Spec(delay=0.02)),
        ("delay 100ms 10ms 25%", Spec(delay=0.1, jitter=0.01, delay_correlation=0.25)),
        (
            "delay 20ms 5ms distribution normal",
            Spec(delay=0.02, jitter=0.005, distribution="normal"),
        ),
        ("loss 1%", Spec(loss=0.01)),
        ("loss random 0.3% 25%", Spec(loss=0.003, loss_correlation=0.25)),
        ("loss 2", Spec(loss=0.02)),  # tc: a percentage with or without %
        ("loss gemodel 1%", Spec(gemodel=GilbertElliott(0.01, 0.99))),  # man page: r = 1-p
        ("loss gemodel 1% 30% 90% 2%", Spec(gemodel=GilbertElliott(0.01, 0.3, 0.9, 0.02))),
        ("duplicate 1% corrupt 0.1%", Spec(duplicate=0.01, corrupt=0.001)),
        (
            "delay 10ms reorder 25% 50%",
            Spec(delay=0.01, reorder=0.25, reorder_correlation=0.5, gap=1),
        ),
        ("delay 10ms reorder 25% gap 5", Spec(delay=0.01, reorder=0.25, gap=5)),
        ("rate 100mbit", Spec(rate=1e8)),
        ("rate 1Gbit 20", Spec(rate=1e9, packet_overhead=20)),
        ("rate 125kbps", Spec(rate=1e6)),  # bytes per second, as tc
        ("rate 1mibit", Spec(rate=2.0**20)),
        ("limit 50 seed 7", Spec(limit=50, seed=7)),
        ("DELAY 1S", Spec(delay=1.0)),
    ],
)
def test_netem_words_mean_what_tc_means(words: str, expected: Spec) -> None:
    assert parse_spec(words) == expected
    assert parse_spec(format_spec(expected)) == expected


@pytest.mark.parametrize(
    ("words", "says"),
    [
        ("", "no impairment given"),
        ("delay", "delay needs a time"),
        ("delay 20", "needs a unit"),
        ("delay 20ms 5", "needs a unit"),
        ("delay 2min", "unknown time unit"),
        ("delay 61s", "at most 60s"),
        ("loss 101%", "at most 100%"),
        ("loss -1%", "is not a percentage"),
        ("loss abc", "is not a percentage"),
        ("loss state 1%", "not supported"),
        ("loss 1% loss 2%", "loss is given twice"),
        ("loss 1% loss gemodel 2%", "loss is given twice"),
        ("rate 100", "needs a unit"),
        ("rate 100furlongs", "unknown rate unit"),
        ("rate 1bit", "at least 8bit"),
        ("rate 1mbit 20 64", "CELLSIZE"),
        ("limit 0", "must be 1 to"),
        ("limit many", "is not a limit"),
        ("reorder 25%", "without specifying some delay"),
        ("delay 10ms distribution normal", "needs a jitter"),
        ("delay 10ms 1ms distribution weibull", "unknown distribution"),
        ("jitter 5ms", "unknown word 'jitter'"),
        ("delay 10ms reorder 5% gap 0", "must be 1 to"),
    ],
)
def test_bad_words_are_one_line_naming_the_fault(words: str, says: str) -> None:
    with pytest.raises(ImpairError) as caught:
        parse_spec(words)
    message = str(caught.value)
    assert says in message and "\n" not in message


def test_units() -> None:
    assert parse_time("500us") == pytest.approx(5e-4)
    assert parse_time("1.5s") == 1.5
    assert parse_rate("1gbit") == 1e9
    assert parse_rate("1kbps") == 8000


_percent = st.integers(0, 100).map(lambda n: f"{n}%")
_time = st.sampled_from(["0ms", "1ms", "20ms", "500us", "1.5ms", "2s"])
_word_groups = st.lists(
    st.one_of(
        st.tuples(st.just("delay"), _time, _time, _percent).map(" ".join),
        st.tuples(st.just("loss"), _percent).map(" ".join),
        st.tuples(st.just("loss gemodel"), _percent, _percent).map(" ".join),
        st.tuples(st.just("duplicate"), _percent).map(" ".join),
        st.tuples(st.just("corrupt"), _percent, _percent).map(" ".join),
        st.tuples(st.just("rate"), st.sampled_from(["1mbit", "100mbit", "2gbit", "64kbit"])).map(
            " ".join
        ),
        st.tuples(st.just("limit"), st.integers(1, 5000).map(str)).map(" ".join),
        st.tuples(st.just("distribution"), st.sampled_from(DISTRIBUTIONS)).map(" ".join),
    ),
    min_size=1,
    max_size=6,
)


@given(_word_groups)
@settings(max_examples=300, deadline=None)
def test_what_parses_prints_back_to_itself(groups: list[str]) -> None:
    try:
        spec = parse_spec(" ".join(groups))
    except ImpairError:
        return  # a repeated keyword, a distribution without jitter: refused, not broken
    text = format_spec(spec)
    again = parse_spec(text)
    assert format_spec(again) == text
    assert again.delay == pytest.approx(spec.delay) and again.rate == pytest.approx(spec.rate)


@given(st.lists(st.one_of(st.text(max_size=12), st.sampled_from(["delay", "loss", "rate", "gap"]))))
@settings(max_examples=500, deadline=None)
def test_any_words_parse_or_fail_with_impair_error(words: list[str]) -> None:
    try:
        parse_spec(words)
    except ImpairError as e:
        assert str(e) and "\n" not in str(e)
