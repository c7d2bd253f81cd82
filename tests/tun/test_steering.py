"""tun.steering: loading the flow-hash program."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from tun.steering import load_hash_program


@pytest.fixture
def signal_storm() -> Iterator[None]:
    """SIGALRM every 5 ms: a daemon's process gets signals (timers, children) too."""
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.netns  # root: loading a BPF program needs CAP_BPF
def test_a_signal_during_the_verifier_does_not_fail_the_load(signal_storm: None) -> None:
    """The verifier answers EAGAIN when a signal arrives while it runs (about 1 load in
    50 here under this storm); the load is retried, as libbpf does, not failed."""
    for _ in range(1000):
        os.close(load_hash_program())
