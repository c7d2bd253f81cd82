"""The event loop's part of a dataplane's ``start()``/``stop()`` as a stand-in: the reader
callbacks it registers (with the native module, ``native.Drains``' C methods), so a test
can call exactly what the loop would."""

from __future__ import annotations

from typing import Any


class Readers:
    """Records ``add_reader``/``remove_reader`` as asyncio's loop does them."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Any] = {}

    def add_reader(self, fd: int, callback: Any) -> None:
        self.callbacks[fd] = callback

    def remove_reader(self, fd: int) -> bool:  # as asyncio's: False when none was there
        return self.callbacks.pop(fd, None) is not None
