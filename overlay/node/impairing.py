"""`overlay impair` on a node: the status-socket request that shows or changes the
impairment rules of its in-process datapath (``overlay.impair``), and so every worker's."""

from __future__ import annotations

import asyncio
import json

from control.lease import Lease
from overlay.backends.base import BackendError
from overlay.impair.rules import Change, Rules
from overlay.impair.spec import ImpairError
from overlay.node.state import NodeState


def _checked(node: NodeState, argument: str) -> Rules:
    """The rules the request asks for (the rules in force for an empty one); ValueError
    (ImpairError, BackendError's text) with the line the client shows."""
    backend = node.backend
    if backend is None or node.peers is None:
        raise ValueError("the daemon is still starting: its datapath is not up yet")
    rules = backend.impairment
    if not argument.strip():
        return rules
    try:
        change = Change.from_json(json.loads(argument))
    except json.JSONDecodeError:
        raise ImpairError("an impair request is a JSON object") from None
    peer = change.peer
    leases = [p.lease for p in node.peers.peers()]
    named = {lease.ident for lease in leases} | {lease.ipv6_subnet for lease in leases}
    if peer is not None and peer not in named and peer not in rules.peers():
        known = ", ".join(_names(lease) for lease in leases) or "none yet"
        raise ImpairError(f"no peer {peer} (peers: {known})")
    return rules.changed(change)


def _names(lease: Lease) -> str:
    """A peer as --peer may name it: its subnet, and its IPv6 subnet if it has one."""
    if not lease.has_ipv4 or lease.ipv6_subnet is None:
        return lease.name
    return f"{lease.subnet} ({lease.ipv6_subnet})"


async def serve_impair(
    node: NodeState, argument: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One `overlay impair` client: the rules in force after its change, as JSON, or one
    ``error: ...`` line."""
    try:
        rules = _checked(node, argument)
        backend = node.backend
        assert backend is not None
        if rules != backend.impairment:
            backend.impair(rules)
            node.log.info("impairment_changed", rules=rules.to_json())
    except (ValueError, BackendError) as e:
        writer.write(f"error: {e}\n".encode())
        return
    writer.write(json.dumps({"impairment": rules.to_json()}).encode() + b"\n")
