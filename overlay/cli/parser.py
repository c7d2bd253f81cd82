"""What every `overlay <command>` front end shares: argparse with one-line usage errors,
and the value parsers whose errors say what was wrong in a few words."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# -- value parsers (each raises ArgumentTypeError with a short reason) -------------------


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool (flanneld's bool flags), plus yes/no/on/off."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def integer(
    what: str, unit: str, low: int, high: int | None = None, why: str = ""
) -> Callable[[str], int]:
    """A parser of whole numbers from ``low`` to ``high`` (inclusive)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (high is not None and value > high):
            bound = f"{low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} {unit}: must be {bound}{why}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


def seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0")
    return value


class BoolFlag(argparse.Action):
    """A Go bool flag: ``--flag`` sets it, ``--flag=false`` (or ``--flag false``) clears it."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("metavar", "BOOL")
        super().__init__(option_strings, dest, nargs="?", const="true", **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        try:
            setattr(namespace, self.dest, parse_bool(str(values)))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None
