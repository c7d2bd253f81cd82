"""``overlay testbed graph``: the bed as a picture. Its segments, the router, etcd, each
node with its address, lease and backend, and an arrow per peer a node sends to, labelled
with the rate measured over an interval (two status snapshots of its daemon).

Pure: from ``Testbed.status()`` and the daemons' status snapshots to Mermaid text and to
Graphviz DOT (which ``dot -Tsvg`` draws). Kernel datapaths (kernel vxlan, host-gw) count
no per-peer traffic in the daemon: their arrows come from their userspace peers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flow:
    """What node ``source`` sent to node ``target`` per second over the interval."""

    source: str
    target: str
    bits_per_s: float
    packets_per_s: float


def flows(
    bed: dict[str, Any],
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    seconds: float,
) -> list[Flow]:
    """The per-peer rates between two snapshots (by node name), sending nodes only. A
    snapshot's ``sampled_at`` (monotonic seconds), when both have one, gives that node's
    own interval: asked one after another, the nodes' pairs are ``seconds`` plus the
    time a round of questions takes apart."""
    node_of = {n["subnet"]: n["name"] for n in bed["nodes"] if n["subnet"]}
    found = []
    for name, late in sorted(after.items()):
        first = before.get(name, {})
        took = late.get("sampled_at", 0.0) - first.get("sampled_at", 0.0)
        interval = took if "sampled_at" in late and "sampled_at" in first and took > 0 else seconds
        early = {p["subnet"]: p for p in first.get("peers", [])}
        for peer in late.get("peers", []):
            then = early.get(peer["subnet"])
            if then is None or "tx_bytes" not in peer or peer["subnet"] not in node_of:
                continue
            sent = peer["tx_bytes"] - then["tx_bytes"]
            packets = peer["tx_packets"] - then["tx_packets"]
            if packets > 0:
                found.append(
                    Flow(name, node_of[peer["subnet"]], sent * 8 / interval, packets / interval)
                )
    return found


def rate(bits_per_s: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:.1f} {unit}"
    return f"{bits_per_s:.0f} bit/s"


def _node_label(node: dict[str, Any]) -> list[str]:
    underlay = " ".join(a for a in (node["underlay_ip"], node.get("underlay_ip6")) if a)
    subnets = " ".join(node.get("subnets") or ([node["subnet"]] if node["subnet"] else []))
    lines = [node["name"], underlay, subnets or "no lease", node["backend"]]
    if not node["running"]:
        lines.append("daemon not running")
    if node.get("impair"):
        lines.append(f"impair: {node['impair']}")
    return lines


def _segment_id(name: str) -> str:
    return "seg_" + name.replace("-", "_")


def mermaid(bed: dict[str, Any], found: list[Flow]) -> str:
    lines = ["flowchart LR"]
    for segment in bed["segments"]:
        sid = _segment_id(segment["name"])
        lines.append(f'  subgraph {sid}["segment {segment["name"]} {segment["cidr"]}"]')
        for node in bed["nodes"]:
            if node["segment"] == segment["name"]:
                lines.append(f'    {node["name"]}["{"<br/>".join(_node_label(node))}"]')
        lines.append("  end")
    if bed["registry"] == "etcd":
        members = len(bed["etcd_endpoints"])
        lines.append(f'  etcd[("etcd x{members}<br/>{", ".join(bed["etcd_endpoints"])}")]')
    if bed.get("router"):
        lines.append(f'  router{{{{"router {bed["router"]}"}}}}')
        lines += [f"  router --- {_segment_id(s['name'])}" for s in bed["segments"]]
    for flow in found:
        label = f"{rate(flow.bits_per_s)}, {flow.packets_per_s:.0f} pkt/s"
        lines.append(f'  {flow.source} -- "{label}" --> {flow.target}')
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot(bed: dict[str, Any], found: list[Flow]) -> str:
    title = f"testbed {bed['prefix']}: network {bed['network']}, {bed['backend']} backend"
    lines = [
        f"digraph {_quoted('testbed ' + bed['prefix'])} {{",
        "  rankdir=LR; compound=true; node [shape=box, fontname=monospace, fontsize=10];",
        f"  label={_quoted(title)};",
    ]
    for segment in bed["segments"]:
        sid = _segment_id(segment["name"])
        caption = f"segment {segment['name']} {segment['cidr']}"
        lines.append(f"  subgraph cluster_{sid} {{")
        lines.append(f"    label={_quoted(caption)};")
        lines.append(f"    {sid} [shape=point, style=invis];")
        for node in bed["nodes"]:
            if node["segment"] == segment["name"]:
                style = "" if node["running"] else ", style=dashed"
                label = "\\n".join(_node_label(node))
                lines.append(f'    {node["name"]} [label="{label}"{style}];')
        lines.append("  }")
    if bed["registry"] == "etcd":
        endpoints = "\\n".join(bed["etcd_endpoints"])
        lines.append(f'  etcd [shape=cylinder, label="etcd\\n{endpoints}"];')
    if bed.get("router"):
        lines.append(f'  router [shape=hexagon, label="router\\n{bed["router"]}"];')
        for segment in bed["segments"]:
            sid = _segment_id(segment["name"])
            lines.append(f"  router -> {sid} [dir=none, lhead=cluster_{sid}];")
    for flow in found:
        label = f"{rate(flow.bits_per_s)}\\n{flow.packets_per_s:.0f} pkt/s"
        lines.append(f'  {flow.source} -> {flow.target} [label="{label}", color=blue];')
    lines.append("}")
    return "\n".join(lines) + "\n"
