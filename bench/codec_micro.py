"""``overlay bench`` part 2: per-packet cost of the codecs on the hot path, in ns.

Plain ``timeit`` (best of ``repeat`` rounds, each long enough for ~0.2 s), on a 1400-byte
TCP packet. The numbers include timeit's own loop (~10 ns per iteration on this kind of
machine); they are meant for comparing codecs and commits, not as absolute truths.
``python -m bench.codec_micro`` prints them alone.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from control.lease import Lease
from control.peer_table import PeerTable
from encap import ipv4, udp_frame, vxlan

PACKET_SIZE = 1400
PEERS = 100


def _setup() -> dict[str, object]:
    payload = bytes(range(256)) * 6
    src = IPv4Address("198.18.1.2").packed
    dst = IPv4Address("198.18.51.2").packed  # inside the 51st of 100 peer subnets
    packet = (
        ipv4.build_header(
            src=src, dst=dst, protocol=ipv4.PROTO_TCP, payload_length=PACKET_SIZE - 20
        )
        + payload[: PACKET_SIZE - 20]
    )
    mac = vxlan.vtep_mac("192.0.2.2", 1)
    prefix = vxlan.prefix(1, mac, vxlan.vtep_mac("192.0.2.1", 1))
    table = PeerTable(udp_frame.PORT)
    for i in range(1, PEERS + 1):
        table.upsert(
            Lease(
                subnet=IPv4Network(f"198.18.{i}.0/24"),
                public_ip=IPv4Address(f"192.0.2.{i + 10}"),
                backend_type="udp",
            )
        )
    return {
        "packet": packet,
        "view": memoryview(packet),
        "prefix": prefix,
        "datagram": vxlan.encode(prefix, packet),
        "mac": mac,
        "table": table,
        "udp_frame": udp_frame,
        "vxlan": vxlan,
        "ipv4": ipv4,
    }


# (name, statement): each statement handles one packet.
CASES = [
    ("udp encap (identity)", "udp_frame.encode(packet)"),
    ("vxlan encap (prefix + packet)", "vxlan.encode(prefix, packet)"),
    ("vxlan decode", "vxlan.decode(datagram, vni=1, mac=mac)"),
    ("ipv4.parse", "ipv4.parse(packet)"),
    (f"PeerTable.lookup ({PEERS} peers)", "table.lookup(view[16:20])"),
]


def run(repeat: int = 5, target_seconds: float = 0.2) -> dict[str, float]:
    """ns per packet for every case, best of ``repeat`` rounds."""
    env = _setup()
    results: dict[str, float] = {}
    for name, stmt in CASES:
        timer = timeit.Timer(stmt, globals=env)
        loops = _loops(timer.timeit, target_seconds)
        best = min(timer.repeat(repeat=repeat, number=loops))
        results[name] = best / loops * 1e9
    return results


def _loops(timeit_fn: Callable[[int], float], target: float) -> int:
    loops = 1000
    while (elapsed := timeit_fn(loops)) < target / 4:
        loops *= 4
    return max(1000, int(loops * target / max(elapsed, 1e-9)))


def format_table(results: dict[str, float]) -> str:
    lines = ["| codec (1400 B packet) | ns/packet |", "|---|---:|"]
    lines += [f"| {name} | {ns:.0f} |" for name, ns in results.items()]
    return "\n".join(lines)


def main() -> int:
    print(format_table(run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
