"""overlay.observe.metrics, .health.Readiness and .drop_log without a daemon: the
exposition parses with prometheus-client's own parser, histograms are cumulative, every
drop reason is exported, and the drop log says each reason once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from overlay.dataplane.counters import BATCH_MAX, Counters
from overlay.observe import drop_log, health, metrics
from overlay.observe.trace import Capture
from tests.helpers.observe import metric_samples

samples = metric_samples


@given(
    st.lists(st.integers(0, 10**6), min_size=BATCH_MAX + 1, max_size=BATCH_MAX + 1),
    st.dictionaries(st.from_regex(r"(rx|tx)_[a-z_]{1,20}", fullmatch=True), st.integers(1, 10**9)),
)
@settings(max_examples=60, deadline=None)
def test_histograms_are_cumulative_and_every_drop_reason_is_exported(
    batches: list[int], drops: dict[str, int]
) -> None:
    counters = Counters()
    counters.tx_batch[:] = batches
    counters.drops.update(drops)
    got = samples({"counters": counters.snapshot(), "peers": []})
    for bound in metrics.BATCH_BUCKETS:
        key = ("overlay_send_batch_datagrams_bucket", (("le", f"{float(bound)}"),))
        want = sum(batches[: bound + 1])
        assert got.get(key, got.get((key[0], (("le", str(bound)),)))) == want
    assert got[("overlay_send_batch_datagrams_count", ())] == sum(batches)
    assert got[("overlay_send_batch_datagrams_sum", ())] == sum(
        n * c for n, c in enumerate(batches)
    )
    exported = {
        dict(labels)["reason"]: value
        for (name, labels), value in got.items()
        if name == "overlay_dropped_packets_total"
    }
    assert exported == drops


def test_workers_kernel_and_repairs_are_read_defensively() -> None:
    worker = {"index": 1, "alive": False, "counters": {"tx_packets": 5, "drops": {"rx_x": 2}}}
    got = samples({"workers": [worker], "repairs": {"fdb": 2, "bogus": "n/a"}, "peers": []})
    assert got[("overlay_worker_up", (("worker", "1"),))] == 0
    assert got[("overlay_worker_sent_packets_total", (("worker", "1"),))] == 5
    assert got[("overlay_worker_dropped_packets_total", (("reason", "rx_x"), ("worker", "1")))] == 2
    assert got[("overlay_kernel_repairs_total", (("kind", "fdb"),))] == 2
    assert ("overlay_kernel_repairs_total", (("kind", "bogus"),)) not in got
    kernel = {"device": "flannel.1", "tx_packets": 7, "rx_dropped": 1}
    got = samples({"kernel_counters": kernel, "kernel_is_overlay": True, "peers": []})
    assert got[("overlay_sent_packets_total", (("family", "ipv4"),))] == 7
    v4_drop = (("family", "ipv4"), ("reason", "kernel_rx_dropped"))
    assert got[("overlay_dropped_packets_total", v4_drop)] == 1
    assert got[("overlay_kernel_link_transmit_packets_total", (("device", "flannel.1"),))] == 7
    assert metrics.codecs({"native_codecs": True}) == "native"
    assert metrics.codecs({"udp_gso": True}) == "pure"


def test_impairment_rules_and_what_they_did_are_exported() -> None:
    counters = Counters()
    counters.impaired.update({"tx_delayed": 7, "rx_duplicated": 2, "tx_corrupted": 1})
    counters.drops.update({"tx_impair_loss": 3, "rx_impair_limit": 4})
    counters.impair_queued = 5
    rules = [
        {"peer": None, "direction": "out", "netem": "delay 20ms loss 1%"},
        {"peer": "198.18.3.0/24", "direction": "in", "netem": "rate 10mbit"},
    ]
    got = samples({"counters": counters.snapshot(), "impairment": rules, "peers": []})
    rule = "overlay_impairment_rule"
    assert got[(rule, (("direction", "out"), ("netem", "delay 20ms loss 1%"), ("peer", "all")))]
    assert got[(rule, (("direction", "in"), ("netem", "rate 10mbit"), ("peer", "198.18.3.0/24")))]
    assert got[("overlay_impair_delayed_packets_total", (("direction", "out"),))] == 7
    assert got[("overlay_impair_delayed_packets_total", (("direction", "in"),))] == 0
    assert got[("overlay_impair_duplicated_packets_total", (("direction", "in"),))] == 2
    assert got[("overlay_impair_corrupted_packets_total", (("direction", "out"),))] == 1
    assert got[("overlay_impair_queued_packets", ())] == 5
    v4 = ("family", "ipv4")
    assert got[("overlay_dropped_packets_total", (v4, ("reason", "tx_impair_loss")))] == 3
    assert got[("overlay_dropped_packets_total", (v4, ("reason", "rx_impair_limit")))] == 4
    without = samples({"counters": Counters().snapshot(), "peers": []})  # a kernel datapath
    assert not any(name.startswith("overlay_impair") for name, _ in without)


def test_what_the_health_server_met_is_exported() -> None:
    served = {"open": 3, "served": 120, "evicted": 7, "timed_out": 2, "accept_pauses": 4}
    got = samples({"health_server": {**served, "accept_errors": 1}, "peers": []})
    assert got[("overlay_health_connections", ())] == 3
    assert got[("overlay_health_requests_total", ())] == 120
    assert got[("overlay_health_connections_closed_total", (("reason", "evicted"),))] == 7
    assert got[("overlay_health_connections_closed_total", (("reason", "timed_out"),))] == 2
    assert got[("overlay_health_accept_pauses_total", ())] == 4
    assert got[("overlay_health_accept_errors_total", ())] == 1
    assert not any(name.startswith("overlay_health_") for name, _ in samples({"peers": []}))


def test_readiness_waits_for_every_step_and_for_the_registry() -> None:
    ready = health.Readiness(registry_grace=0.2)
    assert ready.check() == (False, "waiting for a lease, the datapath, subnet.env")
    for step in health.STEPS:
        ready.step(step)
    assert ready.check() == (True, "ready")
    ready.registry.failed()
    assert ready.check()[0] is True  # within the grace
    time.sleep(0.25)
    ok, reason = ready.check()
    assert not ok and reason.startswith("registry unreachable for 0 s (more than 0.2 s)")
    ready.registry.answered()
    assert ready.check() == (True, "ready")


async def test_drop_log_says_each_reason_once_then_sums_up(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[tuple[str, str, dict[str, Any]]] = []

    class Log:
        def warning(self, event: str, **fields: Any) -> None:
            lines.append(("warning", event, fields))

        def info(self, event: str, **fields: Any) -> None:
            lines.append(("info", event, fields))

    drops = drop_log.Drops()
    captures: list[Any] = []

    def start(request: Any, emit: Any) -> int:
        captures.append(request)
        packet = bytes.fromhex("450000540000400040019999c612fe09c6122d05") + b"\x08" + bytes(63)
        emit(Capture(0, "tx", 0, packet, 84, "dropped: tx_no_route"))
        return 1

    monkeypatch.setattr(drop_log, "SUMMARY_INTERVAL", 0.0)
    log = drop_log.DropLog(Log(), lambda: dict(drops), start, lambda handle: None)
    drops.on_new = log.notice
    drops["tx_no_route"] += 1  # noticed at once, through __missing__
    drops["tx_no_route"] += 1
    await asyncio.sleep(0.05)
    first = [fields for level, event, fields in lines if event == "packet_dropped"]
    assert len(first) == 1 and captures[0].filter == "reason tx_no_route"
    assert first[0]["packet"] == "IP 198.18.254.9 > 198.18.45.5: ICMP echo request"
    assert first[0]["length"] == 84 and first[0]["count"] == 2
    log.check()  # nothing new since the first line
    assert [e for _, e, _ in lines] == ["packet_dropped"]
    drops["tx_no_route"] += 3
    log.check()
    assert lines[-1] == ("info", "packets_dropped", {"since_s": 0, "tx_no_route": 3})
    drops["tx_no_route"] += 1
    log.check()
    assert sum(1 for _, e, _ in lines if e == "packet_dropped") == 1  # never again


_label_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


@given(
    st.sampled_from(["counter", "gauge", "histogram"]),
    st.text(max_size=30),
    st.lists(st.tuples(_label_text, st.integers(0, 10**12)), max_size=70),
    st.integers(1, 20),
    st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_a_family_rendered_in_pieces_is_the_family_rendered_whole(
    kind: str, doc: str, rows: list[tuple[str, int]], per_piece: int, created: bool
) -> None:
    """The /metrics page is rendered a few samples at a time (the loop gets its turn
    between two pieces): the pieces must join into what prometheus_client renders of the
    whole family, escapes, histograms and ``_created`` samples included."""
    family: Metric
    if kind == "counter":
        family = CounterMetricFamily("overlay_peer_tx", doc, labels=["peer"])
        for n, (label, value) in enumerate(rows):
            family.add_metric([f"{label}{n}"], value, created=1.5 if created else None)
    elif kind == "gauge":
        family = GaugeMetricFamily("overlay_peer_last", doc, labels=["peer"])
        for n, (label, value) in enumerate(rows):
            family.add_metric([f"{label}{n}"], value / 7)
    else:
        family = HistogramMetricFamily("overlay_batch", doc, labels=["peer"])
        for n, (label, value) in enumerate(rows):
            family.add_metric([f"{label}{n}"], [("1.0", value), ("+Inf", value + 1)], value)
    pieces = list(metrics.render_pieces(family, per_piece))
    assert b"".join(pieces) == metrics.render_families([family])
    if not created and len(family.samples) > per_piece:
        assert len(pieces) == -(-len(family.samples) // per_piece)
