"""Waiting for a condition without a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def poll(check: Callable[[], Any], timeout: float = 5.0, every: float = 0.05) -> Any:
    """check()'s first truthy result within timeout, else its last (falsy) one."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)
