"""Coverage-guided fuzzing of every entry point of encap._native (`make fuzz`).

Run by atheris (libFuzzer) against an extension built with clang's
``-fsanitize=fuzzer-no-link,address,undefined``, so the C code's own branches guide the
inputs and any out-of-bounds access or undefined behaviour aborts with a report. Each
input is also run through the pure-Python reference, and any difference in result,
exception, counts or the bytes left in the buffer aborts too: the fuzzer searches for
crashes and for disagreements.

    python tests/encap/fuzz_native.py -max_total_time=60 [corpus_dir]
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections import Counter
from types import SimpleNamespace
from typing import Any

import atheris

with atheris.instrument_imports():
    from encap import gso, ipv6, native, tso
    from encap.errors import CodecError

_native = native.module()
VXLAN = (b"\x00\x00\x01", bytes.fromhex("02aabbccddee"))
SUBNETS = [(0xC61201, 8), (0xC612, 16), (0, 32), (0xC6120203, 0), (0x0A, 24)]
# vxlan's IPv6 half: (our VNI, our IPv6 VTEP MAC, its solicited-node MAC); IPv6 subnets.
VXLAN6 = (b"\x00\x00\x01", bytes.fromhex("02aabbccddee"), bytes.fromhex("3333ff000000"))
SUBNETS6 = [(0xFD00001000000002, 64), (0, 128), (0xFD00, 112), (2**127 + 5, 0), (1, 64)]
_tun_reader, _tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
_tun.setblocking(False)
_tun_reader.setblocking(False)


def _outcome(call: Any, *args: Any) -> Any:
    try:
        return ("ok", call(*args))
    except CodecError as e:
        return ("codec", e.reason)
    except (ValueError, TypeError, IndexError) as e:
        return ("error", type(e).__name__)


def _same(a: Any, b: Any, what: str) -> None:
    if a != b:
        raise AssertionError(f"{what}: reference {a!r} != native {b!r}")


def _joined(result: Any) -> Any:
    if result[0] != "ok" or not result[1] or not isinstance(result[1][0][0], list):
        return result
    return ("ok", [(b"".join(bytes(x) for x in bufs), n, s) for bufs, n, s in result[1]])


def _drain() -> list[bytes]:
    out = []
    while True:
        try:
            out.append(_tun_reader.recv(1 << 17))
        except BlockingIOError:
            return out


def _ipv6_frame(frame: bytes) -> None:
    """The send drain's IPv6 hand-over: a virtio_net_hdr and an IPv6 header at least."""
    if len(frame) < 10 + 40 or frame[10] >> 4 != 6:
        raise AssertionError(f"an IPv6 hand-over of {len(frame)} bytes: {frame[:12].hex()}")


def _stand_in(tun: int, sock: socket.socket, prefix: bytes, n: int, **extra: Any) -> Any:
    """An object with the attributes the drains read (tests/encap/test_native.py and
    tests/overlay/dataplane/test_fastpath.py run them on real dataplanes): sends go into an
    AF_UNIX socket, where they fail, and receives come from one, as if from address 0.0.0.0."""
    from types import SimpleNamespace

    from overlay.dataplane.counters import Counters

    headroom = len(prefix)
    good = SimpleNamespace(addr=("192.0.2.2", 8285), prefix=prefix)
    odd = SimpleNamespace(addr=("192.0.2.3", 8285), prefix=bytes(headroom ^ (n & 1)))
    stats = SimpleNamespace(rx_packets=0, rx_bytes=0, last_rx=0.0, tx_packets=0, tx_bytes=0)
    fields: dict[str, Any] = {
        "tun": SimpleNamespace(fd=tun, offset=10, vnet_hdr=bool(n & 4)),
        "sock": sock,
        "headroom": headroom,
        "tap": None,
        "tso": True,
        "gso": bool(n & 2),
        "_gso_sent": bool(n & 8),
        "gro": bool(n & 16),
        "tun_gso": bool(n & 32),
        "mtu": n % 2000,
        "vxlan_rules": None,
        "_own": (0, 32),
        "peers": SimpleNamespace(routes=[(31, {0: good, 1: odd})], senders={0: ((), stats)}),
        "counters": Counters(),
        "_tx_arena": bytearray(2 * 65535 + 4096 + headroom + 3),
        "_rx_buffer": bytearray(2 * 65535),
        "_no_route": lambda packet: None,
        "_too_big": lambda packet: None,
        "_answer_arp": lambda start, end, source: None,
        "_send_ipv6": _ipv6_frame,
    }
    fields.update(extra)
    return SimpleNamespace(**fields)


def _tx_drain_once(data: bytearray, prefix: bytes, n: int) -> None:
    reader, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        tun.setblocking(False)
        for at in range(0, len(data), 97):  # reads of odd sizes, the first 10 bytes a vnet header
            reader.send(bytes(data[at : at + 97 + n % 300]))
        dp = _stand_in(tun.fileno(), sink, prefix, n)
        drains = _native.Drains(dp, 1 + n % 64)  # a wake-up, maybe another after it
        drains.tx()
        if n & 64:  # a new table (as PeerTable swaps them): the kept lookup goes
            dp.peers.routes = [(31, {0: dp.peers.routes[0][1][1], 1: dp.peers.routes[0][1][0]})]
        drains.tx()
        drains.flush()
    finally:
        reader.close()
        tun.close()
        sink.close()


def _rx_drain_once(data: bytearray, sources: list[Any], vxlan: Any, a: int, b: int, n: int) -> None:
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        receiver.setblocking(False)
        sender.setblocking(False)
        at, step, sent = 0, 1 + a % 1600, 0
        # datagrams of one size, then of another: runs form and end
        while at < len(data) and sent < 100:
            sender.send(bytes(data[at : at + step]))
            at += step
            sent += 1
            step = 1 + (b % 1600 if at > len(data) // 2 else a % 1600)
        if b & 1:
            sender.send(b"")
        stats = SimpleNamespace(rx_packets=0, rx_bytes=0, last_rx=0.0)
        peers = SimpleNamespace(routes=[], senders={0: (sources, stats)})
        dp = _stand_in(_tun.fileno(), receiver, b"", n, vxlan_rules=vxlan, peers=peers)
        drains = _native.Drains(dp, 1 + n % 64)
        drains.rx()
        if n & 64:
            dp.peers.senders = dict(dp.peers.senders)
        drains.rx()
        drains.flush()
        _drain()
    finally:
        sender.close()
        receiver.close()


def _poll_after_once(data: bytearray, a: int, b: int, n: int) -> None:
    """poll_after on a pair of socket pairs (or fuzzed fds, windows): each call of the
    first drain makes what the next data byte says readable. Crashes, and a drain order
    poll_after promises not (``other`` at most once, and last), abort."""
    (first_in, first_out), (other_in, other_out) = (
        socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)
    )
    for end in (first_in, other_in):
        end.setblocking(False)  # a full queue (fuzzed fds: nobody drains it) drops the byte
    log: list[str] = []
    steps = iter(data)

    def drain(end: socket.socket, name: str) -> None:
        log.append(name)
        with contextlib.suppress(BlockingIOError):
            while True:
                end.recv(16, socket.MSG_DONTWAIT)

    def first() -> None:
        drain(first_out, "first")
        step = next(steps, 2)
        with contextlib.suppress(BlockingIOError):
            if step & 1:
                first_in.send(b"x")
            if step & 2:
                other_in.send(b"x")

    fds = [first_out.fileno(), other_out.fileno()]
    if a & 1:  # fuzzed fds: maybe negative, equal, closed or someone else's
        fds = [a % 9 - 2, b % 9 - 2]
    window_ns = n * 1000 if b & 2 else n - 2  # up to 3 ms, or a few ns (maybe negative)
    try:
        _outcome(
            _native.poll_after, first, fds[0], lambda: drain(other_out, "other"), fds[1], window_ns
        )
    except OSError:
        pass
    finally:
        for end in (first_in, first_out, other_in, other_out):
            end.close()
    if "other" in log and (log.count("other") != 1 or log[-1] != "other"):
        raise AssertionError(f"poll_after called the drains out of order: {log}")


def _ipv6_drains_once(data: bytearray, sources6: list[Any], a: int, b: int, n: int) -> None:
    """The drains with vxlan's IPv6 half: the TUN's reads (IPv6 among them; with b & 4
    one read repeated, some shorter, so small packets to one peer form GSO groups and
    break them) through Drains.tx, datagrams of two sizes through Drains.rx6 (sends fail
    on AF_UNIX sockets, receives come from address ::)."""
    reader, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for end in (tun, sender, receiver):
            end.setblocking(False)
        for at in range(0, len(data), 97):  # reads of odd sizes, the first 10 bytes a vnet header
            if b & 4:
                reader.send(bytes(data[: 97 + n % 300 - (at // 97 % 4 == 3) * (a % 9)]))
            else:
                reader.send(bytes(data[at : at + 97 + n % 300]))
        for at in range(0, min(len(data), 20000), 1 + a % 1600):
            try:
                sender.send(bytes(data[at : at + 1 + a % 1600]))
            except BlockingIOError:  # the receiver's queue is full: enough
                break
        if b & 1:
            with contextlib.suppress(BlockingIOError):
                sender.send(b"")
        stats = SimpleNamespace(rx_packets=0, rx_bytes=0, last_rx=0.0, tx_packets=0, tx_bytes=0)
        peer6 = SimpleNamespace(addr=("fd00::2", 8472), prefix=bytes(22 - (b & 2)), stats=stats)
        peers = SimpleNamespace(
            routes=[],
            senders={},
            routes6=[(64 + b % 65, {0: peer6, 0xFD00000000000000 >> (b % 65): peer6})],
            sources6_of=lambda ip: sources6,
            by_public_ipv6=lambda ip: peer6 if n & 1 else None,
        )
        path = SimpleNamespace(
            sock=receiver if n & 128 else sink,
            gro=bool(n & 16),
            gso=bool(n & 2),
            _gso_sent=bool(n & 8),
            _one_by_one=bool(n & 256),
            _tx_arena=bytearray(1 if n & 32 else 0),
            own=SUBNETS6[a % len(SUBNETS6)],
            vxlan_rules=VXLAN6,
            _rx_buffer=bytearray(65535),
            gso_sends=0,
            tun_super_packets_read=0,
            gro_receives=0,
            tun_super_packets_written=0,
            _native_ndp=lambda base, end, source: bool(base & 1),
            on_socket_readable=lambda mtu: None,
        )
        dp = _stand_in(tun.fileno(), sink, bytes(22), n, peers=peers, ipv6=path)
        path.peers, path.counters = peers, dp.counters  # as the dataplane's IPv6 half has them
        drains = _native.Drains(dp, 1 + n % 64)
        drains.tx()
        path.sock = receiver
        drains = _native.Drains(dp, 1 + n % 64)
        drains.rx6()
        drains.flush()
        _drain()
    finally:
        for s in (reader, tun, sink, sender, receiver):
            s.close()


def one_input(blob: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(blob)
    which = fdp.ConsumeIntInRange(0, 12)
    a = fdp.ConsumeIntInRange(-4, 70000)
    b = fdp.ConsumeIntInRange(-4, 70000)
    n = fdp.ConsumeIntInRange(-2, 3000)
    sources = [SUBNETS[i % len(SUBNETS)] for i in fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 3))]
    destination = SUBNETS[fdp.ConsumeIntInRange(0, len(SUBNETS) - 1)]
    vxlan = VXLAN if fdp.ConsumeBool() else None
    prefix = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 30))
    data = bytearray(fdp.ConsumeBytes(fdp.remaining_bytes()))
    ours, theirs = bytearray(data), bytearray(data)
    if which == 0:
        ref = _outcome(tso.segment_tcp4, ours, a % 64, len(data) - a % 64 - b % 64, n, prefix)
        got = _outcome(_native.segment_tcp4, theirs, a % 64, len(data) - a % 64 - b % 64, n, prefix)
    elif which == 1:
        regions = [(a % 3000, b % 3000, n % 3000), (b % 2000 - 1, a % 2000, n)]
        ref = _outcome(tso.finish_checksums, ours, regions[: 1 + (n & 1)])
        got = _outcome(_native.finish_checksums, theirs, regions[: 1 + (n & 1)])
    elif which == 7:  # plan_groups: lengths and keys from the data, limits from a, b, n
        lengths = [x * (n % 64 + 1) for x in data[::2]]
        keys = [("192.0.2.1", x & 3) for x in data[1::2]]
        ref = _outcome(gso.plan_groups, lengths, keys, a % 70 - 1, b * 4)
        got = _outcome(_native.plan_groups, lengths, keys, a % 70 - 1, b * 4)
    elif which == 8:
        ref = _outcome(tso.segment_tcp6, ours, a % 64, len(data) - a % 64 - b % 64, n, prefix)
        got = _outcome(_native.segment_tcp6, theirs, a % 64, len(data) - a % 64 - b % 64, n, prefix)
    elif which == 9:  # valid_pieces6: sources and destination from the IPv6 subnets
        sources6 = [SUBNETS6[i % len(SUBNETS6)] for i in prefix[:3]]
        destination6 = SUBNETS6[n % len(SUBNETS6)]
        drops_a6: Counter[str] = Counter()
        drops_b6: Counter[str] = Counter()
        ndp_a: list[int] = []
        ndp_b: list[int] = []
        size, segment = a % (len(data) + 2), b % 1600 - 1
        rest = (sources6, destination6)
        ref = _outcome(ipv6.valid_pieces6, ours, size, segment, *rest, drops_a6, VXLAN6, ndp_a)
        got = _outcome(_native.valid_pieces6, theirs, size, segment, *rest, drops_b6, VXLAN6, ndp_b)
        _same((drops_a6, ndp_a), (drops_b6, ndp_b), "drops, ndp")
    elif which == 10:  # plan_tun_writes6: pieces from the prefix bytes
        starts = [x * 37 % (len(data) + 3) for x in prefix[::2]]
        pieces = [(at, at + 40 + y) for at, y in zip(starts, prefix[1::2], strict=False)]
        ref = _joined(_outcome(ipv6.plan_tun_writes6, ours, pieces, n - 2 + a % 1500))
        got = _joined(_outcome(_native.plan_tun_writes6, theirs, pieces, n - 2 + a % 1500))
    elif which == 2:
        ref = _outcome(gso.drop_reason, ours, a % 3000, b % 3000, sources, destination)
        got = _outcome(_native.drop_reason, theirs, a % 3000, b % 3000, sources, destination)
    elif which in (3, 4):
        pure = gso.valid_pieces if which == 3 else gso.plan_tun_writes
        fast = _native.valid_pieces if which == 3 else _native.plan_tun_writes
        extra = () if which == 3 else (n % 2000,)
        drops_a: Counter[str] = Counter()
        drops_b: Counter[str] = Counter()
        arp_a: list[int] = []
        arp_b: list[int] = []
        size, segment = a % (len(data) + 2), b % 1600 - 1
        ref = _joined(
            _outcome(pure, ours, size, segment, sources, destination, drops_a, vxlan, arp_a, *extra)
        )
        got = _joined(
            _outcome(
                fast, theirs, size, segment, sources, destination, drops_b, vxlan, arp_b, *extra
            )
        )
        _same((drops_a, arp_a), (drops_b, arp_b), "drops, arp")
    else:  # the drains (crashes only: tests/encap/test_native.py compares them with the
        # dataplane's reference methods), and poll_after (tests/overlay/dataplane/
        # test_busy_poll.py compares it with the reference on real fds)
        if which == 11:
            sources6 = [SUBNETS6[i % len(SUBNETS6)] for i in prefix[:3]]
            _ipv6_drains_once(data, sources6, a, b, n)
        elif which == 12:
            _poll_after_once(data, a, b, n % 3000)
        elif which == 5:
            _rx_drain_once(data, sources, vxlan, a, b, n)
        else:
            _tx_drain_once(data, prefix, n)
        return
    _same(ref, got, f"entry point {which}")
    _same(bytes(ours), bytes(theirs), f"buffer after entry point {which}")


def main() -> None:
    if not native.AVAILABLE or "fuzz" not in (_native.__file__ or ""):
        sys.exit(f"fuzz_native: needs the fuzzing build of encap._native (make fuzz): {_native}")
    atheris.Setup([sys.argv[0], *sys.argv[1:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OVERLAY_NATIVE", "1")
    main()
