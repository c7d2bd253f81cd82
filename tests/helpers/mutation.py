"""Hypothesis mutations of valid input: a few edits to a well-formed frame reach the
codecs' corner cases far more often than random bytes do."""

from __future__ import annotations

from hypothesis import strategies as st


def mutate(draw: st.DrawFn, raw: bytearray, max_edits: int, hot: int) -> bytes:
    """1..``max_edits`` random edits of ``raw`` (set or flip a byte, truncate, append,
    delete); byte edits land in the first ``hot`` bytes, where the decisions are made."""
    for _ in range(draw(st.integers(1, max_edits))):
        action = draw(st.sampled_from(["set", "flip", "truncate", "append", "delete"]))
        if action in ("set", "flip") and raw:
            index = draw(st.integers(0, min(len(raw), hot) - 1))
            if action == "set":
                raw[index] = draw(st.integers(0, 255))
            else:
                raw[index] ^= 1 << draw(st.integers(0, 7))
        elif action == "truncate":
            del raw[draw(st.integers(0, len(raw))) :]
        elif action == "append":
            raw += draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and raw:
            del raw[draw(st.integers(0, len(raw) - 1))]
    return bytes(raw)
