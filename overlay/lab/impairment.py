"""Impairment in a topology file, in tc-netem's words (``delay 20ms 5ms loss 1%``), checked
before anything is built, and whether the daemons can apply it.

The words are checked here against netem's grammar (tc-netem(8)) so a bad file fails in
one line naming its key; the daemon that gets them (``overlay run --impair``, ``overlay
impair``) checks them again with its own model. Pure, but for ``daemon_can_impair``,
which asks the installed ``overlay run`` whether it has ``--impair`` at all.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Callable

_TIME = re.compile(r"^\d+(\.\d+)?(s|sec|secs|ms|msec|msecs|us|usec|usecs)?$")
_PERCENT = re.compile(r"^\d+(\.\d+)?%?$")
_RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)?$", re.I)
_COUNT = re.compile(r"^\d+$")
DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")
_Parser = Callable[[list[str]], list[str]]
KEYWORDS = ("delay", "loss", "duplicate", "corrupt", "reorder", "rate", "limit", "seed")


class NetemError(ValueError):
    """Words netem would refuse: what is wrong, and the form it takes."""


def check_netem(words: str) -> str:
    """The words, normalized to single spaces, if netem would take them; else NetemError."""
    tokens = words.split()
    if not tokens:
        raise NetemError("no netem words (e.g. 'delay 20ms 5ms loss 1%')")
    rest = tokens
    seen: set[str] = set()
    while rest:
        keyword, rest = rest[0], rest[1:]
        if keyword not in KEYWORDS:
            raise NetemError(f"{keyword!r} is not a netem word (one of {', '.join(KEYWORDS)})")
        if keyword in seen:
            raise NetemError(f"{keyword!r} twice")
        seen.add(keyword)
        rest = _ARGUMENTS[keyword](rest)
    return " ".join(tokens)


def _take(rest: list[str], pattern: re.Pattern[str], what: str, form: str) -> list[str]:
    if not rest or not pattern.match(rest[0]):
        shown = repr(rest[0]) if rest else "nothing"
        raise NetemError(f"{form}: {shown} is not {what}")
    if pattern is _PERCENT and float(rest[0].rstrip("%")) > 100:
        raise NetemError(f"{form}: {rest[0]} is more than 100%")
    return rest[1:]


def _optional(rest: list[str], pattern: re.Pattern[str]) -> list[str]:
    return rest[1:] if rest and pattern.match(rest[0]) else rest


def _delay(rest: list[str]) -> list[str]:
    form = "delay TIME [JITTER [CORRELATION%]] [distribution NAME]"
    rest = _take(rest, _TIME, "a time (20ms)", form)
    if rest and _TIME.match(rest[0]):
        rest = _optional(rest[1:], _PERCENT)
    if rest and rest[0] == "distribution":
        if len(rest) < 2 or rest[1] not in DISTRIBUTIONS:
            raise NetemError(f"distribution: one of {', '.join(DISTRIBUTIONS)}")
        rest = rest[2:]
    return rest


def _loss(rest: list[str]) -> list[str]:
    if rest and rest[0] == "gemodel":
        rest = _take(rest[1:], _PERCENT, "a percentage", "loss gemodel P [R [1-H [1-K]]]")
        for _ in range(3):
            rest = _optional(rest, _PERCENT)
        return rest
    if rest and rest[0] == "random":
        rest = rest[1:]
    rest = _take(rest, _PERCENT, "a percentage (1%)", "loss [random] PERCENT [CORRELATION%]")
    return _optional(rest, _PERCENT)


def _percent_and_correlation(keyword: str) -> _Parser:
    def parse(rest: list[str]) -> list[str]:
        form = f"{keyword} PERCENT [CORRELATION%]"
        return _optional(_take(rest, _PERCENT, "a percentage", form), _PERCENT)

    return parse


def _reorder(rest: list[str]) -> list[str]:
    rest = _percent_and_correlation("reorder")(rest)
    if rest and rest[0] == "gap":
        rest = _take(rest[1:], _COUNT, "a packet count", "reorder PERCENT [CORR%] [gap N]")
    return rest


def _rate(rest: list[str]) -> list[str]:
    rest = _take(rest, _RATE, "a rate (100mbit)", "rate RATE [packetoverhead BYTES]")
    if rest and rest[0] == "packetoverhead":
        rest = _take(rest[1:], re.compile(r"^-?\d+$"), "bytes", "packetoverhead BYTES")
    return rest


def _count(keyword: str) -> _Parser:
    def parse(rest: list[str]) -> list[str]:
        return _take(rest, _COUNT, "a whole number", f"{keyword} N")

    return parse


_ARGUMENTS: dict[str, _Parser] = {
    "delay": _delay,
    "loss": _loss,
    "duplicate": _percent_and_correlation("duplicate"),
    "corrupt": _percent_and_correlation("corrupt"),
    "reorder": _reorder,
    "rate": _rate,
    "limit": _count("limit"),
    "seed": _count("seed"),
}


@functools.cache
def daemon_can_impair() -> bool:
    """Whether ``overlay run`` in this checkout takes ``--impair`` (the impair feature):
    asked of the program itself, as the lab stands beside the node and cannot import it."""
    proc = subprocess.run(
        [sys.executable, "-m", "overlay", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "--impair" in proc.stdout
