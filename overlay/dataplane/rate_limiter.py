"""A token bucket, for errors the dataplane sends back (ICMP) at most so often."""

from __future__ import annotations

import time


class RateLimiter:
    """Token bucket: ``rate`` events per second with a burst of ``burst``."""

    def __init__(self, rate: float = 100.0, burst: int = 100) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
