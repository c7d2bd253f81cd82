"""Faults on demand (``overlay testbed fault``): a node's underlay link cut and restored,
its daemon stopped, killed (SIGKILL) and started again, etcd members frozen (SIGSTOP),
thawed, killed and started, a node's impairment changed. Each is done for real and
recorded in the bed's event log (``overlay.lab.events``) with what it touched: the
daemon's old and new pid, the lease it holds after a start, the members' pids, so a
script's timeline can be laid beside what the daemons counted and logged.

A link is cut where a cable would be: the bridge's end of the node's veth goes down, so
the node's ``eth0`` loses its carrier (its addresses and routes stay, as on a real NIC).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from overlay.lab.errors import TestbedError
from overlay.lab.netns import log_tail, pid_alive, terminate
from overlay.lab.testbed import DAEMON_START_TIMEOUT, DAEMON_STOP_TIMEOUT, Testbed
from overlay.observe import status_socket
from tun.rtnl import IPRoute

Event = dict[str, Any]


class Faults:
    """The faults of one bed; every method returns the event it recorded."""

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed

    def _record(self, event: str, **fields: Any) -> Event:
        return self.bed.events.record(event, **fields)

    # -- links ----------------------------------------------------------------------------

    def link(self, i: int, up: bool) -> Event:
        """Node i's underlay link down (the cable pulled) or up again."""
        bed = self.bed
        bed.node_number(f"n{i}")
        with IPRoute(netns=bed.underlay_ns, flags=0) as ipr:
            found = ipr.link_lookup(ifname=bed.veth(i))
            if not found:
                raise TestbedError(f"n{i} has no link {bed.veth(i)} in {bed.underlay_ns}")
            ipr.link("set", index=found[0], state="up" if up else "down")
        return self._record(
            "link_up" if up else "link_down", node=f"n{i}", port=f"{bed.veth(i)}@{bed.underlay_ns}"
        )

    # -- daemons --------------------------------------------------------------------------

    def node_stop(self, i: int, kill: bool = False) -> Event:
        """SIGTERM node i's daemon (SIGKILL after DAEMON_STOP_TIMEOUT), or SIGKILL at once."""
        pid = self._running(i)
        if kill:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + DAEMON_STOP_TIMEOUT
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            terminate([pid], DAEMON_STOP_TIMEOUT)
        return self._record("node_kill" if kill else "node_stop", node=f"n{i}", pid=pid)

    def node_start(self, i: int) -> Event:
        """Start node i's daemon again; returns once it forwards, with its new pid and
        the lease it holds."""
        bed = self.bed
        running = bed._daemon_pid(i)
        if running is not None:
            raise TestbedError(f"n{i}'s daemon is already running (pid {running})")
        since = time.time()
        proc = bed.start_daemon(i)
        status = self._wait_forwarding(i, proc.pid, since)
        return self._record(
            "node_start",
            node=f"n{i}",
            pid=proc.pid,
            subnet=status["lease"]["subnet"],
            started_at=status["started_at"],
        )

    def _running(self, i: int) -> int:
        self.bed.node_number(f"n{i}")
        pid = self.bed._daemon_pid(i)
        if pid is None:
            raise TestbedError(
                f"n{i}'s daemon is not running: `overlay testbed fault node start n{i}` starts it"
            )
        return pid

    def _wait_forwarding(self, i: int, pid: int, since: float) -> dict[str, Any]:
        """Node i's status once the daemon started at ``since`` holds a lease."""
        bed = self.bed
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise TestbedError(
                    f"daemon of n{i} exited after its start: {log_tail(bed.log_file(i))}"
                )
            try:
                status = status_socket.query(bed.status_socket(i), timeout=1.0)
            except (OSError, ValueError):
                status = {}
            if "lease" in status and status.get("started_at", 0) >= since - 1.0:
                return status
            time.sleep(0.05)
        raise TestbedError(
            f"daemon of n{i} did not forward within {DAEMON_START_TIMEOUT:.0f} s: "
            f"{log_tail(bed.log_file(i))}"
        )

    # -- etcd -----------------------------------------------------------------------------

    def etcd(self, action: str, member: int | None = None) -> Event:
        """freeze, thaw, kill or start every etcd member (or one)."""
        bed = self.bed
        if bed.registry != "etcd":
            raise TestbedError(f"testbed {bed.prefix} has no etcd (its registry is a file)")
        etcd = bed.etcd
        pids = etcd.pids(member)
        if action in ("freeze", "thaw", "kill") and not pids:
            which = f"member {member}" if member else "no member"
            raise TestbedError(f"etcd {which} is running: `fault etcd start` starts it")
        if action == "freeze":
            etcd.freeze(member)
        elif action == "thaw":
            etcd.thaw(member)
        elif action == "kill":
            etcd.stop(member)
        elif action == "start":
            etcd.start(member)
            pids = etcd.pids(member)
        else:
            raise TestbedError(f"etcd {action!r}: use freeze, thaw, kill or start")
        members = [member] if member else list(range(1, bed.etcd_members + 1))
        return self._record(f"etcd_{action}", members=members, pids=pids)

    # -- impairment -----------------------------------------------------------------------

    def impair(self, i: int, words: str | None, peer: int | None = None) -> Event:
        """Node i's impairment (of all it sends, or of what goes to node ``peer``), in
        netem's words; None clears it."""
        bed = self.bed
        self._running(i)
        if peer is not None:
            bed.node_number(f"n{peer}")
        bed.impair(i, words, peer)
        fields: dict[str, Any] = {"node": f"n{i}", "peer": f"n{peer}" if peer else None}
        if words is None:
            return self._record("impair_clear", **fields)
        return self._record("impair", **fields, netem=words)

    # -- for a while ------------------------------------------------------------------------

    def for_a_while(
        self, seconds: float, do: Callable[[], Event], undo: Callable[[], Event]
    ) -> list[Event]:
        """``do``, ``seconds`` later ``undo`` (also when interrupted meanwhile)."""
        done = do()
        try:
            time.sleep(seconds)
        finally:
            undone = undo()
        return [done, undone]
