"""`overlay run --workers N`: what the main process and its forwarding processes say.

The main process keeps the control plane (registry, lease, watch, status) and forwards
queue 0 itself. For queues 1..N-1 it attaches another TUN queue, opens another UDP socket
on the same address with SO_REUSEPORT (vxlan's IPv6 half: one more on our IPv6
underlay address), and starts ``python -m overlay.dataplane.worker`` with both
fds and one end of a socketpair (exec, never fork: the daemon has gRPC threads running).
Each worker runs the backend's own dataplane class on its own uvloop.

The socketpair carries JSON lines. Main -> worker: the spec (what the dataplane needs),
then the full peer table, then every change (``{"add": [[key, value, create_revision]],
"remove": [key]}``, leases in the registry's own key/value form, parsed with
``control.lease``, and their age, which orders a public IP's leases). Worker -> main:
a report (counters, features, its MTU, per-peer traffic) when forwarding starts and every
second after. ``overlay impair`` sends ``{"impair": [rule, ...]}`` (the rules in force, as
``overlay.impair.rules.Rules.to_json``; the spec carries those at start). ``{"mtu": N}``
(main -> worker): the TUN's MTU changed, as the underlay's did (``UdpDataplane.set_mtu``).
``overlay trace`` adds ``{"trace": {"id": N, ...request}}`` and ``{"trace_stop": N}``
(main -> worker) and ``{"capture": [N, ...]}`` (worker -> main: one packet the worker's
tracer kept, merged into the client's stream).
A worker exits on EOF, so a killed main leaves no orphan; the main process warns once
when a worker dies and does not restart it: its TUN queue and socket close with it, so
the kernel steers its share of the traffic to the queues that are left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from control.lease import Lease, ident_of_key, parse_lease
from control.peer_table import PeerTable
from overlay.dataplane.spec import DataplaneSpec
from overlay.observe.log import LogOptions

REPORT_INTERVAL = 1.0
LINE_LIMIT = 64 * 1024 * 1024  # one peer message may carry a large cluster's table
REPORT_BACKLOG = 1024 * 1024  # a main process that stopped reading gets no more reports


@dataclass(frozen=True)
class WorkerSpec:
    """The first line to a worker: its dataplane, and the TUN queue it was handed."""

    dataplane: DataplaneSpec
    node: str  # our public IP, for the worker's log lines
    tun: str  # the TUN's name
    vnet_hdr: bool  # the queue was opened with IFF_VNET_HDR
    offload_features: int  # TUNSETOFFLOAD flags set on the device
    features: dict[str, bool]  # the main process's dataplane features: a worker must match
    log: LogOptions
    impairment: list[dict[str, Any]] = field(default_factory=list)  # Rules.to_json()

    def to_json(self, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "dataplane": self.dataplane.to_json(),
            "node": self.node,
            "tun": self.tun,
            "vnet_hdr": self.vnet_hdr,
            "offload_features": self.offload_features,
            "features": self.features,
            "log_format": self.log.format,
            "v": self.log.verbosity,
            "impairment": self.impairment,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> WorkerSpec:
        return cls(
            dataplane=DataplaneSpec.from_json(value["dataplane"]),
            node=str(value["node"]),
            tun=str(value["tun"]),
            vnet_hdr=bool(value["vnet_hdr"]),
            offload_features=int(value["offload_features"]),
            features={str(k): bool(v) for k, v in value["features"].items()},
            log=LogOptions(str(value.get("log_format", "console")), int(value.get("v", 0))),
            impairment=list(value.get("impairment", [])),
        )


def lease_message(added: list[Lease], removed: list[Lease]) -> bytes:
    """One peer-table change as a JSON line, leases as the registry stores them."""
    message = {
        "add": [[lease.key, lease.value_json(), lease.create_revision] for lease in added],
        "remove": [lease.key for lease in removed],
    }
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def apply_message(peers: PeerTable, message: dict[str, Any]) -> None:
    """Apply a ``lease_message`` to a worker's copy of the peer table, as one batch."""
    peers.apply(
        [
            parse_lease(key, value, create_revision=int(age[0]) if age else 0)
            for key, value, *age in message.get("add", [])  # age: the create revision
        ],
        [ident_of_key(key) for key in message.get("remove", [])],
    )


def peer_report(peers: PeerTable) -> dict[str, list[float]]:
    """Per-peer traffic of this process, by subnet (peers that saw some only):
    [tx packets, tx bytes, rx packets, rx bytes, last tx, last rx (time.monotonic())]."""
    report = {}
    for peer in peers.peers():
        s = peer.stats
        if s.last_tx or s.last_rx:
            row = [s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes, s.last_tx, s.last_rx]
            report[str(peer.lease.subnet)] = row
    return report
