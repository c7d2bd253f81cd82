"""``python -m bench.barrage``: hostile datagrams against a receiving daemon during checked
TCP transfers, and the drop counters' account of every one of them.

One testbed per backend (file registry; udp with ``--workers 2``, vxlan with a kernel
node as well). While pod n1-p1 sends to pod n2-p1 (each transfer checked byte for byte,
overlay.lab.transfer), every malformed class of CLASSES is sent to n2's daemon, from n1's
address (a known peer), from an address no lease carries, and from n2 itself. Afterwards
the daemon must be alive, every transfer intact, and the rx drop reasons it counted must
add up to the datagrams sent, reason by reason as the table expects.

The datagrams are built here with struct, not with the project's codecs (an independent
construction of the same wire formats). The expected drop reason of each class lives in
CLASSES only; a reason the daemon counts that the table does not expect (say a new one
for bad header checksums) is printed by name in the failure.

The suite runs a few hundred of each class (tests/netns/test_hardening.py); this script
runs the 100k version and prints its figures::

    python -m bench.barrage                      # both backends, 100000 datagrams each
    python -m bench.barrage --backend vxlan --count 20000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from overlay.lab.testbed import Testbed
from overlay.lab.transfer import transfer
from overlay.observe import status_socket

ROOT = Path(__file__).resolve().parent.parent
PORTS = {"udp": 8285, "vxlan": 8472}
# Drops that legitimate load can cause (a full TUN queue): not the barrage's doing.
LOAD_REASONS = {"rx_tun_full", "rx_tun_error", "rx_socket_error"}
STRANGER = 200  # underlay host number of the address no lease carries
MAX_UDP_PAYLOAD = 65507
PACE = 256 * 1024  # bytes a sender sends back to back before a 1 ms pause


# -- the wire, built by hand --------------------------------------------------------------


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def ipv4(src: str, dst: str, payload: bytes, *, total: int | None = None, ihl: int = 5) -> bytes:
    """An IPv4/UDP packet with a correct header checksum (``total`` may lie)."""
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    length = 20 + len(udp) if total is None else total
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            length,
            0x1234,
            0,
            64,
            17,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
    )
    header[10:12] = struct.pack("!H", checksum(bytes(header)))
    return bytes(header) + udp


def ipv6_packet(payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 64, b"\x20" * 16, b"\x21" * 16) + (
        payload
    )


def vxlan(
    inner: bytes, *, mac: bytes, vni: int = 1, flags: int = 0x08, ethertype: int = 0x0800
) -> bytes:
    header = struct.pack("!B3xI", flags, vni << 8)
    ethernet = mac + bytes.fromhex("02deadbeef01") + struct.pack("!H", ethertype)
    return header + ethernet + inner


def arp_request(target: str) -> bytes:
    return (
        bytes.fromhex("0001080006040001")
        + bytes.fromhex("02deadbeef01")
        + (socket.inet_aton("198.18.250.1") + b"\0" * 6 + socket.inet_aton(target))
    )


# -- the classes ----------------------------------------------------------------------------


@dataclass
class Target:
    """What the datagrams are aimed at: n2's daemon, seen from n1."""

    backend: str
    peer_subnet: IPv4Network  # n1's lease: inner sources must lie in it
    own_subnet: IPv4Network  # n2's lease: inner destinations must lie in it
    mac: bytes = b""  # n2's VtepMAC (vxlan)
    vni: int = 1

    def inner(self, size: int = 100, **kwargs: Any) -> bytes:
        """A valid inner packet from n1's subnet to n2's pod network, ``size`` bytes."""
        src = str(self.peer_subnet.network_address + 7)
        dst = str(self.own_subnet.network_address + 2)
        return ipv4(src, dst, b"b" * (size - 28), **kwargs)

    def frame(self, inner: bytes, **kwargs: Any) -> bytes:
        """``inner`` as the backend carries it (vxlan: behind a valid header)."""
        if self.backend == "udp":
            return inner
        return vxlan(inner, mac=self.mac, vni=self.vni, **kwargs)


Build = Callable[[Target, random.Random], bytes]


@dataclass(frozen=True)
class Class:
    name: str
    source: str  # "peer" (n1's address), "stranger" (no lease), "self" (n2 itself)
    reason: str  # the drop reason the receiver must count for each datagram
    build: Build
    backends: tuple[str, ...] = ("udp", "vxlan")


def _garbage(t: Target, rng: random.Random) -> bytes:
    data = bytearray(rng.randbytes(rng.randint(42, 1400)))
    if t.backend == "udp":
        data[0] = rng.choice([v for v in range(256) if v >> 4 != 4])  # not IPv4
    else:
        data[0] &= 0xF7  # the I flag clear
    return bytes(data)


def _oversized(t: Target, rng: random.Random) -> bytes:
    """The largest UDP datagram there is (fragmented on the underlay, reassembled),
    whose inner header claims a normal size."""
    head = t.frame(t.inner(1400))
    return head + rng.randbytes(MAX_UDP_PAYLOAD - len(head))


def _foreign_source(t: Target, rng: random.Random) -> bytes:
    return t.frame(ipv4("198.18.250.9", str(t.own_subnet.network_address + 2), b"f" * 72))


def _not_our_subnet(t: Target, rng: random.Random) -> bytes:
    return t.frame(ipv4(str(t.peer_subnet.network_address + 7), "198.18.251.2", b"n" * 72))


CLASSES: list[Class] = [
    Class("empty", "peer", "rx_not_ipv4", lambda t, r: b""),
    Class("short", "peer", "rx_not_ipv4", lambda t, r: r.randbytes(r.randint(1, 19)), ("udp",)),
    Class("not-ipv4", "peer", "rx_not_ipv4", lambda t, r: t.frame(ipv6_packet(b"6" * 60))),
    Class("ihl-under-5", "peer", "rx_not_ipv4", lambda t, r: t.frame(t.inner(ihl=4))),
    Class("length-over", "peer", "rx_bad_length", lambda t, r: t.frame(t.inner(total=1400))),
    Class("length-under", "peer", "rx_bad_length", lambda t, r: t.frame(t.inner(total=60))),
    Class("foreign-source", "peer", "rx_foreign_source", _foreign_source),
    Class("not-our-subnet", "peer", "rx_not_our_subnet", _not_our_subnet),
    Class("unknown-peer", "stranger", "rx_unknown_peer", lambda t, r: t.frame(t.inner())),
    Class("from-itself", "self", "rx_unknown_peer", lambda t, r: t.frame(t.inner())),
    Class("garbage", "peer", "rx_not_ipv4", _garbage, ("udp",)),
    Class("garbage", "peer", "rx_vxlan_bad_flags", _garbage, ("vxlan",)),
    Class("oversized", "peer", "rx_bad_length", _oversized),
    # vxlan's own header and inner Ethernet.
    Class(
        "vxlan-truncated",
        "peer",
        "rx_vxlan_truncated",
        lambda t, r: t.frame(t.inner())[: r.randint(1, 41)],
        ("vxlan",),
    ),
    Class(
        "vxlan-bad-flags",
        "peer",
        "rx_vxlan_bad_flags",
        lambda t, r: t.frame(t.inner(), flags=0x00),
        ("vxlan",),
    ),
    Class(
        "vxlan-wrong-vni",
        "peer",
        "rx_vxlan_wrong_vni",
        lambda t, r: vxlan(t.inner(), mac=t.mac, vni=t.vni + 41),
        ("vxlan",),
    ),
    Class(
        "vxlan-bad-ethertype",
        "peer",
        "rx_vxlan_bad_ethertype",
        lambda t, r: t.frame(t.inner(), ethertype=0x86DD),
        ("vxlan",),
    ),
    Class(
        "vxlan-foreign-mac",
        "peer",
        "rx_vxlan_foreign_mac",
        lambda t, r: vxlan(t.inner(), mac=bytes.fromhex("02aabbccddee"), vni=t.vni),
        ("vxlan",),
    ),
    Class(
        "vxlan-arp-not-for-us",
        "peer",
        "rx_arp_not_for_us",
        lambda t, r: t.frame(arp_request("198.18.252.1"), ethertype=0x0806),
        ("vxlan",),
    ),
]


def classes_for(backend: str) -> list[Class]:
    return [c for c in CLASSES if backend in c.backends]


# -- sending: `python -m bench.barrage send` inside a namespace ------------------------------


def _write_batch(path: Path, datagrams: list[bytes]) -> None:
    with open(path, "wb") as f:
        for datagram in datagrams:
            f.write(struct.pack("!I", len(datagram)))
            f.write(datagram)


def _read_batch(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, at = [], 0
    while at < len(data):
        (size,) = struct.unpack_from("!I", data, at)
        out.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return out


def send_main(argv: list[str]) -> int:
    """Send the datagrams of a batch file from ``--bind`` to ``--to`` (in this netns)."""
    p = argparse.ArgumentParser(prog="python -m bench.barrage send")
    p.add_argument("--bind", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--file", required=True)
    p.add_argument(
        "--pace", type=int, default=PACE, help=f"pause 1 ms after this many bytes ({PACE})"
    )
    args = p.parse_args(argv)
    host, port = args.to.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((args.bind, 0))
        sent = 0
        for datagram in _read_batch(Path(args.file)):
            sock.sendto(datagram, (host, int(port)))
            sent += len(datagram) + 64
            if sent >= args.pace:  # bounded bursts: the receiver's IP reassembly holds 4 MB
                time.sleep(0.001)
                sent = 0
    return 0


# -- one run ------------------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    sent: Counter[str] = field(default_factory=Counter)  # by class
    expected: Counter[str] = field(default_factory=Counter)  # by reason
    counted: Counter[str] = field(default_factory=Counter)  # by reason (rx, not load)
    transfers: list[tuple[float, float]] = field(default_factory=list)
    barrage: tuple[float, float] = (0.0, 0.0)
    kernel_drops: Counter[str] = field(default_factory=Counter)  # n2's, during the run
    alive: bool = False

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def problems(self) -> list[str]:
        """What is wrong, each in one line; empty when the account is exact."""
        found = []
        if not self.alive:
            found.append(f"{self.backend}: the receiving daemon died")
        if sum(self.counted.values()) != self.total:
            found.append(
                f"{self.backend}: {self.total} datagrams sent, {sum(self.counted.values())} "
                f"counted as rx drops (n2's kernel dropped: {dict(self.kernel_drops) or 'none'})"
            )
        for reason in sorted(set(self.expected) | set(self.counted)):
            if self.expected[reason] != self.counted[reason]:
                new = "" if reason in self.expected else " (a reason CLASSES does not expect)"
                found.append(
                    f"{self.backend}: {reason}{new}: expected {self.expected[reason]}, "
                    f"counted {self.counted[reason]}"
                )
        start, end = self.barrage
        if not any(a < end and start < b for a, b in self.transfers):
            found.append(f"{self.backend}: no checked transfer overlapped the barrage")
        return found


def target_of(bed: Testbed, backend: str) -> Target:
    leases = json.loads(bed.registry_file.read_text())["keys"]

    def lease_of(node: int) -> tuple[IPv4Network, dict[str, Any]]:
        subnet = bed.status()["nodes"][node - 1]["subnet"]
        key = f"/coreos.com/network/subnets/{subnet.replace('/', '-')}"
        return IPv4Network(subnet), json.loads(leases[key]["value"])

    peer_subnet, _ = lease_of(1)
    own_subnet, value = lease_of(2)
    mac = b""
    if backend == "vxlan":
        mac = bytes.fromhex(value["BackendData"]["VtepMAC"].replace(":", ""))
    return Target(backend, peer_subnet, own_subnet, mac)


def _rx_drops(bed: Testbed) -> Counter[str]:
    drops = status_socket.query(bed.state_dir / "n2" / "status.sock")["counters"]["drops"]
    return Counter(
        {k: v for k, v in drops.items() if k.startswith("rx_") and k not in LOAD_REASONS}
    )


def _kernel_drops(bed: Testbed) -> Counter[str]:
    """What n2's kernel dropped before the daemon saw it (/proc/net/snmp)."""
    out = bed.exec("n2", ["cat", "/proc/net/snmp"], capture_output=True, text=True).stdout
    found: Counter[str] = Counter()
    for proto, names in (("Udp:", ("RcvbufErrors", "InErrors")), ("Ip:", ("ReasmFails",))):
        lines = [line.split() for line in out.splitlines() if line.startswith(proto)]
        table = dict(zip(lines[0], lines[1], strict=True))
        for name in names:
            found[f"{proto[:-1]}{name}"] = int(table.get(name, 0))
    return found


def run(
    bed: Testbed,
    backend: str,
    per_class: int,
    transfer: Callable[[Testbed, str, str, int], None],
    transfer_bytes: int = 50_000_000,
    seed: int = 1,
) -> Result:
    """The barrage against n2 during transfers n1-p1 -> n2-p1 (``transfer`` checks each
    one byte for byte and raises if one is not intact)."""
    rng = random.Random(seed)
    target = target_of(bed, backend)
    result = Result(backend)
    batches: dict[str, list[bytes]] = {"peer": [], "stranger": [], "self": []}
    for cls in classes_for(backend):
        batches[cls.source] += [cls.build(target, rng) for _ in range(per_class)]
        result.sent[cls.name] += per_class
        result.expected[cls.reason] += per_class
    n1, n2 = str(bed.node_ip(1)), str(bed.node_ip(2))
    stranger = str(bed.underlay.network_address + STRANGER)
    to = f"{n2}:{PORTS[backend]}"
    files = {}
    for source, datagrams in batches.items():
        files[source] = Path(bed.state_dir) / f"barrage-{source}.bin"
        _write_batch(files[source], datagrams)
    senders = {"peer": ("n1", n1), "self": ("n2", n2)}

    before = _rx_drops(bed)
    kernel_before = _kernel_drops(bed)
    done = threading.Event()
    failure: list[BaseException] = []

    def transfers() -> None:
        try:
            while not done.is_set():
                start = time.monotonic()
                transfer(bed, "n1-p1", "n2-p1", transfer_bytes)
                result.transfers.append((start, time.monotonic()))
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            failure.append(e)

    worker = threading.Thread(target=transfers)
    bridge = ["ip", "-n", bed.underlay_ns, "addr"]
    subprocess.run(
        [*bridge, "add", f"{stranger}/{bed.underlay.prefixlen}", "dev", bed.bridge], check=True
    )
    try:
        worker.start()
        time.sleep(0.5)  # a transfer under way
        start = time.monotonic()
        for source, path in files.items():
            argv = [sys.executable, "-m", "bench.barrage", "send", "--to", to, "--file", str(path)]
            if source == "stranger":
                cmd = ["ip", "netns", "exec", bed.underlay_ns, *argv, "--bind", stranger]
                subprocess.run(cmd, check=True, cwd=ROOT, env=_env())
            else:
                name, address = senders[source]
                bed.exec(name, [*argv, "--bind", address], check=True, cwd=ROOT, env=_env())
        result.barrage = (start, time.monotonic())
        deadline = time.monotonic() + 15 + result.total / 20_000
        while time.monotonic() < deadline:
            counted = _rx_drops(bed) - before
            if sum(counted.values()) >= result.total:
                break
            time.sleep(0.1)
        time.sleep(1.2)  # workers report every second: let a late one in
        result.counted = _rx_drops(bed) - before
    finally:
        done.set()
        worker.join(timeout=300)
        subprocess.run([*bridge, "del", f"{stranger}/{bed.underlay.prefixlen}", "dev", bed.bridge])
        for path in files.values():
            path.unlink(missing_ok=True)
    if failure:
        raise failure[0]
    result.kernel_drops = _kernel_drops(bed) - kernel_before
    result.alive = bool(bed.status()["nodes"][1]["running"])
    return result


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    return env


def testbed_for(backend: str, prefix: str) -> Testbed:
    """udp: 2 nodes, 2 forwarding processes each; vxlan: 2 userspace nodes and a kernel one."""
    if backend == "udp":
        return Testbed(
            prefix, nodes=2, pods_per_node=1, registry="file", daemon_args=("--workers", "2")
        )
    return Testbed(
        prefix, nodes=3, pods_per_node=1, backend="vxlan", registry="file", kernel_nodes=(3,)
    )


def report(result: Result, seconds: float) -> str:
    took = max(result.barrage[1] - result.barrage[0], 1e-9)
    lines = [
        f"{result.backend}: {result.total} datagrams in {took:.1f} s "
        f"({result.total / took:.0f}/s), "
        f"{len(result.transfers)} checked transfers intact, daemon "
        f"{'alive' if result.alive else 'DEAD'}, run {seconds:.0f} s",
        f"  {'reason':<26} {'expected':>9} {'counted':>9}",
    ]
    for reason in sorted(set(result.expected) | set(result.counted)):
        lines.append(f"  {reason:<26} {result.expected[reason]:>9} {result.counted[reason]:>9}")
    lines.append(f"  n2's kernel dropped: {dict(result.kernel_drops) or 'nothing'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["send"]:
        return send_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m bench.barrage", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--backend", choices=("udp", "vxlan", "both"), default="both")
    p.add_argument("--count", type=int, default=100_000, help="datagrams per backend")
    p.add_argument("--transfer-mb", type=int, default=100, help="size of each checked transfer")
    args = p.parse_args(argv)
    failed = False
    for backend in ("udp", "vxlan") if args.backend == "both" else (args.backend,):
        per_class = max(1, args.count // len(classes_for(backend)))
        started = time.monotonic()
        with testbed_for(backend, "bg" + uuid.uuid4().hex[:6]) as bed:
            bed.up()
            result = run(bed, backend, per_class, transfer, args.transfer_mb * 1_000_000)
        print(report(result, time.monotonic() - started), flush=True)
        for problem in result.problems():
            print(f"  PROBLEM: {problem}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
