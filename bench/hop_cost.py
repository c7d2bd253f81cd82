"""The dataplane's cost per hop for one ping-sized packet: TUN -> socket (``on_tun_readable``)
and socket -> TUN (the receive callback), on the batching path or the plain one.

Run as root; it makes its own network namespace (a TUN and a UDP socket on lo) and
removes it. Prints the median and p90 wall time per callback after ``--gap`` ms of idling;
for a number that does not depend on the machine's load, count instructions instead: the
difference between two ``--iterations`` values under callgrind is the cost of the
difference in iterations (one TX hop plus one RX callback each)::

    python -m bench.hop_cost [--plain] [--gap MS] [--iterations N]
    valgrind --tool=callgrind python -m bench.hop_cost --iterations 50   # and 250
"""

from __future__ import annotations

import argparse
import functools
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from control.lease import Lease
from control.peer_table import PeerTable
from encap.ipv4 import build_header
from overlay.dataplane.counters import Counters
from overlay.dataplane.udp import UdpDataplane
from overlay.dataplane.udp_socket import open_socket
from tun.device import TunDevice


class _Readers:
    """The event loop's part: what ``dataplane.start()`` registers, so the callbacks timed
    are the ones the daemon's loop calls (with the native module, C functions)."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Callable[[], object]] = {}

    def add_reader(self, fd: int, callback: Callable[..., object], *args: object) -> None:
        self.callbacks[fd] = functools.partial(callback, *args)


def measure(offload: bool, gap: float, iterations: int) -> tuple[list[int], list[int]]:
    """(TX ns, RX ns) per callback, inside the current network namespace."""
    tun = TunDevice("hop0", vnet_hdr=offload)
    for cmd in (
        "ip link set lo up",
        "ip addr add 198.18.1.0/32 dev hop0",
        "ip link set hop0 up mtu 1472",
        "ip route add 198.18.0.0/16 dev hop0",
    ):
        subprocess.run(cmd.split(), check=True)
    sock = open_socket("127.0.0.1", 8285)
    peers = PeerTable(8285)
    peers.upsert(Lease(IPv4Network("198.18.2.0/24"), IPv4Address("127.0.0.1")))
    dp = UdpDataplane(
        tun, sock, peers, IPv4Network("198.18.1.0/24"), Counters(), offload=offload, tun_tso=offload
    )
    readers = _Readers()
    dp.start(readers)  # type: ignore[arg-type]
    transmit, receive = readers.callbacks[tun.fd], readers.callbacks[sock.fileno()]
    into_tun = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # routed into the TUN
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    echo = bytes.fromhex("0800f7ff00000000") + bytes(56)
    ping = build_header(src=bytes([198, 18, 2, 7]), dst=bytes([198, 18, 1, 0]), protocol=1,
                        payload_length=len(echo)) + echo  # fmt: skip
    tx: list[int] = []
    rx: list[int] = []
    for _ in range(iterations):
        time.sleep(gap)
        into_tun.sendto(b"x" * 56, ("198.18.2.9", 9))
        select.select([tun.fd], [], [], 1)
        start = time.perf_counter_ns()
        transmit()
        tx.append(time.perf_counter_ns() - start)
        time.sleep(gap)
        peer.sendto(ping, ("127.0.0.1", 8285))
        select.select([sock], [], [], 1)
        start = time.perf_counter_ns()
        receive()  # the echo, and our own datagram to 127.0.0.1 (dropped: not a peer's)
        rx.append(time.perf_counter_ns() - start)
        try:
            while True:
                os.read(tun.fd, 70000)
        except BlockingIOError:
            pass
    tun.close()
    return tx, rx


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hop_cost", description=__doc__)
    parser.add_argument("--plain", action="store_true", help="the --no-offload path")
    parser.add_argument("--gap", type=float, default=0.0, help="idle ms before each packet")
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.inside:  # re-run inside a namespace of our own
        ns = "hop-" + uuid.uuid4().hex[:8]
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            argv = [sys.executable, "-m", "bench.hop_cost", *sys.argv[1:], "--inside"]
            sys.exit(subprocess.run(["ip", "netns", "exec", ns, *argv]).returncode)
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=True)
    tx, rx = measure(not args.plain, args.gap / 1000, args.iterations)
    path = "plain" if args.plain else "batching"
    for name, values in (("tx", tx), ("rx", rx)):
        values = sorted(values[min(20, len(values) - 1) :])
        median, p90 = values[len(values) // 2], values[int(len(values) * 0.9)]
        print(f"{path} gap {args.gap:g} ms {name}: median {median / 1e3:.1f} us, ", end="")
        print(f"p90 {p90 / 1e3:.1f} us")


if __name__ == "__main__":
    main()
