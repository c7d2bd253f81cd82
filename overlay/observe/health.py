"""What /readyz and /metrics say about the node's health: whether every start-up step is
done and whether the registry answers (the server itself is ``health_server``).

- ``/healthz``: 200 while the process runs (flanneld answers "flanneld is running").
- ``/readyz``: 503 until the lease is held, the datapath (TUN or kernel device, routes) is
  up and subnet.env is written; 200 after; 503 again while the registry has been
  unreachable for longer than ``--registry-timeout`` (the time a starting daemon waits
  for it before giving up). flanneld has no /readyz; a probe of it is ours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STEPS = ("lease", "datapath", "subnet_env")


class RegistryState:
    """Whether the registry answers, as the daemon sees it: a watch or renewal failure
    marks it unreachable (from the first failure on), anything that came back from it
    marks it reachable again. Counts what the watch delivered."""

    def __init__(self) -> None:
        self.down_since: float | None = None  # time.monotonic() of the first failure
        self.connected_once = False
        self.failures = 0
        self.watch_events = 0
        self.resyncs = 0

    def failed(self) -> None:
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.monotonic()

    def answered(self) -> None:
        self.connected_once = True
        self.down_since = None

    @property
    def connected(self) -> bool:
        return self.connected_once and self.down_since is None

    def unreachable_for(self) -> float | None:
        return None if self.down_since is None else time.monotonic() - self.down_since


@dataclass
class Readiness:
    """What /readyz answers: every start-up step done, and the registry not gone for
    longer than ``registry_grace`` seconds."""

    registry_grace: float
    registry: RegistryState = field(default_factory=RegistryState)
    done: set[str] = field(default_factory=set)

    def step(self, name: str) -> None:
        assert name in STEPS, name
        self.done.add(name)

    def check(self) -> tuple[bool, str]:
        missing = [name for name in STEPS if name not in self.done]
        if missing:
            waiting = {"lease": "a lease", "datapath": "the datapath", "subnet_env": "subnet.env"}
            return False, "waiting for " + ", ".join(waiting[m] for m in missing)
        gone = self.registry.unreachable_for()
        if gone is not None and gone > self.registry_grace:
            return False, (
                f"registry unreachable for {gone:.0f} s (more than {self.registry_grace:g} s)"
            )
        return True, "ready"
