"""Registry data in messages: shown, never echoed whole (a value may be megabytes)."""

from __future__ import annotations

SHOWN = 80


def clip(value: object, limit: int = SHOWN) -> str:
    """``repr(value)`` cut to about ``limit`` characters, with the full size noted; a
    long string or bytes is cut before it is formatted."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return (
            f"{value[:limit]!r}... ({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
        )
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


def shorten(text: str, limit: int = 40) -> str:
    """A key or a name as written, cut to ``limit`` characters when longer."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
