"""Impairment in the dataplane (overlay.dataplane.impaired) on a real underlay
(tests/helpers/wire.py), a fake TUN and a real event loop, on the native module and on
the pure reference, udp and vxlan framing: what leaves is exactly what the link's model
(seeded like the dataplane seeds it) lets through, when it says; the drops carry their
reason into the counters and the trace; and with no rule the readers are the usual ones.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import uvloop

from control.lease import Lease
from control.peer_table import PeerTable
from encap import gso, native, vxlan
from overlay.dataplane.counters import Counters
from overlay.dataplane.udp import UdpDataplane
from overlay.dataplane.vxlan import VxlanDataplane, vxlan_prefix_for
from overlay.impair.model import LinkModel
from overlay.impair.rules import Change, Rules
from overlay.impair.spec import parse_spec
from tests.helpers import wire
from tests.helpers.fake_tun import FakeTun
from tests.helpers.readers import Readers
from tests.helpers.tcp_streams import Segment

pytestmark = pytest.mark.underlay

OWN = IPv4Network("198.18.1.0/24")
MAC, PEER_MAC = bytes.fromhex("02aa00000001"), bytes.fromhex("02aa00000002")
VXLAN_DATA = {"VNI": 1, "VtepMAC": PEER_MAC.hex(":")}
A = Lease(IPv4Network("198.18.2.0/24"), IPv4Address(wire.PEER_A), "vxlan", VXLAN_DATA)
B = Lease(IPv4Network("198.18.3.0/24"), IPv4Address(wire.PEER_B), "vxlan", VXLAN_DATA)


@pytest.fixture(params=["native", "pure"])
def codecs(request: pytest.FixtureRequest) -> str:
    if request.param == "native" and not native.AVAILABLE:
        pytest.fail(f"encap._native did not load: {native.LOAD_ERROR}")
    return str(request.param)


@pytest.fixture(params=["udp", "vxlan"])
def framing(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    made = uvloop.new_event_loop()
    yield made
    made.close()


def build(tun: FakeTun, link: wire.Wire, codecs: str, framing: str) -> UdpDataplane:
    if framing == "vxlan":
        peers = PeerTable(link.port, vxlan_prefix_for(1, MAC))
        dp: UdpDataplane = VxlanDataplane(
            tun, link.sock, peers, OWN, Counters(),  # type: ignore[arg-type]
            vni=1, mac=MAC, vtep_ip=OWN.network_address.packed, port=link.port,
        )  # fmt: skip
    else:
        peers = PeerTable(link.port)
        dp = UdpDataplane(tun, link.sock, peers, OWN, Counters())  # type: ignore[arg-type]
    for lease in (A, B):
        peers.upsert(lease)
    dp.native = codecs == "native"
    return dp


def rules(words: str, peer: str | None = None, direction: str = "out") -> Rules:
    return Rules().changed(Change.make(peer, direction, words))


def the_model(words: str, ip: str, direction: str) -> LinkModel:
    """The model the dataplane makes for that link, with the same seed."""
    spec = parse_spec(words)
    return LinkModel(spec, random.Random(f"{spec.seed}/{ip}/{direction}"))


def packets(n: int, to: Lease = A, size: int = 200) -> list[bytes]:
    dst = to.subnet.network_address.packed[:3] + b"\x09"
    return [
        Segment(1000 + i, 0, 0, 0, bytes([i & 0xFF]) * size, protocol=17,
                src=bytes([198, 18, 1, 5]), dst=dst).build()
        for i in range(n)
    ]  # fmt: skip


def from_a(n: int, size: int = 200) -> list[bytes]:
    return [
        Segment(2000 + i, 0, 0, 0, bytes([i & 0xFF]) * size, protocol=17,
                src=bytes([198, 18, 2, 7]), dst=bytes([198, 18, 1, 5])).build()
        for i in range(n)
    ]  # fmt: skip


def arrived(link: wire.Wire) -> list[tuple[float, bytes]]:
    """Datagrams at the peers' socket now, each with the time it was read."""
    out = []
    while True:
        try:
            data, ancdata, _, _ = link.peers.recvmsg(1 << 17, 256)
        except BlockingIOError:
            return out
        size = gso.gro_size(ancdata, len(data))
        now = time.monotonic()
        out += [(now, data[a:b]) for a, b in gso.split_points(len(data), size)]


def run_until(
    loop: asyncio.AbstractEventLoop, done: Callable[[], bool], timeout: float = 3.0
) -> None:
    async def wait() -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.0002)

    loop.run_until_complete(wait())


def inner(datagram: bytes, framing: str) -> bytes:
    return datagram[vxlan.PREFIX_LEN :] if framing == "vxlan" else datagram


def expected_sends(words: str, sent: list[bytes], ip: str, direction: str) -> Counter[bytes]:
    """What the model lets through for these packets (all arriving at once): each copy,
    with its bit flipped."""
    model = the_model(words, ip, direction)
    out: Counter[bytes] = Counter()
    for packet in sent:
        for send in model.offer(0.0, len(packet)).sends:
            copy = bytearray(packet)
            if send.flip_bit >= 0:
                copy[send.flip_bit // 8] ^= 1 << (send.flip_bit % 8)
            out[bytes(copy)] += 1
    return out


def test_out_sends_exactly_what_the_model_keeps(
    codecs: str, framing: str, wires: Any, loop: asyncio.AbstractEventLoop
) -> None:
    tun, link = FakeTun(True), wires()
    dp = build(tun, link, codecs, framing)
    words = "loss 30% duplicate 10% corrupt 5% seed 4"
    dp.start(loop)
    dp.set_impairment(rules(words))
    sent = packets(120) + packets(5, to=B)
    for packet in sent:
        tun.inject(packet)
    want = expected_sends(words, sent[:120], wire.PEER_A, "out")
    want += expected_sends(words, sent[120:], wire.PEER_B, "out")
    got: list[tuple[float, bytes]] = []
    run_until(loop, lambda: bool(got.extend(arrived(link))) or sum(want.values()) <= len(got))
    run_until(loop, lambda: bool(got.extend(arrived(link))), timeout=0.05)  # nothing more
    assert Counter(inner(data, framing) for _, data in got) == want
    model = the_model(words, wire.PEER_A, "out")
    lost = sum(not model.offer(0.0, len(p)).sends for p in sent[:120])
    assert dp.counters.drops["tx_impair_loss"] >= lost > 20
    assert dp.counters.impaired["tx_duplicated"] > 0 and dp.counters.impaired["tx_corrupted"] > 0
    dp.stop(loop)


def test_in_writes_exactly_what_the_model_keeps(
    codecs: str, framing: str, wires: Any, loop: asyncio.AbstractEventLoop
) -> None:
    tun, link = FakeTun(True), wires()
    dp = build(tun, link, codecs, framing)
    words = "loss 40% seed 8"
    dp.start(loop)
    dp.set_impairment(rules(words, direction="in"))
    run = from_a(40)
    prefix = vxlan.prefix(1, MAC, PEER_MAC) if framing == "vxlan" else b""
    size = len(prefix) + len(run[0])
    link.queue(b"".join(prefix + p for p in run), size, wire.PEER_A)  # one GRO receive
    loop.run_until_complete(asyncio.sleep(0.01))
    written = tun.written()
    model = the_model(words, wire.PEER_A, "in")
    kept = [p for p in run if model.offer(0.0, len(p)).sends]
    assert written == kept and 10 < len(kept) < 35
    assert dp.counters.drops["rx_impair_loss"] == len(run) - len(kept)
    assert dp.counters.rx_packets == len(kept)
    dp.stop(loop)


@pytest.mark.parametrize("direction", ["out", "in"])
def test_delay_holds_each_packet_for_its_time(
    codecs: str, direction: str, wires: Any, loop: asyncio.AbstractEventLoop
) -> None:
    """30 ms, released by the timer with loop wake-ups of a fraction of a millisecond:
    on a busy 2-core machine a release may be late by a few ms, never early."""
    tun, link = FakeTun(True), wires()
    dp = build(tun, link, codecs, "udp")
    dp.start(loop)
    dp.set_impairment(rules("delay 30ms", direction=direction))
    started = time.monotonic()
    if direction == "out":
        for packet in packets(10):
            tun.inject(packet)
        got: list[tuple[float, bytes]] = []
        run_until(loop, lambda: bool(got.extend(arrived(link))) or len(got) >= 10)
        times = [at for at, _ in got]
    else:
        for packet in from_a(10):
            link.queue(packet, 0, wire.PEER_A)
        seen: list[float] = []
        run_until(
            loop,
            lambda: bool(seen.extend([time.monotonic()] * len(tun.written()))) or len(seen) >= 10,
        )
        times = seen
    assert len(times) == 10
    assert all(0.030 <= at - started <= 0.030 + 0.025 for at in times), [t - started for t in times]
    side = "tx" if direction == "out" else "rx"
    assert dp.counters.impaired[f"{side}_delayed"] == 10 and dp.counters.impair_queued == 0
    dp.stop(loop)


def test_rate_paces_and_the_limit_drops_beyond_the_queue(
    codecs: str, wires: Any, loop: asyncio.AbstractEventLoop
) -> None:
    tun, link = FakeTun(True), wires()
    dp = build(tun, link, codecs, "udp")
    dp.start(loop)
    dp.set_impairment(rules("rate 4mbit limit 40"))  # 1000 bytes: 2 ms each
    sent = packets(60, size=1000 - 28)
    started = time.monotonic()
    for packet in sent:
        tun.inject(packet)
    got: list[tuple[float, bytes]] = []
    run_until(loop, lambda: bool(got.extend(arrived(link))) or len(got) >= 40)
    assert [data for _, data in got] == sent[:40]  # in order, the 20 beyond the queue gone
    assert dp.counters.drops["tx_impair_limit"] == 20
    spent = got[-1][0] - started
    assert 0.080 <= spent <= 0.080 * 1.15 + 0.010, spent  # 40 x 2 ms
    dp.stop(loop)


def test_impairment_drops_reach_the_trace_with_their_reason(
    codecs: str, wires: Any, loop: asyncio.AbstractEventLoop
) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.seen: list[tuple[str, str]] = []

        def inner(self, direction: str, packet: Any) -> None:
            self.seen.append(("inner", direction))

        def outer(self, direction: str, datagram: Any, peer: Any) -> None:
            self.seen.append(("outer", direction))

        def drop(self, reason: str, data: Any, peer: Any) -> None:
            self.seen.append(("drop", reason))

    tun, link = FakeTun(True), wires()
    dp = build(tun, link, codecs, "udp")
    dp.start(loop)
    tap = dp.tap = Recorder()  # type: ignore[assignment]
    dp.set_impairment(rules("loss 100%", peer=str(A.subnet)).changed(
        Change.make(str(B.subnet), None, "delay 5ms")
    ))  # fmt: skip
    tun.inject(packets(1)[0])
    tun.inject(packets(1, to=B)[0])
    got: list[tuple[float, bytes]] = []
    run_until(loop, lambda: bool(got.extend(arrived(link))) or len(got) >= 1)
    assert tap.seen == [("drop", "tx_impair_loss"), ("inner", "tx"), ("outer", "tx")]
    dp.stop(loop)


def test_without_rules_the_readers_are_the_usual_ones(codecs: str, wires: Any) -> None:
    """Off costs nothing: no rule, no impaired reader; a rule swaps only its direction's."""
    tun, link = FakeTun(True), wires()
    dp = build(tun, link, codecs, "udp")
    loop = Readers()
    dp.start(loop)  # type: ignore[arg-type]
    usual = dict(loop.callbacks)
    tx, rx = usual[tun.fd], usual[link.sock.fileno()]
    if codecs == "native":
        assert type(tx).__name__ == "builtin_function_or_method"  # native.Drains.tx
    else:
        assert tx == dp.on_tun_readable and rx == dp.on_socket_readable_gro
    dp.set_impairment(rules("delay 1ms"))
    assert loop.callbacks[tun.fd] == dp.on_tun_readable_impaired
    assert loop.callbacks[link.sock.fileno()] == rx
    dp.set_impairment(rules("delay 1ms", direction="in"))
    assert loop.callbacks[tun.fd] == tx
    assert loop.callbacks[link.sock.fileno()] == dp.on_socket_readable_impaired
    dp.set_impairment(Rules())
    assert loop.callbacks == usual and dp.links is None
    dp.stop(loop)  # type: ignore[arg-type]
    assert loop.callbacks == {}
