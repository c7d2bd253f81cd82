"""The one error type the codecs raise, so callers can count drops by reason."""


class CodecError(ValueError):
    """A packet that cannot be decoded; ``reason`` is a short stable label for drop counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
