"""The per-link models of an impaired node: its rules resolved against the peer table.

Apart from ``overlay.impair.rules`` because only a dataplane that is impaired needs the
models (and ``random``, ``heapq``, ``math`` with them); the rules alone are what the flags
and the status socket parse, in every daemon.
"""

from __future__ import annotations

import random

from control.peer_table import PeerTable
from overlay.impair.model import LinkModel
from overlay.impair.rules import DIRECTIONS, Rules
from overlay.impair.spec import Spec


class Links:
    """The model of every impaired (peer, direction): ``rules`` resolved against the
    peer table, again whenever the table changes (``PeerTable`` swaps ``routes`` on
    every change). A node with several leases follows the rule of any of them. A
    dual-stack peer's IPv6 half (its PublicIPv6) is a link of its own, with its own model,
    as flannel-v6.<VNI> is a device apart from flannel.<VNI>; both follow a rule naming
    either subnet of the lease (``overlay.impair.rules``)."""

    def __init__(self, rules: Rules, peers: PeerTable) -> None:
        self.rules = rules
        self.peers = peers
        self._routes: object = None
        self._specs: dict[tuple[str, str], Spec] = {}  # (public IP, direction) -> spec
        self._models: dict[tuple[str, str], LinkModel] = {}

    def set_rules(self, rules: Rules) -> None:
        self.rules = rules
        self._routes = None  # resolved again at the next lookup

    def model(self, ip: str, direction: str) -> LinkModel | None:
        """The model of the link to or from public IP ``ip``; None: not impaired."""
        if self._routes is not self.peers.routes:
            self._resolve()
        key = (ip, direction)
        model = self._models.get(key)
        if model is None:
            spec = self._specs.get(key)
            if spec is None:
                return None
            model = self._models[key] = LinkModel(spec, _random_for(spec, ip, direction))
        return model

    def _resolve(self) -> None:
        rules = self.rules
        specs: dict[tuple[str, str], Spec] = {}
        for direction in DIRECTIONS:
            every = rules.get(None, direction)
            for peer in self.peers.peers():
                lease = peer.lease
                v4, v6 = rules.get(lease.subnet, direction), None
                if lease.ipv6_subnet is not None:
                    v6 = rules.get(lease.ipv6_subnet, direction)
                links = [(peer.addr[0], v4 if v4 is not None else v6)]
                if lease.public_ipv6 is not None and lease.ipv6_subnet is not None:
                    links.append((str(lease.public_ipv6), v6 if v6 is not None else v4))
                for ip, own in links:
                    key = (ip, direction)
                    if own is not None:
                        specs[key] = own
                    elif every is not None:
                        specs.setdefault(key, every)
        # A link whose spec is unchanged keeps its model (its queue, rate and state).
        self._models = {
            key: model for key, model in self._models.items() if specs.get(key) == model.spec
        }
        self._specs = specs
        self._routes = self.peers.routes


def _random_for(spec: Spec, ip: str, direction: str) -> random.Random:
    """A link's random numbers: fresh, or from ``seed`` (each link its own sequence)."""
    if spec.seed is None:
        return random.Random()
    return random.Random(f"{spec.seed}/{ip}/{direction}")
