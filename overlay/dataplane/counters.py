"""Packet counters: plain ints on the hot path, a dict of drop reasons off it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

BATCH_MAX = 64  # UDP_MAX_SEGMENTS / a GRO receive's most datagrams


@dataclass
class Counters:
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    icmp_unreachable_sent: int = 0
    icmp_frag_needed_sent: int = 0
    # The fast path at work: TCP super-packets read from the TUN (cut into segments here),
    # UDP GSO sends, UDP GRO receives holding more than one datagram, and TCP
    # super-packets written to the TUN (each carries several packets).
    tx_tun_super_packets: int = 0
    tx_gso_sends: int = 0
    rx_gro_receives: int = 0
    rx_tun_super_packets: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    # The IPv6 half's share of the counts above (vxlan with EnableIPv6: it bumps both),
    # so that /metrics can tell the families apart.
    tx_packets6: int = 0
    tx_bytes6: int = 0
    rx_packets6: int = 0
    rx_bytes6: int = 0
    drops6: Counter[str] = field(default_factory=Counter)
    # Batch sizes, for histograms: tx_batch[n] counts sends (sendmsg/sendto) that carried
    # n datagrams, rx_batch[n] receives (recvmsg, a gathered run) that carried n; n is
    # capped at BATCH_MAX. Bumped once per send or receive, never per packet.
    tx_batch: list[int] = field(default_factory=lambda: [0] * (BATCH_MAX + 1))
    rx_batch: list[int] = field(default_factory=lambda: [0] * (BATCH_MAX + 1))
    # Impairment (overlay.dataplane.impaired): "tx_delayed", "rx_duplicated", ... (its
    # drops are in ``drops``: "tx_impair_loss", ...), and the packets held right now.
    impaired: Counter[str] = field(default_factory=Counter)
    impair_queued: int = 0
    # What adds counts kept elsewhere so far to these counters and to the peers' stats
    # (the native drains keep theirs between wake-ups: encap.native.Drains.flush, one
    # per running dataplane). settle() calls each; snapshot() settles first.
    pending: list[Callable[[], object]] = field(default_factory=list, repr=False, compare=False)

    def settle(self) -> None:
        """Make these counters and the peers' ``PeerStats`` complete: call before reading
        either other than through ``snapshot()``."""
        for flush in self.pending:
            flush()

    def snapshot(self) -> dict[str, object]:
        self.settle()
        return {
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "icmp_unreachable_sent": self.icmp_unreachable_sent,
            "icmp_frag_needed_sent": self.icmp_frag_needed_sent,
            "tx_tun_super_packets": self.tx_tun_super_packets,
            "tx_gso_sends": self.tx_gso_sends,
            "rx_gro_receives": self.rx_gro_receives,
            "rx_tun_super_packets": self.rx_tun_super_packets,
            "drops": dict(sorted(self.drops.items())),
            "tx_packets6": self.tx_packets6,
            "tx_bytes6": self.tx_bytes6,
            "rx_packets6": self.rx_packets6,
            "rx_bytes6": self.rx_bytes6,
            "drops6": dict(sorted(self.drops6.items())),
            "impaired": dict(sorted(self.impaired.items())),
            "impair_queued": self.impair_queued,
            "tx_batch": list(self.tx_batch),
            "rx_batch": list(self.rx_batch),
        }


def add_snapshots(snapshots: list[dict[str, object]]) -> dict[str, object]:
    """The sum of several ``Counters.snapshot()``s (one per worker); dicts (drops,
    impaired) by key."""
    sums: Counter[str] = Counter()
    tables: dict[str, Counter[str]] = {"drops": Counter()}
    batches: dict[str, list[int]] = {}
    for snapshot in snapshots:
        for name, value in snapshot.items():
            if isinstance(value, dict):
                tables.setdefault(name, Counter()).update(value)
            elif isinstance(value, list):
                total = batches.setdefault(name, [0] * len(value))
                for i, n in enumerate(value[: len(total)]):
                    total[i] += n
            elif isinstance(value, int):
                sums[name] += value
    return {
        **sums,
        **{name: dict(sorted(table.items())) for name, table in tables.items()},
        **batches,
    }


def sum_ipv6_status(reports: list[dict[str, int]]) -> dict[str, int]:
    """The sum of several ``ipv6_status()``s (vxlan's IPv6 half of each --workers process),
    by key; a process without the half (an empty report, a worker that never reported)
    adds nothing."""
    sums: Counter[str] = Counter()
    for report in reports:
        sums.update({name: value for name, value in report.items() if isinstance(value, int)})
    return dict(sums)
