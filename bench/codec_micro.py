"""``overlay bench`` part 2: per-packet cost of the codecs on the hot path, in ns (pyperf).

Each operation is a ``timeit`` statement (GC off while timing, as the stdlib does) run by
``pyperf``, which calibrates the loop count, runs every benchmark in several worker
processes (different hash seeds, warmed up) and keeps every value, so the report gives
mean +- stdev rather than a best case. Operations that handle a batch divide by the batch
size (pyperf's ``inner_loops``), so every row is ns per packet. The numbers include the
timeit loop (~10 ns per iteration on this kind of machine): they are for comparing codecs
and commits, not absolute truths. ``ipv4.parse`` is not on the forwarding path (only ICMP
errors use it); it is kept as the cost of a full header decode.

- ``python -m bench.codec_micro [pyperf options]`` runs it standalone and prints the table
  (``--fast`` for a shorter run, ``-o FILE.json`` to keep pyperf's results);
- :func:`run` is what ``overlay bench`` calls: it starts that same command as a
  subprocess (pyperf's Runner parses ``sys.argv`` and re-executes the program for its
  workers, so it must not run inside ``overlay bench``'s process) and reads the JSON back.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import tempfile
import timeit
from collections import Counter
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pyperf

from control.lease import Lease
from control.peer_table import PeerTable
from encap import gso, ipv4, native, tso, udp_frame, vxlan
from encap.checksum import internet_checksum

PACKET_SIZE = 1400
PEERS = 100
DRAIN = 64  # packets in one TUN drain for plan_groups
GRO_SEGMENTS = 44  # segments in one GRO receive (44 x 1472 B fits in 64 KiB)
MSS = 1420  # TCP payload of a 1472-byte packet with timestamps (TUN MTU 1472)
TS_OPTION = b"\x01\x01\x08\x0a" + bytes(range(8))  # NOP NOP timestamps

# (name, statement, packets the statement handles); the statements run in setup()'s names.
CASES: list[tuple[str, str, int]] = [
    ("udp encap (identity)", "udp_frame.encode(packet)", 1),
    ("vxlan encap (prefix + packet)", "vxlan.encode(prefix, packet)", 1),
    ("vxlan decode", "vxlan.decode(datagram, vni=1, mac=mac)", 1),
    ("ipv4.parse", "ipv4.parse(packet)", 1),
    (f"PeerTable.lookup ({PEERS} peers)", "table.lookup(view[16:20])", 1),
    (f"gso.plan_groups ({DRAIN}-packet drain)", "gso.plan_groups(lengths, addrs)", DRAIN),
    (
        f"gso.plan_tun_writes ({GRO_SEGMENTS}-segment GRO buffer, 1 TCP flow)",
        "gso.plan_tun_writes(gro, gro_size, gro_segment, theirs, ours, drops)",
        GRO_SEGMENTS,
    ),
    (
        f"tso.segment_tcp4 ({GRO_SEGMENTS}-segment super-packet, incl. restoring it)",
        "tso_buf[:tso_len] = tso_in; tso.segment_tcp4(tso_buf, 0, tso_len, mss, b'')",
        GRO_SEGMENTS,
    ),
    ("gso.drop_reason (1400-byte TCP segment)", "gso.drop_reason(gro, 0, full, theirs, ours)", 1),
]
if native.AVAILABLE:  # the same operations in encap._native (what the dataplane runs)
    CASES += [
        (
            f"native segment_tcp4 ({GRO_SEGMENTS}-segment super-packet, incl. restoring it)",
            "tso_buf[:tso_len] = tso_in; c.segment_tcp4(tso_buf, 0, tso_len, mss, b'')",
            GRO_SEGMENTS,
        ),
        (
            "native drop_reason (1400-byte TCP segment)",
            "c.drop_reason(gro, 0, full, theirs, ours)",
            1,
        ),
        (
            f"native plan_tun_writes ({GRO_SEGMENTS}-segment GRO buffer, 1 TCP flow)",
            "c.plan_tun_writes(gro, gro_size, gro_segment, theirs, ours, drops)",
            GRO_SEGMENTS,
        ),
    ]
OPERATIONS = [name for name, _, _ in CASES]

# pyperf options for ``run``: quick (the smoke test, ``overlay bench --quick``: a few
# seconds) and full (pyperf's --fast: 10 worker processes x 2 values per operation).
QUICK_ARGS = ("--processes", "2", "--values", "3", "--warmups", "1", "--min-time", "0.01")
FULL_ARGS = ("--fast",)

ROOT = Path(__file__).resolve().parent.parent


def _tcp_segment(seq: int, flags: int, payload: bytes, src: bytes, dst: bytes) -> bytes:
    """One IPv4 + TCP (with timestamps) segment with correct checksums."""
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 8 << 4, flags, 502, 0, 0)
        + TS_OPTION
        + payload
    )
    pseudo = src + dst + struct.pack("!BBH", 0, ipv4.PROTO_TCP, len(tcp))
    tcp[16:18] = internet_checksum(pseudo + tcp + b"\0" * (len(tcp) % 2)).to_bytes(2, "big")
    header = ipv4.build_header(
        src=src,
        dst=dst,
        protocol=ipv4.PROTO_TCP,
        payload_length=len(tcp),
        flags_fragment=ipv4.FLAG_DF,
    )
    return header + bytes(tcp)


def setup() -> dict[str, object]:
    """Every input, built once per process (never inside the timed statements)."""
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

    # plan_groups: a bulk TX drain, every packet a full segment to one peer (as the udp
    # backend's stage 1 hands it over: one shared address tuple per peer) -> 44 + 20.
    full = 20 + 32 + MSS
    lengths = [full] * DRAIN
    addrs = [("192.0.2.61", udp_frame.PORT)] * DRAIN

    # plan_tun_writes: one GRO receive of a TCP bulk flow from the peer 198.18.51.0/24 to
    # us (198.18.1.0/24): 44 adjacent full segments, PSH on the last -> one super-packet.
    peer_ip, our_ip = dst, src
    seq, segments = 1_000_000, []
    for i in range(GRO_SEGMENTS):
        flags = 0x18 if i == GRO_SEGMENTS - 1 else 0x10
        data = bytes((seq + k) & 0xFF for k in range(MSS))
        segments.append(_tcp_segment(seq, flags, data, peer_ip, our_ip))
        seq += MSS
    gro = bytearray(b"".join(segments))
    theirs = ((int.from_bytes(peer_ip, "big") >> 8, 8),)  # the sender's leases
    ours = (int.from_bytes(our_ip, "big") >> 8, 8)
    drops: Counter[str] = Counter()

    # segment_tcp4: what the TUN hands over (TSO) for the same flow, the other way:
    # one 44-segment super-packet from us to the peer, cut in place (restored each time).
    data = bytes(k & 0xFF for k in range(GRO_SEGMENTS * MSS))
    tso_in = _tcp_segment(1_000_000, 0x18, data, our_ip, peer_ip)
    tso_buf = bytearray(len(tso_in) + GRO_SEGMENTS * 60 + 3)

    env: dict[str, object] = {
        "packet": packet,
        "view": memoryview(packet),
        "prefix": prefix,
        "datagram": vxlan.encode(prefix, packet),
        "mac": mac,
        "table": table,
        "lengths": lengths,
        "addrs": addrs,
        "gro": gro,
        "gro_size": len(gro),
        "gro_segment": full,
        "theirs": theirs,
        "ours": ours,
        "drops": drops,
        "tso_in": tso_in,
        "tso_len": len(tso_in),
        "tso_buf": tso_buf,
        "mss": MSS,
        "tso": tso,
        "udp_frame": udp_frame,
        "vxlan": vxlan,
        "ipv4": ipv4,
        "gso": gso,
        "full": full,
        "c": native.module() if native.AVAILABLE else None,
    }
    _check(env)
    return env


def _check(env: dict[str, Any]) -> None:
    """The inputs take the path they are meant to measure (not a drop or a fallback)."""
    if env["table"].lookup(env["view"][16:20]) is None:
        raise RuntimeError("codec_micro: the lookup address is in no peer subnet")
    if gso.plan_groups(env["lengths"], env["addrs"]) != [(0, 44), (44, DRAIN)]:
        raise RuntimeError("codec_micro: the drain is not cut into full GSO groups")
    writes = gso.plan_tun_writes(
        env["gro"], env["gro_size"], env["gro_segment"], env["theirs"], env["ours"], env["drops"]
    )
    if env["drops"] or [count for _, count, _ in writes] != [GRO_SEGMENTS]:
        raise RuntimeError(
            f"codec_micro: the GRO buffer is not one super-packet ({writes=}, {env['drops']})"
        )
    for impl in (tso, env["c"]) if env["c"] else (tso,):
        env["tso_buf"][: env["tso_len"]] = env["tso_in"]
        cut = impl.segment_tcp4(env["tso_buf"], 0, env["tso_len"], MSS, b"")
        if cut != (GRO_SEGMENTS, 52 + MSS, 52 + MSS):
            raise RuntimeError(f"codec_micro: the super-packet is not cut into segments ({cut})")
    if gso.drop_reason(env["gro"], 0, env["full"], env["theirs"], env["ours"]) is not None:
        raise RuntimeError("codec_micro: the segment for drop_reason is not valid")
    if env["c"]:
        writes = env["c"].plan_tun_writes(
            env["gro"], env["gro_size"], env["gro_segment"], env["theirs"], env["ours"],
            env["drops"],
        )  # fmt: skip
        if [count for _, count, _ in writes] != [GRO_SEGMENTS] or env["drops"]:
            raise RuntimeError(f"codec_micro: native plan_tun_writes made {writes=}")


# -- results: {name: {"mean_ns", "stdev_ns", "values"}} ---------------------------------------


def summarize(benchmarks: list[pyperf.Benchmark]) -> dict[str, dict[str, float]]:
    """ns per packet (pyperf already divides by loops and inner_loops) per operation."""
    out: dict[str, dict[str, float]] = {}
    for bench in benchmarks:
        values = bench.get_values()
        out[bench.get_name()] = {
            "mean_ns": bench.mean() * 1e9,
            "stdev_ns": (bench.stdev() if len(values) > 1 else 0.0) * 1e9,
            "values": len(values),
        }
    return out


def run(quick: bool = False, timeout: float = 600.0) -> dict[str, dict[str, float]]:
    """Run every operation in a ``python -m bench.codec_micro`` subprocess (quick: a few
    seconds; else pyperf's --fast) and return its results, in :data:`OPERATIONS` order.
    Raises RuntimeError if the run fails or misses an operation."""
    with tempfile.TemporaryDirectory(prefix="codec-micro-") as tmp:
        output = Path(tmp) / "micro.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.codec_micro",
            *(QUICK_ARGS if quick else FULL_ARGS),
            "--quiet",
            "--output",
            str(output),
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"codec micro-benchmarks took over {timeout:g} s") from e
        if proc.returncode != 0 or not output.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(
                f"`{' '.join(cmd[1:])}` exited with {proc.returncode}: " + " | ".join(tail)
            )
        results = summarize(pyperf.BenchmarkSuite.load(str(output)).get_benchmarks())
    missing = [name for name in OPERATIONS if name not in results]
    if missing:
        raise RuntimeError(f"codec micro-benchmarks missing: {', '.join(missing)}")
    return {name: results[name] for name in OPERATIONS}


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| operation | ns/packet (mean ± stdev) |", "|---|---:|"]
    for name, r in results.items():
        mean, stdev = r["mean_ns"], r["stdev_ns"]
        digits = 0 if mean >= 100 or not math.isfinite(mean) else 1  # ~3 significant
        lines.append(f"| {name} | {mean:.{digits}f} ± {stdev:.{digits}f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # Workers are re-run as ``python -m bench.codec_micro --worker ...`` (pyperf's default
    # would be ``python .../bench/codec_micro.py``, which puts bench/ itself on sys.path).
    runner = pyperf.Runner(program_args=("-m", "bench.codec_micro"))
    runner.metadata["description"] = "overlay codec micro-benchmarks, ns per packet"
    args = runner.parse_args(argv)
    env = setup()
    benchmarks = []
    for name, stmt, packets in CASES:
        # Runner.timeit would return None even in the manager process; bench_time_func
        # returns the Benchmark. The timed loop is the stdlib's timeit (GC off while timing).
        timer = timeit.Timer(stmt, globals=env)
        bench = runner.bench_time_func(name, timer.timeit, inner_loops=packets)
        if bench is not None:
            benchmarks.append(bench)
    if not args.worker and len(benchmarks) == len(CASES):
        if not args.quiet:
            print()
        print(format_table(summarize(benchmarks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
