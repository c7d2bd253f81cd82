"""`/metrics`: the daemon's snapshot as Prometheus metrics, built at scrape time.

The dataplane keeps plain integers (``overlay.dataplane.counters``, ``PeerStats``) and
nothing on the hot path knows about Prometheus: a custom collector turns the same
snapshot `overlay status` shows into metric families when a scrape arrives. Names follow
the conventions: ``overlay_`` prefix, ``_total`` for counters, seconds and bytes as units.

With ``--workers N`` the plain families are the sum over the N processes and the
``overlay_worker_*`` families carry each one (label ``worker``; do not sum both). Kernel
datapaths count nothing in this process: for them the node totals come from the kernel's
own link statistics of ``flannel.<VNI>`` (kernel vxlan), and host-gw, which has no device
of its own, reports the underlay link's (``overlay_kernel_link_*``, all of its traffic,
not only the overlay's); per-peer families are absent there, never zeros.

The node totals and the drops carry a ``family`` label, ``ipv4`` or (a dual-stack node)
``ipv6``: the IP version of the path that counted them (the inner packet's; the IPv6
half counts its own share, ``Counters.tx_packets6``..., the kernel's ``flannel-v6.<VNI>``
its own link). Summed over ``family`` they are the node's totals. Per-peer families cover
both halves of a peer's lease under its IPv4 subnet (the halves share their counters:
one series per peer, the documented cardinality bound).
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from overlay.observe.version import version

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Samples rendered in one piece (a few microseconds each): a family of --metrics-peer-limit
# peers is not one long pause of the event loop the drains forward on.
PIECE_SAMPLES = 16
# Samples that generate_latest moves into families of their own after the others.
_SEPARATE_SUFFIXES = ("_created", "_gsum", "_gcount")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 44, 64)  # 44: the most 1472-byte segments in one GSO send
# Counters of overlay.dataplane.counters.Counters other than traffic, drops and batches.
FAST_PATH = {
    "tx_tun_super_packets": ("tun_super_packets_read", "TCP super-packets read from the TUN"),
    "rx_tun_super_packets": ("tun_super_packets_written", "TCP super-packets written to it"),
    "tx_gso_sends": ("udp_gso_sends", "UDP GSO sends (several datagrams in one sendmsg)"),
    "rx_gro_receives": ("udp_gro_receives", "UDP GRO receives holding several datagrams"),
}
TRAFFIC = (
    ("tx_packets", "sent_packets", "packets sent to peers"),
    ("tx_bytes", "sent_bytes", "bytes of inner packets sent to peers"),
    ("rx_packets", "received_packets", "packets received from peers and written to the TUN"),
    ("rx_bytes", "received_bytes", "bytes of inner packets received from peers"),
)
KERNEL_LINK = (
    ("tx_packets", "transmit_packets"),
    ("tx_bytes", "transmit_bytes"),
    ("rx_packets", "receive_packets"),
    ("rx_bytes", "receive_bytes"),
    ("tx_dropped", "transmit_dropped"),
    ("rx_dropped", "receive_dropped"),
    ("tx_errors", "transmit_errors"),
    ("rx_errors", "receive_errors"),
)


def codecs(features: dict[str, Any]) -> str:
    """ "native" when the dataplane says its codecs are the C extension's (a true
    ``native*`` feature), else "pure"."""
    native = any(value for name, value in features.items() if name.startswith("native"))
    return "native" if native else "pure"


def _histogram(name: str, doc: str, counts: list[int]) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    running = 0
    at = 0
    for bound in BATCH_BUCKETS:
        while at < len(counts) and at <= bound:
            running += counts[at]
            at += 1
        buckets.append((str(bound), running))
    running += sum(counts[at:])
    buckets.append(("+Inf", running))
    total = sum(n * c for n, c in enumerate(counts))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


def _counter(name: str, doc: str, value: float, unit: str = "") -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value, unit=unit)


def _gauge(name: str, doc: str, value: float, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value, unit=unit)


def _traffic(counters: dict[str, Any], prefix: str = "overlay_") -> Iterator[Metric]:
    for key, name, doc in TRAFFIC:
        yield _counter(prefix + name, doc, counters.get(key, 0))


def _family_traffic(split: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    """The node totals, one series per IP family (``ipv4``, ``ipv6``)."""
    for key, name, doc in TRAFFIC:
        family = CounterMetricFamily(f"overlay_{name}", f"{doc}, by IP family", labels=["family"])
        for ip_family, counters in split.items():
            family.add_metric([ip_family], counters.get(key, 0))
        yield family


def _drops(split: dict[str, dict[str, int]]) -> CounterMetricFamily:
    family = CounterMetricFamily(
        "overlay_dropped_packets",
        "packets dropped, by IP family and the reason they were counted under",
        labels=["family", "reason"],
    )
    for ip_family, drops in split.items():
        for reason, n in sorted(drops.items()):
            family.add_metric([ip_family, reason], n)
    return family


def by_family(counters: dict[str, Any], dual_stack: bool) -> dict[str, dict[str, Any]]:
    """A datapath's counters split by IP family: the IPv6 half's share (``*6`` keys,
    ``drops6``) and the rest, the IPv4 path's; only ``ipv4`` on a single-stack node."""
    if not dual_stack:
        return {"ipv4": counters}
    ipv6 = {key: counters.get(f"{key}6", 0) for key, _, _ in TRAFFIC}
    ipv4 = {key: counters.get(key, 0) - ipv6[key] for key, _, _ in TRAFFIC}
    drops6 = counters.get("drops6") or {}
    drops = counters.get("drops") or {}
    ipv4["drops"] = {r: n - drops6.get(r, 0) for r, n in drops.items() if n > drops6.get(r, 0)}
    ipv6["drops"] = dict(drops6)
    return {"ipv4": ipv4, "ipv6": ipv6}


def families(st: dict[str, Any]) -> Iterator[Metric]:
    """Every metric family of one snapshot (``overlay.node.view.NodeView.snapshot``)."""
    yield from _process_families(st)
    yield from _lease_families(st.get("lease") or {})
    registry = st.get("registry")
    if isinstance(registry, dict):
        yield from _registry_families(registry)
    yield from _mtu_families(st)
    peers = st.get("peers", [])
    yield _gauge("overlay_peers", "peers in the peer table", st.get("peer_count", len(peers)))
    yield from _peer_families(peers)
    counters = st.get("counters") or {}
    dual_stack = "ipv6_subnet" in (st.get("lease") or {})
    if counters:
        yield from _datapath_families(counters, dual_stack)
    kernel = [k for k in (st.get("kernel_counters"), st.get("kernel_counters6")) if k]
    if kernel:
        own = not counters and bool(st.get("kernel_is_overlay"))
        yield from _kernel_families(kernel, own=own)
    if "impairment" in st:
        yield from _impairment_families(st["impairment"], counters)
    if "arp_replies" in st:
        yield _counter("overlay_arp_replies", "ARP replies sent for our VTEP", st["arp_replies"])
    if "ndp_replies" in st:
        yield _counter(
            "overlay_ndp_replies",
            "neighbour advertisements sent for our IPv6 VTEP address",
            st["ndp_replies"],
        )
    yield from _state_families(st)
    yield from _worker_families(st.get("workers") or [])
    yield from _health_server_families(st.get("health_server") or {})


def _process_families(st: dict[str, Any]) -> Iterator[Metric]:
    """The build, readiness, start time and the log lines lost."""
    info = InfoMetricFamily("overlay_build", "the running build")
    info.add_metric(
        [],
        {
            "version": str(st.get("version") or version()),
            "codecs": codecs(st.get("features") or {}),
            "python": platform.python_version(),
        },
    )
    yield info
    ready = st.get("ready", {})
    yield _gauge("overlay_ready", "1 when /readyz answers 200", 1 if ready.get("ready") else 0)
    if "started_at" in st:
        yield _gauge("overlay_start_time_seconds", "process start (Unix time)", st["started_at"])
    if "log_lines_lost" in st:
        yield _counter(
            "overlay_log_lines_lost",
            "log lines that could not be written (stderr full or gone)",
            st["log_lines_lost"],
        )


def _mtu_families(st: dict[str, Any]) -> Iterator[Metric]:
    """The MTU pods get, the underlay's, and the changes of the underlay's followed."""
    if "mtu" not in st:
        return  # starting: no backend yet
    yield _gauge("overlay_mtu", "the MTU pods get (FLANNEL_MTU)", st["mtu"])
    if "underlay_mtu" in st:
        yield _gauge("overlay_underlay_mtu", "the underlay interface's MTU", st["underlay_mtu"])
    yield _counter(
        "overlay_underlay_mtu_changes",
        "changes of the underlay's MTU the node followed",
        st.get("mtu_changes", 0),
    )


def _lease_families(lease: dict[str, Any]) -> Iterator[Metric]:
    if lease.get("expires") is not None:
        yield _gauge(
            "overlay_lease_expiry_timestamp_seconds",
            "when our subnet lease expires unless renewed (Unix time)",
            lease["expires"],
        )
    if lease.get("next_renewal") is not None:
        yield _gauge(
            "overlay_lease_renewal_timestamp_seconds",
            "when the next renewal of the lease is due (Unix time)",
            lease["next_renewal"],
        )


def _registry_families(registry: dict[str, Any]) -> Iterator[Metric]:
    yield _gauge(
        "overlay_registry_connected",
        "1 while the registry answers (0 from the first failed watch or renewal)",
        1 if registry.get("state") == "connected" else 0,
    )
    for key, name, doc in (
        ("watch_events", "registry_watch_events", "lease events the watch delivered"),
        ("resyncs", "registry_resyncs", "full re-lists of the leases (start, compaction)"),
        ("watch_failures", "registry_failures", "failed watches, renewals and probes"),
    ):
        yield _counter(f"overlay_{name}", doc, registry.get(key, 0))
    if registry.get("watch_revision") is not None:
        yield _gauge(
            "overlay_registry_watch_revision",
            "the registry revision the watch has seen",
            registry["watch_revision"],
        )


def _datapath_families(counters: dict[str, Any], dual_stack: bool) -> Iterator[Metric]:
    """What a datapath in this process counts: traffic, drops, ICMP errors, batching."""
    split = by_family(counters, dual_stack)
    yield from _family_traffic(split)
    yield _drops({ip_family: part.get("drops") or {} for ip_family, part in split.items()})
    yield _counter(
        "overlay_icmp_unreachable_sent",
        "ICMP net-unreachable errors written back into the TUN",
        counters.get("icmp_unreachable_sent", 0),
    )
    yield _counter(
        "overlay_icmp_frag_needed_sent",
        "ICMP frag-needed errors written back into the TUN (packets longer than its MTU)",
        counters.get("icmp_frag_needed_sent", 0),
    )
    for key, (name, doc) in FAST_PATH.items():
        yield _counter(f"overlay_{name}", doc, counters.get(key, 0))
    yield _histogram(
        "overlay_send_batch_datagrams",
        "datagrams per send (sendmsg with UDP GSO, or sendto)",
        counters.get("tx_batch") or [],
    )
    yield _histogram(
        "overlay_receive_batch_datagrams",
        "datagrams per receive (a UDP GRO recvmsg, or a gathered run)",
        counters.get("rx_batch") or [],
    )


IMPAIRED = (
    ("delayed", "packets held back by impairment (delay, jitter, rate)"),
    ("duplicated", "packets sent twice by impairment"),
    ("corrupted", "packets with a bit flipped by impairment"),
    ("reordered", "packets sent ahead of those delayed by impairment (reorder)"),
)


def _impairment_families(rules: list[dict[str, Any]], counters: dict[str, Any]) -> Iterator[Metric]:
    """The rules in force (one series each) and what they did; their drops are in
    overlay_dropped_packets_total (reason tx_impair_loss, rx_impair_limit, ...)."""
    family = GaugeMetricFamily(
        "overlay_impairment_rule",
        "1 for each impairment rule in force (peer: a subnet or all)",
        labels=["peer", "direction", "netem"],
    )
    for rule in rules:
        family.add_metric([rule["peer"] or "all", rule["direction"], rule["netem"]], 1)
    yield family
    impaired = counters.get("impaired") or {}
    for what, doc in IMPAIRED:
        counted = CounterMetricFamily(f"overlay_impair_{what}_packets", doc, labels=["direction"])
        for side, direction in (("tx", "out"), ("rx", "in")):
            counted.add_metric([direction], impaired.get(f"{side}_{what}", 0))
        yield counted
    yield _gauge(
        "overlay_impair_queued_packets",
        "packets held by impairment right now, waiting for their time",
        counters.get("impair_queued", 0),
    )


def _health_server_families(served: dict[str, int]) -> Iterator[Metric]:
    """What the health server met (``overlay.observe.health_server.HealthServer.stats``)."""
    if not served:
        return
    yield _gauge(
        "overlay_health_connections",
        "connections open to /healthz, /readyz, /metrics",
        served.get("open", 0),
    )
    yield _counter(
        "overlay_health_requests", "requests answered (any status)", served.get("served", 0)
    )
    closed = CounterMetricFamily(
        "overlay_health_connections_closed",
        "connections closed before they were answered: evicted (the oldest, when the limit "
        "of open ones was reached) or timed_out",
        labels=["reason"],
    )
    for reason in ("evicted", "timed_out"):
        closed.add_metric([reason], served.get(reason, 0))
    yield closed
    yield _counter(
        "overlay_health_accept_pauses",
        "times accepting rested: the accept budget spent, or out of fds",
        served.get("accept_pauses", 0),
    )
    yield _counter(
        "overlay_health_accept_errors",
        "failed accepts (e.g. out of fds)",
        served.get("accept_errors", 0),
    )


def _state_families(st: dict[str, Any]) -> Iterator[Metric]:
    """The offload features in use and the kernel objects repaired."""
    features = st.get("features") or {}
    if features:
        enabled = GaugeMetricFamily(
            "overlay_feature_enabled", "1 for each active offload feature", labels=["feature"]
        )
        for name, value in sorted(features.items()):
            enabled.add_metric([name], 1 if value else 0)
        yield enabled
    repairs = st.get("repairs")
    if isinstance(repairs, int):
        yield _counter("overlay_kernel_repairs", "kernel objects found wrong and repaired", repairs)
    elif isinstance(repairs, dict):
        family = CounterMetricFamily(
            "overlay_kernel_repairs", "kernel objects found wrong and repaired", labels=["kind"]
        )
        for kind, n in sorted(repairs.items()):
            if isinstance(n, int | float):
                family.add_metric([str(kind)], n)
        yield family


def _peer_families(peers: list[dict[str, Any]]) -> Iterator[Metric]:
    counted = [p for p in peers if "tx_packets" in p]
    if not counted:
        return
    names = (
        ("tx_packets", "sent_packets", "packets sent to the peer"),
        ("tx_bytes", "sent_bytes", "bytes of inner packets sent to the peer"),
        ("rx_packets", "received_packets", "packets received from the peer"),
        ("rx_bytes", "received_bytes", "bytes of inner packets received from the peer"),
    )
    for key, name, doc in names:
        family = CounterMetricFamily(f"overlay_peer_{name}", doc, labels=["peer"])
        for p in counted:
            family.add_metric([p["subnet"]], p.get(key, 0))
        yield family
    for key, name, doc in (
        ("last_tx_at", "last_sent", "when a packet last went to the peer (Unix time)"),
        ("last_rx_at", "last_received", "when a datagram last came from the peer (Unix time)"),
    ):
        stamps = GaugeMetricFamily(f"overlay_peer_{name}_timestamp_seconds", doc, labels=["peer"])
        for p in counted:
            if p.get(key) is not None:
                stamps.add_metric([p["subnet"]], p[key])
        yield stamps


def _kernel_families(links: list[dict[str, Any]], own: bool) -> Iterator[Metric]:
    """The kernel's statistics of the datapath's links (``flannel.<VNI>``, and with
    EnableIPv6 ``flannel-v6.<VNI>``); ``own``: the devices carry only overlay traffic,
    so they are the node totals as well, the first IPv4's, the second IPv6's."""
    for key, name in KERNEL_LINK:
        family = CounterMetricFamily(
            f"overlay_kernel_link_{name}",
            f"the kernel's {key} of the datapath's link",
            labels=["device"],
        )
        for link in links:
            family.add_metric([str(link.get("device", "?"))], link.get(key, 0))
        yield family
    if own:
        split = dict(zip(("ipv4", "ipv6"), links, strict=False))
        yield from _family_traffic(split)
        reasons = ("tx_dropped", "rx_dropped", "tx_errors", "rx_errors")
        yield _drops(
            {
                ip_family: {f"kernel_{reason}": link.get(reason, 0) for reason in reasons}
                for ip_family, link in split.items()
            }
        )


def _worker_families(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    if not workers:
        return
    up = GaugeMetricFamily(
        "overlay_worker_up", "1 while the forwarding process lives", labels=["worker"]
    )
    for w in workers:
        up.add_metric([str(w["index"])], 1 if w.get("alive") else 0)
    yield up
    for key, name, doc in TRAFFIC:
        family = CounterMetricFamily(f"overlay_worker_{name}", doc, labels=["worker"])
        for w in workers:
            family.add_metric([str(w["index"])], (w.get("counters") or {}).get(key, 0))
        yield family
    drops = CounterMetricFamily(
        "overlay_worker_dropped_packets",
        "packets dropped, by worker and reason",
        labels=["worker", "reason"],
    )
    for w in workers:
        for reason, n in sorted(((w.get("counters") or {}).get("drops") or {}).items()):
            drops.add_metric([str(w["index"]), reason], n)
    yield drops


class _Families:
    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def render_families(metrics: Iterable[Metric]) -> bytes:
    """The text exposition of these families: the pages of several calls, joined, are
    one page (each family is whole in one of them)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(metrics))
    return generate_latest(registry)


def render_pieces(family: Metric, samples: int = PIECE_SAMPLES) -> Iterator[bytes]:
    """``render_families([family])`` in pieces of at most ``samples`` samples each, which
    join into exactly that text: the first piece has the HELP and TYPE lines, the others
    only their sample lines. A family with samples that generate_latest moves to the end
    (``_created`` and the like) is one piece."""
    whole = family.samples
    if len(whole) <= samples or any(
        s.name == family.name + suffix for s in whole for suffix in _SEPARATE_SUFFIXES
    ):
        yield render_families([family])
        return
    for start in range(0, len(whole), samples):
        part = copy.copy(family)
        part.samples = whole[start : start + samples]
        text = render_families([part])
        yield text.split(b"\n", 2)[2] if start else text


def render(st: dict[str, Any]) -> bytes:
    """The text exposition of one snapshot."""
    return render_families(families(st))
