"""What `overlay trace` costs the dataplane: one drain of 44 datagrams from the UDP socket
into the TUN, and one drain of 44 packets from the TUN into one GSO send, without a tap
(the reference), with a tracer whose filter keeps nothing, and with one that keeps
everything (its captures are thrown away: the pcapng stream is not in the numbers).

The dataplane runs through its drain callbacks on real sockets: the UDP socket on
loopback, and for the TUN a SOCK_SEQPACKET socketpair (one packet per read, as a TUN
gives them) whose writes go nowhere. Only the drain call is timed; the variants run
interleaved in one process; the best of each and the ratio to the reference are printed.
Needs no root.

    python -m bench.trace_cost [--rounds 30] [--loops 50]
"""

from __future__ import annotations

import argparse
import socket
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from control.lease import Lease
from control.peer_table import PeerTable
from encap.ipv4 import build_header
from overlay.dataplane.counters import Counters
from overlay.dataplane.udp import UdpDataplane
from overlay.observe import trace

OWN = IPv4Network("198.18.1.0/24")
PEER_IP = "127.0.0.2"
PEER = Lease(IPv4Network("198.18.2.0/24"), IPv4Address(PEER_IP))
COUNT, SIZE = 44, 1400


class _PairTun:
    """A TUN stand-in: the dataplane reads packets from one end of a SOCK_SEQPACKET pair;
    what it writes (received packets) lands in the other end, which is drained."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (self.ours, self.theirs):
            end.setblocking(False)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        self.fd = self.ours.fileno()
        self.vnet_hdr = False
        self.offset = 0

    def enable_vnet_hdr(self) -> bool:
        return False

    def enable_tso(self) -> bool:
        return False

    def write(self, packet: bytes) -> bool:
        self.ours.send(packet)
        return True

    def drain(self) -> None:
        try:
            while self.theirs.recv(65536):
                pass
        except BlockingIOError:
            pass


def _packet(src: bytes, dst: bytes) -> bytes:
    """A UDP packet the receive checks pass: ports, length, no checksum (0 is allowed)."""
    body = SIZE - 20
    udp = struct.pack("!HHHH", 5001, 5001, body, 0) + bytes(body - 8)
    return build_header(src=src, dst=dst, protocol=17, payload_length=body) + udp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trace_cost", description=__doc__)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--loops", type=int, default=50, help="drains per round (default 50)")
    args = parser.parse_args(argv)

    tun = _PairTun()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    peers = PeerTable(sock.getsockname()[1])
    peers.upsert(PEER)
    dataplane = UdpDataplane(tun, sock, peers, OWN, Counters())  # type: ignore[arg-type]
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the peer, and the GSO sink
    peer.bind((PEER_IP, sock.getsockname()[1]))
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    inbound = _packet(b"\xc6\x12\x02\x05", b"\xc6\x12\x01\x05")
    outbound = _packet(b"\xc6\x12\x01\x05", b"\xc6\x12\x02\x05")
    receive = dataplane.on_socket_readable_gro if dataplane.gro else dataplane.on_socket_readable

    def received() -> None:
        for _ in range(COUNT):
            peer.sendto(inbound, sock.getsockname())

    def sent() -> None:
        for _ in range(COUNT):
            tun.theirs.send(outbound)

    def flush() -> None:
        tun.drain()
        try:
            while peer.recv(65536):
                pass
        except BlockingIOError:
            pass

    peer.setblocking(False)
    endpoint = trace.Endpoint("127.0.0.1", sock.getsockname()[1], 0)
    taps: dict[str, trace.Tracer | None] = {
        "no trace": None,
        "trace keeping nothing": trace.Tracer(
            trace.TraceRequest("host 192.0.2.99", 0, 262144), lambda c: None, endpoint, peers
        ),
        "trace keeping all": trace.Tracer(
            trace.TraceRequest("", 0, 262144), lambda c: None, endpoint, peers
        ),
    }
    drains: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        f"socket -> TUN, {COUNT} x {SIZE} B": (received, receive),
        f"TUN -> socket, {COUNT} x {SIZE} B": (sent, dataplane.on_tun_readable),
    }
    for name, (fill, drain) in drains.items():
        best = dict.fromkeys(taps, float("inf"))
        for _ in range(args.rounds):
            for label, tap in taps.items():
                dataplane.tap = tap
                total = 0
                for _ in range(args.loops):
                    fill()
                    started = time.perf_counter_ns()
                    drain()
                    total += time.perf_counter_ns() - started
                    flush()
                best[label] = min(best[label], total / args.loops / 1000)
        reference = best["no trace"]
        shown = ", ".join(
            f"{label} {us:.0f} us ({us / reference:.2f}x)" for label, us in best.items()
        )
        print(f"{name}: {shown}")
    dataplane.tap = None
    print(f"moved: {dataplane.counters.rx_packets} in, {dataplane.counters.tx_packets} out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
