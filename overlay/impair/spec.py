"""One link's impairment in netem's words (tc-netem(8)), parsed and printed back.

The words a `tc qdisc ... netem` user types carry over::

    delay TIME [JITTER [CORRELATION]] [distribution uniform|normal|pareto|paretonormal]
    loss [random] PERCENT [CORRELATION]
    loss gemodel P [R [1-H [1-K]]]
    duplicate PERCENT [CORRELATION]
    corrupt PERCENT [CORRELATION]
    reorder PERCENT [CORRELATION] [gap DISTANCE]
    rate RATE [PACKETOVERHEAD]
    limit PACKETS
    seed NUMBER

Times need a unit (``s``, ``ms``, ``us``; netem's own unitless number is microseconds,
which nobody means when they type ``delay 20``), rates too (``bit``, ``kbit``, ``mbit``,
``gbit``, ``bps`` = bytes per second, ``kbps``, ..., and the binary ``kibit``, ...);
percentages may carry ``%`` or not, as in tc. What netem itself refuses (reorder without
delay, a distribution without jitter) is refused with netem's reason. ``ImpairError``'s
message is the one line a user sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")
DEFAULT_LIMIT = 1000  # netem's default queue, in packets
MAX_TIME = 60.0  # seconds: beyond this a "delay" is a stalled link, not a slow one
MAX_LIMIT = 100_000  # packets held per peer and direction (each at most one datagram)
_TIME_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "ms": 1e-3,
    "msec": 1e-3,
    "msecs": 1e-3,
    "us": 1e-6,
    "usec": 1e-6,
    "usecs": 1e-6,
}
_RATE_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "kibit": 2.0**10,
    "mibit": 2.0**20,
    "gibit": 2.0**30,
    "tibit": 2.0**40,
    "bps": 8.0,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
    "tbps": 8e12,
    "kibps": 8 * 2.0**10,
    "mibps": 8 * 2.0**20,
    "gibps": 8 * 2.0**30,
    "tibps": 8 * 2.0**40,
}
_NUMBER = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-z%]*)$")
KEYWORDS = ("delay", "loss", "duplicate", "corrupt", "reorder", "rate", "limit", "seed")


class ImpairError(ValueError):
    """Impairment words that do not parse; the message names the word and the fix."""


@dataclass(frozen=True)
class GilbertElliott:
    """netem's ``loss gemodel``: P good->bad, R bad->good, the loss probability in the bad
    state (1-H) and in the good one (1-K); defaults as tc-netem(8): R = 1-P, 1-H = 1,
    1-K = 0 (so ``gemodel P`` alone is random loss with probability P)."""

    p: float
    r: float
    bad_loss: float = 1.0
    good_loss: float = 0.0

    def mean_loss(self) -> float:
        """The long-run fraction of packets lost (the chain's stationary mix)."""
        if self.p + self.r == 0:
            return self.good_loss
        bad = self.p / (self.p + self.r)
        return bad * self.bad_loss + (1 - bad) * self.good_loss


@dataclass(frozen=True)
class Spec:
    """What netem would do on one link; probabilities are fractions (0..1), times are
    seconds, the rate bits per second of inner packets (0: none)."""

    delay: float = 0.0
    jitter: float = 0.0
    delay_correlation: float = 0.0
    distribution: str = "uniform"  # of the jitter (netem: uniform without a table)
    loss: float = 0.0  # random loss
    loss_correlation: float = 0.0
    gemodel: GilbertElliott | None = None  # instead of random loss
    duplicate: float = 0.0
    duplicate_correlation: float = 0.0
    corrupt: float = 0.0
    corrupt_correlation: float = 0.0
    reorder: float = 0.0
    reorder_correlation: float = 0.0
    gap: int = 0  # netem's gap: 1 when reorder is given without one
    rate: float = 0.0
    packet_overhead: int = 0  # bytes counted per packet on top of its length, by the rate
    limit: int = DEFAULT_LIMIT
    seed: int | None = None  # the random numbers' seed (default: a fresh one per link)

    def __str__(self) -> str:
        return format_spec(self)

    def is_noop(self) -> bool:
        """Whether it changes nothing at all (every word at its default)."""
        return replace(self, limit=DEFAULT_LIMIT, seed=None) == Spec()


# -- numbers with units ---------------------------------------------------------------


def _split(text: str, what: str) -> tuple[float, str]:
    match = _NUMBER.match(text.lower())
    if match is None:
        raise ImpairError(f"{text!r} is not {what}")
    return float(match.group(1)), match.group(2)


def parse_time(text: str) -> float:
    """``20ms`` -> 0.02 (seconds)."""
    value, unit = _split(text, "a time (e.g. 20ms, 500us, 1s)")
    if not unit:
        raise ImpairError(f"{text!r} needs a unit: {text}ms, {text}us or {text}s")
    if unit not in _TIME_UNITS:
        raise ImpairError(f"{text!r}: unknown time unit {unit!r} (s, ms, us)")
    seconds = value * _TIME_UNITS[unit]
    if seconds > MAX_TIME:
        raise ImpairError(f"{text!r}: at most {MAX_TIME:g}s")
    return seconds


def parse_percent(text: str) -> float:
    """``1%`` or ``1`` -> 0.01, as tc reads a percentage."""
    value, unit = _split(text, "a percentage (e.g. 1%, 0.5%)")
    if unit not in ("", "%"):
        raise ImpairError(f"{text!r} is not a percentage (e.g. 1%, 0.5%)")
    if value > 100:
        raise ImpairError(f"{text!r}: a percentage is at most 100%")
    return value / 100


def parse_rate(text: str) -> float:
    """``100mbit`` -> 1e8 (bits per second)."""
    value, unit = _split(text, "a rate (e.g. 100mbit, 1gbit, 500kbit)")
    if not unit:
        raise ImpairError(f"{text!r} needs a unit: {text}kbit, {text}mbit, {text}gbit, ...")
    if unit not in _RATE_UNITS:
        known = ", ".join(_RATE_UNITS)
        raise ImpairError(f"{text!r}: unknown rate unit {unit!r} ({known})")
    bits = value * _RATE_UNITS[unit]
    if bits < 8:
        raise ImpairError(f"{text!r}: a rate is at least 8bit (one byte a second)")
    return bits


def _integer(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ImpairError(f"{text!r} is not {what}") from None
    if not low <= value <= high:
        raise ImpairError(f"{what} {value}: must be {low} to {high}")
    return value


def format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.6g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.6g}ms"
    return f"{seconds * 1e6:.6g}us"


def format_percent(fraction: float) -> str:
    return f"{fraction * 100:.6g}%"


def format_rate(bits: float) -> str:
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.12g}{unit}"
    return f"{bits:.12g}bit"


# -- the words ---------------------------------------------------------------------


class _Words:
    """The words left to read, with lookahead for the optional ones."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.at = 0

    def next(self, what: str, after: str) -> str:
        if self.at >= len(self.words):
            raise ImpairError(f"{after} needs {what}")
        word = self.words[self.at]
        self.at += 1
        return word

    def optional(self) -> str | None:
        """The next word if it is not a keyword (an optional argument), else None."""
        if self.at >= len(self.words):
            return None
        word = self.words[self.at]
        if word.lower() in KEYWORDS or word.lower() in ("distribution", "gap"):
            return None
        self.at += 1
        return word

    def more(self) -> bool:
        return self.at < len(self.words)


def _percent_and_correlation(words: _Words, name: str) -> tuple[float, float]:
    percent = parse_percent(words.next("a percentage", name))
    correlation = words.optional()
    return percent, parse_percent(correlation) if correlation is not None else 0.0


def _delay(words: _Words, found: dict[str, Any]) -> None:
    found["delay"] = parse_time(words.next("a time (e.g. delay 20ms)", "delay"))
    jitter = words.optional()
    if jitter is not None:
        found["jitter"] = parse_time(jitter)
        correlation = words.optional()
        if correlation is not None:
            found["delay_correlation"] = parse_percent(correlation)


def _loss(words: _Words, found: dict[str, Any]) -> None:
    first = words.next("a percentage (e.g. loss 1%)", "loss").lower()
    if first == "state":
        raise ImpairError(
            "loss state (netem's 4-state model) is not supported: use loss random or loss gemodel"
        )
    if first == "gemodel":
        p = parse_percent(words.next("P (e.g. loss gemodel 1% 30%)", "loss gemodel"))
        rest: list[float] = []
        while len(rest) < 3 and (word := words.optional()) is not None:
            rest.append(parse_percent(word))
        r = rest[0] if rest else 1 - p
        found["gemodel"] = GilbertElliott(p, r, *rest[1:])
        return
    if first == "random":
        first = words.next("a percentage (e.g. loss random 1%)", "loss random")
    found["loss"] = parse_percent(first)
    correlation = words.optional()
    if correlation is not None:
        found["loss_correlation"] = parse_percent(correlation)


def _reorder(words: _Words, found: dict[str, Any]) -> None:
    found["reorder"], found["reorder_correlation"] = _percent_and_correlation(words, "reorder")
    if words.more() and words.words[words.at].lower() == "gap":
        words.at += 1
        found["gap"] = _integer(words.next("a distance", "gap"), "a gap", 1, 2**31 - 1)


def _rate(words: _Words, found: dict[str, Any]) -> None:
    found["rate"] = parse_rate(words.next("a rate (e.g. rate 100mbit)", "rate"))
    overhead = words.optional()
    if overhead is not None:
        found["packet_overhead"] = _integer(overhead, "a packet overhead", -1500, 65535)
        if words.optional() is not None:
            raise ImpairError("rate: CELLSIZE and CELLOVERHEAD are not supported")


def _word(words: _Words, keyword: str, found: dict[str, Any]) -> None:
    """One keyword and its arguments into ``found``."""
    if keyword in found or (keyword == "loss" and "gemodel" in found):
        raise ImpairError(f"{keyword} is given twice")
    if keyword == "delay":
        _delay(words, found)
    elif keyword == "loss":
        _loss(words, found)
    elif keyword in ("duplicate", "corrupt"):
        found[keyword], found[f"{keyword}_correlation"] = _percent_and_correlation(words, keyword)
    elif keyword == "reorder":
        _reorder(words, found)
    elif keyword == "rate":
        _rate(words, found)
    elif keyword == "limit":
        found["limit"] = _integer(
            words.next("a number of packets", "limit"), "a limit", 1, MAX_LIMIT
        )
    elif keyword == "seed":
        found["seed"] = _integer(words.next("a number", "seed"), "a seed", 0, 2**64 - 1)
    elif keyword == "distribution":
        name = words.next(f"one of {', '.join(DISTRIBUTIONS)}", "distribution").lower()
        if name not in DISTRIBUTIONS:
            raise ImpairError(f"unknown distribution {name!r} ({', '.join(DISTRIBUTIONS)})")
        found["distribution"] = name
    else:
        raise ImpairError(
            f"unknown word {keyword!r} (netem's: {', '.join(KEYWORDS)}, distribution)"
        )


def parse_spec(words: list[str] | str) -> Spec:
    """netem's words (a list, or one string) -> ``Spec``; ImpairError names what is wrong."""
    if isinstance(words, str):
        words = words.split()
    if not words:
        raise ImpairError("no impairment given (e.g. delay 20ms 5ms loss 1% rate 100mbit)")
    reader = _Words(list(words))
    found: dict[str, Any] = {}
    while reader.more():
        _word(reader, reader.next("", "").lower(), found)
    if "loss" in found and "gemodel" in found:
        raise ImpairError("loss is given twice")
    spec = Spec(**found)
    if spec.distribution != "uniform" and not spec.jitter:
        raise ImpairError(f"distribution {spec.distribution} needs a jitter (delay 20ms 5ms ...)")
    if spec.reorder:
        if not spec.delay:
            raise ImpairError("reordering not possible without specifying some delay")
        if not spec.gap:
            spec = replace(spec, gap=1)  # as tc does
    return spec


def format_spec(spec: Spec) -> str:
    """``spec`` in netem's words, as `overlay status` shows it (parses back to itself)."""
    words: list[str] = []
    if spec.delay or spec.jitter:
        words += ["delay", format_time(spec.delay)]
        if spec.jitter:
            words.append(format_time(spec.jitter))
            if spec.delay_correlation:
                words.append(format_percent(spec.delay_correlation))
            if spec.distribution != "uniform":
                words += ["distribution", spec.distribution]
    if spec.gemodel is not None:
        ge = spec.gemodel
        words += ["loss", "gemodel"]
        words += [format_percent(x) for x in (ge.p, ge.r, ge.bad_loss, ge.good_loss)]
    elif spec.loss:
        words += ["loss", format_percent(spec.loss)]
        if spec.loss_correlation:
            words.append(format_percent(spec.loss_correlation))
    for name in ("duplicate", "corrupt", "reorder"):
        value = getattr(spec, name)
        if value:
            words += [name, format_percent(value)]
            correlation = getattr(spec, f"{name}_correlation")
            if correlation:
                words.append(format_percent(correlation))
    if spec.reorder and spec.gap != 1:
        words += ["gap", str(spec.gap)]
    if spec.rate:
        words += ["rate", format_rate(spec.rate)]
        if spec.packet_overhead:
            words.append(str(spec.packet_overhead))
    if spec.limit != DEFAULT_LIMIT:
        words += ["limit", str(spec.limit)]
    if spec.seed is not None:
        words += ["seed", str(spec.seed)]
    return " ".join(words) or "limit 1000"
