"""A timer the event loop can wait on with microsecond resolution: a timerfd on
CLOCK_MONOTONIC (``time.monotonic()``'s clock), registered with ``loop.add_reader``.

The loop's own timers (``loop.call_at``) are millisecond-grained under uvloop (libuv
rounds every timeout to a millisecond): a 20 ms delay would land anywhere in a 2 ms window.
Python has ``os.timerfd_create`` only from 3.13, so libc is called through ctypes.
"""

from __future__ import annotations

import ctypes
import os

CLOCK_MONOTONIC = 1
TFD_TIMER_ABSTIME = 1
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class MonotonicTimer:
    """One-shot, re-armable: ``fd`` turns readable at the time last given to ``arm``."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"timerfd_create: {os.strerror(error)}")
        self.fd: int = fd

    def arm(self, at: float) -> None:
        """Fire at ``at`` (a ``time.monotonic()`` value; a time past fires at once)."""
        at = max(at, 1e-6)  # an all-zero value would disarm it
        seconds = int(at)
        value = _Timespec(seconds, int((at - seconds) * 1e9))
        self._settime(_Itimerspec(_Timespec(0, 0), value))

    def disarm(self) -> None:
        self._settime(_Itimerspec(_Timespec(0, 0), _Timespec(0, 0)))

    def _settime(self, spec: _Itimerspec) -> None:
        if _libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"timerfd_settime: {os.strerror(error)}")

    def clear(self) -> None:
        """Consume the expiry, so the fd is no longer readable."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
