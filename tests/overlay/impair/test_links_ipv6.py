"""Impairment of a dual-stack peer (issue 20): its IPv6 half (PublicIPv6) is a link of
its own, and a rule naming either subnet of its lease covers both families, the one
naming a family's own subnet winning for that family; `overlay impair --peer` takes an
IPv6 subnet."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from control.lease import Lease
from control.peer_table import PeerTable
from overlay.impair.links import Links
from overlay.impair.rules import Change, Rules, parse_peer
from overlay.impair.spec import ImpairError, parse_spec

DUAL = Lease(
    IPv4Network("198.18.2.0/24"),
    IPv4Address("192.0.2.2"),
    ipv6_subnet=IPv6Network("fd00:10:0:2::/64"),
    public_ipv6=IPv6Address("2001:db8::2"),
)
PLAIN = Lease(IPv4Network("198.18.3.0/24"), IPv4Address("192.0.2.3"))
V4, V6, OTHER = "192.0.2.2", "2001:db8::2", "192.0.2.3"


def links(*changes: str) -> Links:
    peers = PeerTable(8472)
    peers.upsert(DUAL)
    peers.upsert(PLAIN)
    rules = Rules()
    for words in changes:
        rules = rules.changed(Change.from_words(words))
    return Links(rules, peers)


def netem(found: Links, ip: str, direction: str = "out") -> object:
    model = found.model(ip, direction)
    return model.spec if model is not None else None


def test_a_rule_naming_either_subnet_covers_both_families() -> None:
    delay = parse_spec("delay 20ms")
    for name in ("198.18.2.0/24", "fd00:10:0:2::/64"):
        found = links(f"peer {name} delay 20ms")
        assert netem(found, V4) == netem(found, V6) == delay, name
        assert netem(found, OTHER) is None and netem(found, V6, "in") is None


def test_the_rule_naming_a_familys_own_subnet_wins_for_it() -> None:
    found = links("peer 198.18.2.0/24 delay 20ms", "peer fd00:10:0:2::/64 loss 5%", "rate 1mbit")
    assert netem(found, V4) == parse_spec("delay 20ms")
    assert netem(found, V6) == parse_spec("loss 5%")
    assert netem(found, OTHER) == parse_spec("rate 1mbit")  # the rule for all peers


def test_the_rule_for_all_peers_reaches_ipv6_halves_each_with_its_own_model() -> None:
    found = links("direction both delay 5ms")
    assert netem(found, V6, "in") == netem(found, V4, "in") == parse_spec("delay 5ms")
    assert found.model(V6, "out") is not found.model(V4, "out")  # a link apart, as flannel-v6.1


def test_peer_takes_an_ipv6_subnet_and_refuses_what_is_none() -> None:
    assert parse_peer("fd00:10:0:2::/64") == IPv6Network("fd00:10:0:2::/64")
    with pytest.raises(ImpairError, match="or its IPv6 subnet fd00:10:0:3::/64"):
        parse_peer("fd00:10:0:2::1")
    rules = Rules().changed(Change.make("fd00:10:0:2::/64", "in", "delay 1ms"))
    rules = rules.changed(Change.make("198.18.2.0/24", "in", "delay 2ms"))
    assert [r["peer"] for r in rules.to_json()] == ["198.18.2.0/24", "fd00:10:0:2::/64"]
    assert Rules.from_json(rules.to_json()) == rules
