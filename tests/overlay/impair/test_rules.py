"""A node's impairment rules (overlay.impair.rules): what `overlay impair` and `--impair`
change, which rule each peer and direction gets, and that a link keeps its model (its
queue and random state) until its own rule changes."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.lease import Lease
from control.peer_table import PeerTable
from overlay.impair.links import Links
from overlay.impair.rules import Change, Rules
from overlay.impair.spec import ImpairError, parse_spec

A = Lease(IPv4Network("198.18.2.0/24"), IPv4Address("192.0.2.2"))
B = Lease(IPv4Network("198.18.3.0/24"), IPv4Address("192.0.2.3"))


def table(*leases: Lease) -> PeerTable:
    peers = PeerTable(8285)
    for lease in leases:
        peers.upsert(lease)
    return peers


def test_flags_make_changes_with_netem_defaults() -> None:
    change = Change.make(None, None, "delay 20ms")
    assert (change.peer, change.directions) == (None, ("out",))  # netem: egress
    assert Change.make(None, None, None).directions == ("out", "in")  # --clear: all
    assert Change.make("198.18.2.0/24", "both", "loss 1%").directions == ("out", "in")
    words = Change.from_words("peer 198.18.2.0/24 direction in rate 10mbit")
    assert words == Change(A.subnet, ("in",), parse_spec("rate 10mbit"))
    assert Change.from_json(words.to_json()) == words


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: Change.make("foo", None, "delay 1ms"), "is not a subnet"),
        (lambda: Change.make("198.18.2.1/24", None, "delay 1ms"), "is not a subnet"),
        (lambda: Change.make(None, "sideways", "delay 1ms"), "direction 'sideways'"),
        (lambda: Change.from_words("peer 198.18.2.0/24"), "no netem words"),
        (lambda: Change.from_json([1]), "JSON object"),
        (lambda: Change.from_json({"netem": 5}), "netem must be a string"),
        (lambda: Rules.from_json({"peer": None}), "JSON list"),
    ],
)
def test_bad_changes_are_one_line(make: Any, says: str) -> None:
    with pytest.raises(ImpairError, match=says):
        make()


def test_set_replace_and_clear() -> None:
    rules = Rules().changed(Change.make(None, "both", "delay 5ms"))
    rules = rules.changed(Change.make("198.18.2.0/24", None, "loss 1%"))
    assert [(str(r.peer), r.direction, str(r.spec)) for r in rules] == [
        ("None", "out", "delay 5ms"),
        ("None", "in", "delay 5ms"),
        ("198.18.2.0/24", "out", "loss 1%"),
    ]
    replaced = rules.changed(Change.make("198.18.2.0/24", "out", "loss 2%"))
    assert replaced.get(A.subnet, "out") == parse_spec("loss 2%")
    one_gone = rules.changed(Change.make("198.18.2.0/24", None, None))
    assert one_gone.get(A.subnet, "out") is None and one_gone.get(None, "out") is not None
    assert not rules.changed(Change.make(None, None, None))  # --clear: everything
    only_in = rules.changed(Change.make(None, "out", None))
    assert only_in.directions() == {"in"}
    assert Rules.from_json(rules.to_json()) == rules
    assert rules != replaced and rules == Rules(list(rules))


def test_a_peer_s_rule_wins_and_every_peer_has_its_own_model() -> None:
    peers = table(A, B)
    rules = Rules().changed(Change.make(None, None, "delay 5ms"))
    rules = rules.changed(Change.make(str(A.subnet), None, "loss 100%"))
    links = Links(rules, peers)
    a, b = links.model("192.0.2.2", "out"), links.model("192.0.2.3", "out")
    assert a is not None and b is not None and a is not b
    assert a.spec == parse_spec("loss 100%") and b.spec == parse_spec("delay 5ms")
    assert links.model("192.0.2.2", "in") is None  # no rule in that direction
    assert links.model("192.0.2.99", "out") is None  # not a peer
    # The table changes: a new peer gets the all-peers rule, the others keep their model.
    C = Lease(IPv4Network("198.18.4.0/24"), IPv4Address("192.0.2.4"))
    peers.upsert(C)
    assert links.model("192.0.2.2", "out") is a
    c = links.model("192.0.2.4", "out")
    assert c is not None and c.spec == parse_spec("delay 5ms")
    # Only the link whose rule changed starts over.
    links.set_rules(rules.changed(Change.make(str(B.subnet), None, "delay 6ms")))
    assert links.model("192.0.2.2", "out") is a and links.model("192.0.2.3", "out") is not b
    links.set_rules(Rules())
    assert links.model("192.0.2.2", "out") is None


def test_a_seed_gives_each_link_its_own_repeatable_sequence() -> None:
    rules = Rules().changed(Change.make(None, None, "loss 50% seed 9"))

    def fates(ip: str) -> list[bool]:
        link = Links(rules, table(A, B)).model(ip, "out")
        assert link is not None
        return [bool(link.offer(float(i), 100).sends) for i in range(64)]

    assert fates("192.0.2.2") == fates("192.0.2.2") != fates("192.0.2.3")


@given(st.lists(st.one_of(st.none(), st.text(max_size=30)), max_size=4))
@settings(max_examples=300, deadline=None)
def test_any_request_is_a_change_or_an_impair_error(values: list[str | None]) -> None:
    keys = ["peer", "direction", "netem", "other"][: len(values)]
    request = {key: value for key, value in zip(keys, values, strict=True)}
    try:
        change = Change.from_json(request)
    except ImpairError as e:
        assert "\n" not in str(e)
        return
    assert Change.from_json(change.to_json()) == change
