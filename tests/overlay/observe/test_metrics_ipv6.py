"""Both IP families in /metrics and `overlay status` (issue 20), without a daemon: the
node totals and drops split by a ``family`` label that sums to the totals (hypothesis),
a single-stack node with its ipv4 series only, the kernel's flannel.<VNI> and
flannel-v6.<VNI> side by side, NDP replies, and the status table's IPv6 lines."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.cli import status as status_cli
from overlay.dataplane.counters import Counters
from overlay.observe import metrics
from tests.helpers.observe import metric_samples

DUAL_LEASE = {"subnet": "198.18.1.0/24", "ipv6_subnet": "fd00:10:0:1::/64"}


samples = metric_samples


reasons = st.sampled_from(["tx_no_route", "rx_foreign_source", "rx_ipv6_jumbo", "rx_x"])


@given(
    st.lists(st.integers(0, 10**6), min_size=4, max_size=4),
    st.lists(st.integers(0, 10**6), min_size=4, max_size=4),
    st.dictionaries(reasons, st.integers(1, 1000)),
    st.dictionaries(reasons, st.integers(1, 1000)),
)
@settings(max_examples=80, deadline=None)
def test_totals_and_drops_split_by_family_and_sum_to_the_totals(
    v4: list[int], v6: list[int], drops4: dict[str, int], drops6: dict[str, int]
) -> None:
    counters = Counters()
    names = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")
    for name, a, b in zip(names, v4, v6, strict=True):
        setattr(counters, name, a + b)  # the IPv6 half bumps both, as overlay.dataplane.ipv6
        setattr(counters, f"{name}6", b)
    counters.drops.update(drops4)
    counters.drops.update(drops6)
    counters.drops6.update(drops6)
    got = samples({"counters": counters.snapshot(), "lease": DUAL_LEASE, "peers": []})
    for (_, name, _), a, b in zip(metrics.TRAFFIC, v4, v6, strict=True):
        assert got[(f"overlay_{name}_total", (("family", "ipv4"),))] == a
        assert got[(f"overlay_{name}_total", (("family", "ipv6"),))] == b
    exported: dict[str, dict[str, float]] = {"ipv4": {}, "ipv6": {}}
    for (name, labels), value in got.items():
        if name == "overlay_dropped_packets_total":
            exported[dict(labels)["family"]][dict(labels)["reason"]] = value
    assert exported == {"ipv4": drops4, "ipv6": drops6}


def test_a_single_stack_node_has_only_ipv4_series() -> None:
    counters = Counters()
    counters.tx_packets = 9
    counters.drops["tx_not_ipv4"] = 2
    got = samples({"counters": counters.snapshot(), "lease": {"subnet": "x"}, "peers": []})
    assert got[("overlay_sent_packets_total", (("family", "ipv4"),))] == 9
    assert ("overlay_sent_packets_total", (("family", "ipv6"),)) not in got
    drop = ("overlay_dropped_packets_total", (("family", "ipv4"), ("reason", "tx_not_ipv4")))
    assert got[drop] == 2
    assert not any(name == "overlay_ndp_replies_total" for name, _ in got)


def test_the_kernels_ipv6_link_is_beside_the_ipv4_one() -> None:
    v4 = {"device": "flannel.1", "tx_packets": 7, "rx_bytes": 70, "rx_dropped": 1}
    v6 = {"device": "flannel-v6.1", "tx_packets": 5, "rx_bytes": 50, "tx_errors": 3}
    snapshot = {
        "kernel_counters": v4,
        "kernel_counters6": v6,
        "kernel_is_overlay": True,
        "lease": DUAL_LEASE,
        "peers": [],
    }
    got = samples(snapshot)
    link = "overlay_kernel_link_transmit_packets_total"
    assert got[(link, (("device", "flannel.1"),))] == 7
    assert got[(link, (("device", "flannel-v6.1"),))] == 5
    assert got[("overlay_sent_packets_total", (("family", "ipv4"),))] == 7
    assert got[("overlay_sent_packets_total", (("family", "ipv6"),))] == 5
    assert got[("overlay_received_bytes_total", (("family", "ipv6"),))] == 50
    dropped = "overlay_dropped_packets_total"
    assert got[(dropped, (("family", "ipv4"), ("reason", "kernel_rx_dropped")))] == 1
    assert got[(dropped, (("family", "ipv6"), ("reason", "kernel_tx_errors")))] == 3
    table = status_cli.format_table({**snapshot, "counters": {}})
    assert "kernel     flannel.1: sent 7" in table
    assert "kernel     flannel-v6.1: sent 5" in table


def test_status_shows_the_ipv6_half_of_the_lease_the_traffic_and_the_peers() -> None:
    counters = Counters()
    counters.tx_packets, counters.tx_packets6, counters.rx_packets6 = 10, 4, 3
    counters.drops6["rx_ipv6_jumbo"] = 2
    counters.drops["rx_ipv6_jumbo"] = 2
    lease = {**DUAL_LEASE, "public_ipv6": "2001:db8::1", "key": "k"}
    peer = {
        "subnet": "198.18.2.0/24",
        "public_ip": "192.0.2.2",
        "ipv6_subnet": "fd00:10:0:2::/64",
        "public_ipv6": "2001:db8::2",
    }
    snapshot = {"counters": counters.snapshot(), "lease": lease, "ndp_replies": 6}
    table = status_cli.format_table({**snapshot, "peers": [peer]})
    assert "IPv6 fd00:10:0:1::/64, public 2001:db8::1" in table
    assert "of which IPv6: sent 4 (0 B), received 3 (0 B), dropped 2, NDP replies 6" in table
    assert "  fd00:10:0:2::/64 via 2001:db8::2" in table
    got = samples({**snapshot, "peers": []})
    assert got[("overlay_ndp_replies_total", ())] == 6
