"""Coverage-guided fuzzing of every entry point of encap._native (`make fuzz`).

Run by atheris (libFuzzer) against an extension built with clang's
``-fsanitize=fuzzer-no-link,address,undefined``, so the C code's own branches guide the
inputs and any out-of-bounds access or undefined behaviour aborts with a report. Each
input is also run through the pure-Python reference, and any difference in result,
exception, counts or the bytes left in the buffer aborts too: the fuzzer searches for
crashes and for disagreements.

    python tests/fuzz_native.py -max_total_time=60 [corpus_dir]
"""

from __future__ import annotations

import os
import socket
import sys
from collections import Counter
from typing import Any

import atheris

with atheris.instrument_imports():
    from encap import gso, native, tso
    from encap.errors import CodecError

_native = native.module()
VXLAN = (b"\x00\x00\x01", bytes.fromhex("02aabbccddee"))
SUBNETS = [(0xC61201, 8), (0xC612, 16), (0, 32), (0xC6120203, 0), (0x0A, 24)]
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


class _Peer:
    def __init__(self, prefix: bytes) -> None:
        self.addr = ("192.0.2.2", 8285)
        self.prefix = prefix


def _read_tun_once(data: bytearray, prefix: bytes, n: int) -> None:
    reader, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        tun.setblocking(False)
        for at in range(0, len(data), 97):  # reads of odd sizes, the first 10 bytes a vnet header
            reader.send(bytes(data[at : at + 97 + n % 300]))
        peer = _Peer(prefix)
        arena = bytearray(2 * 65535 + 4096 + len(prefix) + 3)
        _native.read_tun(
            tun.fileno(), arena, True, len(prefix), 64, len(arena) - 2 * 65535 - len(prefix) - 3,
            True, lambda dst: peer if dst[3] & 1 else None, {}, lambda packet: None,
            lambda reason, at, length: None,
        )  # fmt: skip
    finally:
        reader.close()
        tun.close()


def one_input(blob: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(blob)
    which = fdp.ConsumeIntInRange(0, 7)
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
    else:  # deliver: its writes are compared with the reference's in tests/test_native.py
        drops_a = Counter()
        drops_b = Counter()
        size, segment, mtu = a % (len(data) + 2), b % 1600 - 1, n % 2000
        coalesce, vnet = bool(n & 1), bool(n & 2)
        if coalesce and vnet:
            ref = _outcome(
                gso.plan_tun_writes,
                ours,
                size,
                segment,
                sources,
                destination,
                drops_a,
                vxlan,
                None,
                mtu,
            )
        else:
            ref = _outcome(
                gso.valid_pieces, ours, size, segment, sources, destination, drops_a, vxlan
            )
        got = _outcome(
            _native.deliver, _tun.fileno(), theirs, size, segment, sources, destination,
            drops_b, vxlan, None, mtu, coalesce, vnet,
        )  # fmt: skip
        _drain()
        ref, got = ref[:1], got[:1]
        drops_b.pop("rx_tun_full", None)
        _same(drops_a, drops_b, "drops")
    if which == 6:  # read_tun over whatever the "TUN" hands it (crashes only: the
        # differential test of the drain is tests/test_native.py)
        _read_tun_once(data, prefix, n)
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
