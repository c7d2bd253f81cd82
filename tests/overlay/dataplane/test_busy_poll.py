"""``--busy-poll-us``: the poll window's bound (overlay.dataplane.busy_poll), and what the
dataplane registers with the loop with and without it, on the native drains and on the
Python reference."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from control.lease import Lease
from control.peer_table import PeerTable
from encap import native
from encap.ipv4 import build_header
from overlay.dataplane import busy_poll
from overlay.dataplane.counters import Counters
from overlay.dataplane.udp import UdpDataplane
from tests.helpers import wire
from tests.helpers.fake_tun import FakeTun

OWN = IPv4Network("198.18.1.0/24")
PEER_A = Lease(IPv4Network("198.18.2.0/24"), IPv4Address(wire.PEER_A))


class Fd:
    """A datagram socket pair: ``fd`` turns readable when ``arrive()`` sends to it, and
    ``drain`` empties it, counting its calls in ``log`` under ``name``."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.peer, self.end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.end.setblocking(False)
        self.fd = self.end.fileno()
        self.name = name
        self.log = log

    def arrive(self) -> None:
        self.peer.send(b"x")

    def drain(self) -> None:
        self.log.append(self.name)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.end.recv(16)

    def close(self) -> None:
        self.peer.close()
        self.end.close()


@pytest.fixture
def fds() -> Iterator[tuple[Fd, Fd, list[str]]]:
    log: list[str] = []
    first, other = Fd("first", log), Fd("other", log)
    yield first, other, log
    first.close()
    other.close()


class StepClock:
    """A clock that advances ``step_ns`` per read (each read, one poll)."""

    def __init__(self, step_ns: int) -> None:
        self.now = 0
        self.step_ns = step_ns
        self.reads = 0

    def __call__(self) -> int:
        self.now += self.step_ns
        self.reads += 1
        return self.now


def polling(first: Fd, other: Fd, window_us: int, clock: Any = time.monotonic_ns) -> Any:
    return busy_poll.polling_after(first.drain, first.fd, other.drain, other.fd, window_us, clock)


def test_an_idle_window_polls_until_it_ends_then_returns(fds: Any) -> None:
    first, other, log = fds
    clock = StepClock(10_000)  # 10 us per poll
    wake = polling(first, other, 100, clock)
    wake()
    # The deadline is read at 10 us (+100 = 110), the loop reads 20..110: 9 polls, then
    # back to the loop; nothing was readable, so only the wake-up's own drain ran.
    assert log == ["first"] and clock.reads == 11
    wake()  # a new wake-up, a new window
    assert log == ["first", "first"] and clock.reads == 22


def test_the_window_is_bounded_in_real_time(fds: Any) -> None:
    first, other, log = fds
    start = time.monotonic_ns()
    polling(first, other, 2000)()
    elapsed_us = (time.monotonic_ns() - start) / 1000
    assert 2000 <= elapsed_us < 2000 + 50_000
    assert log == ["first"]


def test_the_poll_ends_once_the_other_direction_is_served(fds: Any) -> None:
    """The round trip's next hop (a reply on the other fd) is drained in the same
    wake-up, and the poll ends there, long before the window."""
    first, other, log = fds
    other.arrive()
    start = time.monotonic_ns()
    polling(first, other, 1_000_000)()  # a 1 s window
    assert log == ["first", "other"]
    assert (time.monotonic_ns() - start) / 1000 < 500_000


def test_more_of_the_same_direction_is_drained_while_polling(fds: Any) -> None:
    first, other, log = fds
    wake = polling(first, other, 1_000_000)

    def arrive_late() -> None:
        time.sleep(0.02)
        first.arrive()
        time.sleep(0.02)
        other.arrive()

    late = threading.Thread(target=arrive_late)
    late.start()
    wake()
    late.join()
    assert log == ["first", "first", "other"]


def test_a_zero_window_drains_once_and_polls_nothing(fds: Any) -> None:
    first, other, log = fds
    other.arrive()
    clock = StepClock(10_000)
    polling(first, other, 0, clock)()
    assert log == ["first"] and clock.reads == 2


# -- what the dataplane registers (a fake TUN, a real underlay: tests/helpers/wire.py) ----


@pytest.fixture(params=["native", "pure"])
def codecs(request: pytest.FixtureRequest) -> str:
    if request.param == "native" and not native.AVAILABLE:
        pytest.fail(f"encap._native did not load: {native.LOAD_ERROR}")
    return str(request.param)


def dataplane(tun: FakeTun, link: wire.Wire, codecs: str, busy_poll_us: int) -> UdpDataplane:
    peers = PeerTable(link.port)
    peers.upsert(PEER_A)
    dp = UdpDataplane(
        tun,  # type: ignore[arg-type]
        link.sock,
        peers,
        OWN,
        Counters(),
        busy_poll_us=busy_poll_us,
    )
    dp.native = codecs == "native"
    return dp


def packet(src: bytes, dst: bytes, ident: int) -> bytes:
    """An IPv4 UDP packet with an empty payload (no UDP checksum: valid)."""
    udp = struct.pack("!HHHH", 40000, 5201, 8, 0)
    return build_header(src=src, dst=dst, protocol=17, payload_length=8, ident=ident) + udp


@pytest.mark.underlay
def test_without_busy_poll_the_loop_gets_the_drains_themselves(codecs: str, wires: Any) -> None:
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs, busy_poll_us=0)
    tx, rx = dp.reader_callbacks()
    if codecs == "native":
        drains = dp._native_drains()
        assert (tx, rx) == (drains.tx, drains.rx)  # the C methods: no Python per wake-up
    else:
        assert (tx, rx) == (dp.on_tun_readable, dp.on_socket_readable_gro)


@pytest.mark.underlay
@pytest.mark.parametrize("busy_poll_us", [0, 1_000_000])
def test_a_busy_polling_wake_up_also_serves_the_other_direction(
    busy_poll_us: int, codecs: str, wires: Any
) -> None:
    """The loop wakes us for the TUN; a datagram from a peer waits on the socket. Without
    busy-poll it stays there for the loop's next wake-up; with it, the same wake-up
    delivers it into the TUN, and returns right after (the hop it waited for)."""
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs, busy_poll_us)
    tx, _ = dp.reader_callbacks()
    outgoing = packet(bytes([198, 18, 1, 5]), bytes([198, 18, 2, 9]), 1)
    incoming = packet(bytes([198, 18, 2, 9]), bytes([198, 18, 1, 5]), 2)
    tun.inject(outgoing)
    link.queue(incoming, 0, wire.PEER_A)
    start = time.monotonic_ns()
    tx()
    elapsed_us = (time.monotonic_ns() - start) / 1000
    dp.counters.snapshot()  # the native drains' counts now
    assert [d for d, _ in link.datagrams()] == [outgoing]
    written = [p[tun.offset :] for p in tun.raw_written()]
    assert not dp.counters.drops
    if busy_poll_us:
        assert written == [incoming]
        assert dp.counters.rx_packets == 1
        assert elapsed_us < 50_000
    else:
        assert written == []
        assert dp.counters.rx_packets == 0
