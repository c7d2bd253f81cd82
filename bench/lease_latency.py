"""``python -m bench.lease_latency``: from a new node's lease appearing in etcd to the
first packet another node forwards to it.

A 2-node testbed with its real etcd. The "new node" is a UDP listener on a spare underlay
address (192.0.2.100:8285, added to n2's eth0); it never runs a daemon, so the only way a
packet reaches it is n1's daemon learning the lease from its etcd watch. n1 sends one UDP
datagram every millisecond to an address in the subnet under test (rejected with ICMP net
unreachable until the lease exists). Each round writes a lease
``{"PublicIP":"192.0.2.100","PublicIPv6":null}`` for a fresh subnet through etcd's HTTP
gateway, and times the first datagram the listener receives for that subnet; the lease is
deleted before the next round.

Every socket lives in its testbed namespace but is opened by this one process (setns), so
all timestamps come from the same monotonic clock. Latency is counted from the moment the
put request is sent; the put's own round trip is printed alongside (resolution: the 1 ms
send interval).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
import uuid
from ipaddress import IPv4Address, IPv4Network

from overlay.lab.etcd import EtcdGateway
from overlay.lab.netns import entered
from overlay.lab.testbed import Testbed

LISTENER_IP = "192.0.2.100"
PORT = 8285
LEASE_PREFIX = "/coreos.com/network/subnets/"


class Listener(threading.Thread):
    """The new node: notes when the first datagram for each /24 arrives."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.first: dict[IPv4Network, float] = {}
        self.arrived = threading.Condition()

    def run(self) -> None:
        self.sock.settimeout(0.2)
        while self.sock.fileno() != -1:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            now = time.monotonic()
            if len(data) < 20:
                continue
            subnet = IPv4Network((IPv4Address(data[16:20]), 24), strict=False)
            if subnet not in self.first:
                with self.arrived:
                    self.first[subnet] = now
                    self.arrived.notify_all()

    def wait(self, subnet: IPv4Network, timeout: float) -> float | None:
        with self.arrived:
            self.arrived.wait_for(lambda: subnet in self.first, timeout)
            return self.first.get(subnet)


class Sender(threading.Thread):
    """n1's traffic: one datagram per ``interval`` to the current target address."""

    def __init__(self, sock: socket.socket, interval: float) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.interval = interval
        self.target: str | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            if self.target is not None:
                try:
                    self.sock.sendto(b"lease-latency", (self.target, 9))
                except OSError:
                    pass  # e.g. ICMP unreachable reported back: keep sending


def free_subnets(bed: Testbed, count: int) -> list[IPv4Network]:
    """``count`` subnets from the top of the network that no node holds."""
    taken = {n["subnet"] for n in bed.status()["nodes"]}
    network = IPv4Network(bed.network)
    top = network.broadcast_address
    found = []
    for k in range(count + len(taken)):
        subnet = IPv4Network((int(top) - 255 - 256 * k, 24))
        if str(subnet) not in taken:
            found.append(subnet)
    return found[:count]


def measure(rounds: int, interval: float, prefix: str) -> list[tuple[IPv4Network, float, float]]:
    bed = Testbed(prefix, nodes=2, pods_per_node=0, registry="etcd")
    results: list[tuple[IPv4Network, float, float]] = []
    sender: Sender | None = None
    sockets: list[socket.socket] = []
    try:
        bed.up()
        bed.exec("n2", ["ip", "addr", "add", f"{LISTENER_IP}/24", "dev", "eth0"], check=True)
        with entered(bed.node_ns(2)):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rx.bind((LISTENER_IP, PORT))
        with entered(bed.node_ns(1)):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets += [rx, tx]
        listener = Listener(rx)
        listener.start()
        sender = Sender(tx, interval)
        sender.start()
        bed.exec("n1", ["ping", "-c", "1", "-W", "2", LISTENER_IP], capture_output=True)  # ARP
        gateway = EtcdGateway(bed.underlay_ns, bed.etcd.member_ip(1))
        lease = gateway.grant(600)
        try:
            for subnet in free_subnets(bed, rounds):
                key = f"{LEASE_PREFIX}{subnet.network_address}-{subnet.prefixlen}"
                sender.target = str(subnet.network_address + 1)
                time.sleep(0.3)  # n1 is sending into the void (net unreachable) by now
                if subnet in listener.first:
                    raise RuntimeError(f"{subnet}: a packet arrived before its lease existed")
                start = time.monotonic()
                gateway.put(key, f'{{"PublicIP":"{LISTENER_IP}","PublicIPv6":null}}', lease)
                acked = time.monotonic()
                first = listener.wait(subnet, timeout=15)
                if first is None:
                    raise RuntimeError(f"{subnet}: nothing forwarded within 15 s of its lease")
                results.append((subnet, first - start, acked - start))
                sender.target = None
                gateway.delete(key)
                time.sleep(0.1)
        finally:
            gateway.revoke(lease)
            gateway.close()
    finally:
        if sender is not None:
            sender.stopped.set()
        for sock in sockets:
            sock.close()
        bed.down()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lease_latency", description=__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="leases to time (default 20)")
    parser.add_argument(
        "--interval", type=float, default=0.001, help="n1's send interval, s (default 0.001)"
    )
    parser.add_argument("--prefix", default="lat" + uuid.uuid4().hex[:5], help="testbed prefix")
    args = parser.parse_args(argv)
    results = measure(args.rounds, args.interval, args.prefix)
    ms = [latency * 1000 for _, latency, _ in results]
    puts = [put * 1000 for _, _, put in results]
    print(f"{'round':>5} {'subnet':<18} {'lease -> first packet ms':>24} {'put rtt ms':>10}")
    for n, ((subnet, _, _), latency, put) in enumerate(zip(results, ms, puts, strict=True), 1):
        print(f"{n:>5} {str(subnet):<18} {latency:>24.1f} {put:>10.1f}")
    print(
        f"\nlease in etcd -> first packet forwarded by another node, {len(ms)} rounds: "
        f"median {statistics.median(ms):.1f} ms, min {min(ms):.1f} ms, max {max(ms):.1f} ms "
        f"(etcd put round trip median {statistics.median(puts):.1f} ms)"
    )
    print(f"command: python -m bench.lease_latency --rounds {args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
