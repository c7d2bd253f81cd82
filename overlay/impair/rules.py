"""A node's impairments: rules per peer (or for all peers) and direction, and the changes
`overlay impair` and `overlay run --impair` make to them (the per-link models the rules
give against the peer table are ``overlay.impair.links``: a daemon that parses flags
never impaired loads no model).

A rule for a peer (its lease's subnet) wins over the rule for all peers in the same
direction. A dual-stack peer is named by either subnet of its lease, and a rule naming
it covers both families of the link (what an operator means by "the link to that node");
a rule naming one subnet wins, for that family, over a rule naming the other (so
``--peer fd00:10:0:3::/64`` alone can treat IPv6 apart). ``out`` impairs what we send to
a peer, ``in`` what we receive from it (netem on a device impairs its egress: ``out`` is
the default). Every peer gets its own model (its own queue, rate and random state), as
if each link had its own netem.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

from overlay.impair.spec import ImpairError, Spec, format_spec, parse_spec

DIRECTIONS = ("out", "in")
Subnet = IPv4Network | IPv6Network
CHOICES = ("out", "in", "both")


def parse_peer(text: str) -> Subnet:
    """A peer as `overlay status` lists it: its lease's subnet, or its IPv6 subnet."""
    try:
        if "/" not in text:
            raise ValueError(text)
        return ip_network(text)
    except ValueError:
        raise ImpairError(
            f"--peer {text!r} is not a subnet: give a peer's lease as `overlay status` "
            "lists it (e.g. 198.18.3.0/24, or its IPv6 subnet fd00:10:0:3::/64)"
        ) from None


def _directions(text: str) -> tuple[str, ...]:
    if text not in CHOICES:
        raise ImpairError(f"direction {text!r}: one of {', '.join(CHOICES)}")
    return DIRECTIONS if text == "both" else (text,)


@dataclass(frozen=True)
class Rule:
    peer: Subnet | None  # None: every peer without a rule of its own
    direction: str  # "out" or "in"
    spec: Spec

    def to_json(self) -> dict[str, Any]:
        peer = str(self.peer) if self.peer is not None else None
        return {"peer": peer, "direction": self.direction, "netem": format_spec(self.spec)}


@dataclass(frozen=True)
class Change:
    """Set ``spec`` (or clear, when None) for ``peer`` (None: all peers) in ``directions``."""

    peer: Subnet | None
    directions: tuple[str, ...]
    spec: Spec | None

    @classmethod
    def make(cls, peer: str | None, direction: str | None, netem: str | None) -> Change:
        """From `overlay impair`'s flags: a netem text sets (default direction out),
        None clears (default: both directions); ImpairError for anything wrong."""
        subnet = parse_peer(peer) if peer else None
        if netem is None:
            return cls(subnet, _directions(direction or "both"), None)
        return cls(subnet, _directions(direction or "out"), parse_spec(netem))

    @classmethod
    def from_words(cls, text: str) -> Change:
        """`overlay run --impair` 's value: ``[peer SUBNET] [direction out|in|both] NETEM``."""
        words = text.split()
        peer = direction = None
        while len(words) >= 2 and words[0].lower() in ("peer", "direction"):
            if words[0].lower() == "peer":
                peer = words[1]
            else:
                direction = words[1].lower()
            words = words[2:]
        if not words:
            raise ImpairError(f"--impair {text!r}: no netem words (e.g. delay 20ms loss 1%)")
        return cls.make(peer, direction, " ".join(words))

    def to_json(self) -> dict[str, Any]:
        direction = "both" if len(self.directions) == 2 else self.directions[0]
        return {
            "peer": str(self.peer) if self.peer is not None else None,
            "direction": direction,
            "netem": format_spec(self.spec) if self.spec is not None else None,
        }

    @classmethod
    def from_json(cls, value: Any) -> Change:
        """A request from the status socket, checked as the flags are."""
        if not isinstance(value, dict):
            raise ImpairError("an impair request is a JSON object")
        peer, direction, netem = value.get("peer"), value.get("direction"), value.get("netem")
        for name, item in (("peer", peer), ("direction", direction), ("netem", netem)):
            if item is not None and not isinstance(item, str):
                raise ImpairError(f"impair request: {name} must be a string")
        return cls.make(peer, direction, netem)


class Rules:
    """The rules in force, immutable: each change makes a new one."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._rules = {(rule.peer, rule.direction): rule for rule in rules}

    def __iter__(self) -> Iterator[Rule]:
        return iter(sorted(self._rules.values(), key=_order))

    def __bool__(self) -> bool:
        return bool(self._rules)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rules) and self._rules == other._rules

    def __hash__(self) -> int:
        return hash(frozenset(self._rules.items()))

    def get(self, peer: Subnet | None, direction: str) -> Spec | None:
        rule = self._rules.get((peer, direction))
        return rule.spec if rule is not None else None

    def directions(self) -> set[str]:
        return {direction for _, direction in self._rules}

    def peers(self) -> set[Subnet]:
        return {peer for peer, _ in self._rules if peer is not None}

    def changed(self, change: Change) -> Rules:
        rules = dict(self._rules)
        for direction in change.directions:
            if change.spec is not None:
                rules[(change.peer, direction)] = Rule(change.peer, direction, change.spec)
            elif change.peer is None:  # --clear without --peer: everything in that direction
                rules = {key: rule for key, rule in rules.items() if key[1] != direction}
            else:
                rules.pop((change.peer, direction), None)
        return Rules(rules.values())

    def to_json(self) -> list[dict[str, Any]]:
        return [rule.to_json() for rule in self]

    @classmethod
    def from_json(cls, value: Any) -> Rules:
        if not isinstance(value, list):
            raise ImpairError("impairment rules are a JSON list")
        rules = Rules()
        for item in value:
            rules = rules.changed(Change.from_json(item))
        return rules


def _order(rule: Rule) -> tuple[int, int, int, int, int]:
    peer = rule.peer
    version = peer.version if peer is not None else 0
    address = int(peer.network_address) if peer is not None else -1
    prefix = peer.prefixlen if peer is not None else -1
    return (peer is not None, version, address, prefix, DIRECTIONS.index(rule.direction))
