"""The peer rows of a status answer, and the peers /metrics gives series to.

A status answer at 10,000 peers used to make a dict per peer and encode it, every
answer (~5 us a peer); on a 2-vCPU node that CPU is taken from the drains and the pods
(README, "Scale"). ``PeerRows`` keeps each peer's row as JSON text between answers: the
lease's half is encoded once per ``Peer`` (an edited lease is a new ``Peer``, so it is
encoded again), and a peer that never carried traffic (most of them, at scale) takes its
whole row from there. A peer with traffic gets its counters formatted each answer: its
``last_*_s`` fields move with the clock anyway. ``row`` is the reference the text is
checked against (tests/overlay/node/test_peer_rows.py); ``busiest`` picks the /metrics
peers with one cheap look at each idle peer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from control.peer_table import Peer
from overlay.node.peer_order import Busiest

Reported = list[dict[str, list[float]]]  # what each --workers process counted per peer

# A row's counters while the peer has carried no traffic (what ``row`` gives then).
IDLE_COUNTERS = (
    ', "tx_packets": 0, "tx_bytes": 0, "rx_packets": 0, "rx_bytes": 0, "last_tx_s": null, '
    '"last_tx_at": null, "last_rx_s": null, "last_rx_at": null}'
)
# Kept rows of peers no longer asked for, beyond this share of those asked for, are
# dropped (the next answer's walk keeps only the peers it met).
SLACK = 4


def row(peer: Peer, reported: Reported, counted: bool, now: float, wall: float) -> dict[str, Any]:
    """One peer as `overlay status` shows it; with its traffic when ``counted``."""
    out: dict[str, Any] = {"subnet": peer.name, "public_ip": peer.addr[0], "port": peer.addr[1]}
    lease = peer.lease
    if lease.ipv6_subnet is not None:  # dual stack: its IPv6 half (sharing its counters)
        out["ipv6_subnet"] = str(lease.ipv6_subnet)
        out["public_ipv6"] = str(lease.public_ipv6) if lease.public_ipv6 is not None else None
    if not counted:
        return out
    sums, last = _sums(peer, reported)
    out["tx_packets"], out["tx_bytes"], out["rx_packets"], out["rx_bytes"] = sums
    for key, at in zip(("tx", "rx"), last, strict=True):
        out[f"last_{key}_s"] = round(now - at, 1) if at else None
        out[f"last_{key}_at"] = round(wall - (now - at), 3) if at else None
    return out


def now_and_wall() -> tuple[float, float]:
    return time.monotonic(), time.time()


def rows(peers: Sequence[Peer], reported: Reported, counted: bool) -> list[dict[str, Any]]:
    now, wall = now_and_wall()
    return [row(p, reported, counted, now, wall) for p in peers]


def _sums(peer: Peer, reported: Reported) -> tuple[list[Any], list[float]]:
    """A peer's four counts and its last send and receive, over every forwarding process."""
    s = peer.stats
    sums = [s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes]
    last = [s.last_tx, s.last_rx]
    for theirs in (report[peer.name] for report in reported if peer.name in report):
        sums = [a + int(b) for a, b in zip(sums, theirs[:4], strict=True)]
        last = [max(a, b) for a, b in zip(last, theirs[4:6], strict=True)]
    return sums, last


def traffic(peer: Peer, reported: Reported) -> float:
    """Bytes sent to and received from a peer, by every forwarding process."""
    s = peer.stats
    total: float = s.tx_bytes + s.rx_bytes
    for report in reported:
        theirs = report.get(peer.name)
        if theirs is not None:
            total += theirs[1] + theirs[3]
    return total


def _number(value: Any) -> str:
    """A count as ``json.dumps`` writes it (an int's repr, without the call)."""
    return repr(value) if type(value) is int else json.dumps(value)


def _counters(sums: list[Any], last: list[float], now: float, wall: float) -> str:
    """The counters half of a row as ``json.dumps`` writes it (closing brace included)."""
    tx_packets, tx_bytes, rx_packets, rx_bytes = map(_number, sums)
    text = [
        f', "tx_packets": {tx_packets}, "tx_bytes": {tx_bytes}, '
        f'"rx_packets": {rx_packets}, "rx_bytes": {rx_bytes}'
    ]
    for key, at in zip(("tx", "rx"), last, strict=True):
        if at:
            text.append(
                f', "last_{key}_s": {round(now - at, 1)!r}, '
                f'"last_{key}_at": {round(wall - (now - at), 3)!r}'
            )
        else:
            text.append(f', "last_{key}_s": null, "last_{key}_at": null')
    text.append("}")
    return "".join(text)


class PeerRows:
    """The peers' rows as JSON text, kept between status answers, at two grains:

    - each peer's lease half, keyed by the ``Peer`` object (its id; the entry holds the
      object, so the id is not reused while kept): a new or edited lease is a new
      ``Peer`` and is encoded anew;
    - each slice's whole text while all of its peers are idle (never carried traffic),
      for the peer list it was made from: ``PeerOrder`` hands out a new list after each
      batch, so the same list means the same peers at the same places, and a slice is
      taken as it is after one look at each of its peers' counters.

    Entries of peers no longer asked for (removed, edited) are dropped by the next whole
    walk once they outnumber a ``SLACK``th of the peers (``begin``/``end`` around it)."""

    def __init__(self, clock: Callable[[], tuple[float, float]] = now_and_wall) -> None:
        self.clock = clock  # (time.monotonic(), time.time()): what ``row`` is given
        self._halves: dict[int, tuple[Peer, str]] = {}  # id(peer) -> (peer, lease half)
        self._fresh: dict[int, tuple[Peer, str]] | None = None  # while pruning
        self._list: Sequence[Peer] = []  # the peer list ``_slices`` were made from
        self._slices: dict[tuple[int, int], str] = {}  # (start, stop) -> its idle rows

    def __len__(self) -> int:
        return len(self._halves)

    def begin(self, count: int) -> None:
        """An answer walking ``count`` peers starts: it keeps only the rows it meets
        when too many are kept."""
        self._fresh = {} if len(self._halves) > count + count // SLACK + 16 else None

    def end(self) -> None:
        """The answer's walk met every peer: what it met is what is kept."""
        if self._fresh is not None:
            self._halves, self._fresh = self._fresh, None

    def _half(self, peer: Peer) -> str:
        entry = self._halves.get(id(peer))
        if entry is None or entry[0] is not peer:
            entry = (peer, json.dumps(row(peer, [], False, 0.0, 0.0))[:-1])
            self._halves[id(peer)] = entry
        if self._fresh is not None:
            self._fresh[id(peer)] = entry
        return entry[1]

    def encode(
        self, peers: Sequence[Peer], start: int, stop: int, reported: Reported, counted: bool
    ) -> str:
        """``json.dumps(rows(peers[start:stop], reported, counted))`` without its
        brackets, byte for byte (the clocks read once, when a peer with traffic is met)."""
        if peers is not self._list:
            self._list, self._slices = peers, {}
        idle_only = counted and not reported and self._fresh is None
        if idle_only:
            text = self._slices.get((start, stop))
            if text is not None and _all_idle(peers, start, stop):
                return text
        out: list[str] = []
        append, half = out.append, self._half
        clocks: tuple[float, float] | None = None
        for at in range(start, stop):
            peer = peers[at]
            s = peer.stats
            if not counted:
                append(half(peer) + "}")
            elif not (
                reported
                or s.last_tx
                or s.last_rx
                or s.tx_packets
                or s.rx_packets
                or s.tx_bytes
                or s.rx_bytes
            ):
                append(half(peer) + IDLE_COUNTERS)
            else:
                idle_only = False
                clocks = clocks or self.clock()
                sums, last = _sums(peer, reported)
                append(half(peer) + _counters(sums, last, *clocks))
        text = ", ".join(out)
        if idle_only:
            self._slices[start, stop] = text
        return text


def _all_idle(peers: Sequence[Peer], start: int, stop: int) -> bool:
    """Whether none of ``peers[start:stop]`` has carried traffic (all counters zero)."""
    for at in range(start, stop):
        s = peers[at].stats
        if s.last_tx or s.last_rx or s.tx_packets or s.rx_packets or s.tx_bytes or s.rx_bytes:
            return False
    return True


class BusiestWalk:
    """The ``limit`` peers with most bytes both ways among those walked (in slices), in
    walk order; of equal traffic, the first (what ``Busiest`` picks when offered every
    peer). A peer without bytes is offered only while fewer than ``limit`` of them were:
    a later one can never be picked (``limit`` earlier ones beat it). So the heap sees
    the few peers that carry traffic, and an idle peer costs one look at its counters."""

    def __init__(self, reported: Reported, limit: int) -> None:
        self.reported = reported
        self.limit = limit
        self._busiest = Busiest(limit)
        self._idle = 0  # peers without bytes offered so far

    def walk(self, peers: Iterable[Peer]) -> None:
        reported, offer = self.reported, self._busiest.offer
        for peer in peers:
            s = peer.stats
            if reported or s.tx_bytes or s.rx_bytes:
                offer(peer, traffic(peer, reported))
            elif self._idle < self.limit:
                self._idle += 1
                offer(peer, 0)

    def chosen(self) -> list[Peer]:
        return self._busiest.chosen()
