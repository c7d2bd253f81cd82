"""The nftables rule building, sans kernel: flanneld's chains and rules for both families,
the transaction that makes a chain exactly ours, the reading of ``nft -j list table``
back into the same syntax, and what a check finds different."""

from __future__ import annotations

import json
from ipaddress import ip_network

from overlay.kernel.nftables import (
    Listed,
    chain_script,
    differences,
    forward_chain,
    masq_chain,
    parse_listing,
    rule_text,
    table_script,
)

NET4, LEASE4 = ip_network("10.5.0.0/16"), ip_network("10.5.1.0/24")
NET6, LEASE6 = ip_network("fd00:10::/56"), ip_network("fd00:10:0:5::/64")


def test_masq_chain_is_flanneld_postrtg_in_both_families() -> None:
    chain = masq_chain(NET4, LEASE4, random_fully=True)
    assert (chain.name, chain.type, chain.hook, chain.priority, chain.prio) == (
        "postrtg", "nat", "postrouting", "srcnat", 100,
    )  # fmt: skip
    assert chain.rules == (
        "meta mark 0x4000 return",
        "ip saddr 10.5.1.0/24 ip daddr 10.5.0.0/16 return",
        "ip saddr 10.5.0.0/16 ip daddr 10.5.1.0/24 return",
        "ip saddr != 10.5.1.0/24 ip daddr 10.5.0.0/16 return",
        "ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
        "ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random",
    )
    six = masq_chain(NET6, LEASE6, random_fully=False).rules
    assert six[1] == "ip6 saddr fd00:10:0:5::/64 ip6 daddr fd00:10::/56 return"
    assert six[4] == "ip6 saddr fd00:10::/56 ip6 daddr != ff00::/8 masquerade"
    assert six[5] == "ip6 saddr != fd00:10::/56 ip6 daddr fd00:10::/56 masquerade"


def test_forward_chain_accepts_the_network_both_ways() -> None:
    chain = forward_chain(NET6)
    assert (chain.name, chain.type, chain.hook, chain.prio) == ("forward", "filter", "forward", 0)
    assert chain.rules == ("ip6 saddr fd00:10::/56 accept", "ip6 daddr fd00:10::/56 accept")


def test_chain_script_creates_flushes_and_fills_and_recreates_a_changed_hook() -> None:
    chain = forward_chain(NET4)
    assert table_script(4) == 'add table ip flannel-ipv4 { comment "rules for flannel-ipv4" ; }'
    assert chain_script(4, chain, None) == [
        "add chain ip flannel-ipv4 forward { type filter hook forward priority filter ; "
        'comment "chain to accept flannel traffic" ; }',
        "flush chain ip flannel-ipv4 forward",
        "add rule ip flannel-ipv4 forward ip saddr 10.5.0.0/16 accept",
        "add rule ip flannel-ipv4 forward ip daddr 10.5.0.0/16 accept",
    ]
    dropping = Listed(("filter", "forward", 0, "drop"), list(chain.rules))
    assert chain_script(4, chain, dropping)[0] == "delete chain ip flannel-ipv4 forward"
    same = Listed(chain.header, [])
    assert chain_script(4, chain, same)[0].startswith("add chain")


# What nft 1.0.6 lists for a postrtg chain with two of flanneld's rules and an IPv6 one.
LISTING = {
    "nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": "flannel-ipv4", "handle": 1}},
        {
            "chain": {
                "family": "ip",
                "table": "flannel-ipv4",
                "name": "postrtg",
                "handle": 1,
                "type": "nat",
                "hook": "postrouting",
                "prio": 100,
                "policy": "accept",
            }
        },  # fmt: skip
        {
            "rule": {
                "chain": "postrtg",
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 16384}},
                    {"return": None},
                ],
            }
        },
        {
            "rule": {
                "chain": "postrtg",
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                            "right": {"prefix": {"addr": "10.5.0.0", "len": 16}},
                        }
                    },
                    {
                        "match": {
                            "op": "!=",
                            "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                            "right": {"prefix": {"addr": "224.0.0.0", "len": 4}},
                        }
                    },
                    {"masquerade": {"flags": "fully-random"}},
                ],
            }
        },
        {"rule": {"chain": "other", "expr": [{"counter": {"packets": 0, "bytes": 0}}]}},
    ]
}


def test_listing_reads_back_into_our_syntax() -> None:
    chains = parse_listing(json.dumps(LISTING))
    assert chains["postrtg"].header == ("nat", "postrouting", 100, "accept")
    assert chains["postrtg"].rules == [
        "meta mark 0x4000 return",
        "ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
    ]
    # Anything outside our subset never equals one of our rules.
    assert chains["other"].rules == ['{"counter": {"packets": 0, "bytes": 0}}']


def test_rule_text_spellings() -> None:
    host = {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
            "right": "fd00::1",  # a full-length prefix is listed as a lone address
        }
    }
    assert rule_text([host, {"accept": None}]) == "ip6 daddr fd00::1/128 accept"
    assert rule_text([{"masquerade": None}]) == "masquerade"
    assert rule_text([{"masquerade": {"flags": ["random", "persistent"]}}]) == (
        "masquerade random,persistent"
    )


def test_differences_name_what_is_missing_foreign_or_out_of_order() -> None:
    chain = forward_chain(NET4)
    assert differences(chain, Listed(chain.header, list(chain.rules))) == []
    assert differences(chain, None) == [
        "forward: ip saddr 10.5.0.0/16 accept",
        "forward: ip daddr 10.5.0.0/16 accept",
    ]
    extra = Listed(chain.header, [*chain.rules, "drop"])
    assert differences(chain, extra) == ["forward: not ours: drop"]
    swapped = Listed(chain.header, list(reversed(chain.rules)))
    assert differences(chain, swapped) == ["forward: rules out of order"]
    policy = Listed(("filter", "forward", 0, "drop"), list(chain.rules))
    assert differences(chain, policy) == [
        "forward: hook, priority or policy ('filter', 'forward', 0, 'drop')"
    ]
