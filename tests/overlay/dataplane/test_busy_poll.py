"""``--busy-poll-us``: the poll window's bound (overlay.dataplane.busy_poll), the native
wake-up (encap.native.poll_after) against the reference on real fds, and what the
dataplane registers with the loop with and without it, on the native drains and on the
Python reference.

poll_after waits on fds, so it is tested here with real socket pairs rather than fuzzed
with bytes (tests/encap/fuzz_native.py gives it random arguments only)."""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_an_empty_poll_yields_the_cpu(fds: Any) -> None:
    """Each poll that finds neither fd readable is followed by one yield (a runnable pod
    process gets the CPU at once); a poll that finds one is not."""
    first, other, log = fds
    yields: list[int] = []
    clock = StepClock(10_000)
    wake = busy_poll.polling_after(
        first.drain, first.fd, other.drain, other.fd, 100, clock, lambda: yields.append(1)
    )
    wake()
    assert log == ["first"] and len(yields) == 9  # the 9 polls of the idle window
    other.arrive()
    wake()
    assert log == ["first", "first", "other"] and len(yields) == 9


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
def test_with_busy_poll_the_native_wake_up_is_one_c_call(codecs: str, wires: Any) -> None:
    """With the native drains the loop calls encap.native.poll_after directly (a partial:
    no Python frame per wake-up); without them the reference's closure."""
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs, busy_poll_us=200)
    tx, rx = dp.reader_callbacks()
    if codecs == "native":
        drains = dp._native_drains()
        assert isinstance(tx, functools.partial) and isinstance(rx, functools.partial)
        assert tx.func is rx.func is native.module().poll_after
        assert tx.args == (drains.tx, tun.fd, drains.rx, link.sock.fileno(), 200_000)
        assert rx.args == (drains.rx, link.sock.fileno(), drains.tx, tun.fd, 200_000)
    else:
        assert not isinstance(tx, functools.partial)
        assert tx.__qualname__.startswith("polling_after")


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


# -- the native wake-up: encap.native.poll_after on real fds ------------------------------


def poll_after() -> Any:
    if not native.AVAILABLE:
        pytest.fail(f"encap._native did not load: {native.LOAD_ERROR}")
    return native.module().poll_after


def test_native_zero_window_drains_once_and_polls_nothing(fds: Any) -> None:
    first, other, log = fds
    other.arrive()
    assert poll_after()(first.drain, first.fd, other.drain, other.fd, 0) == 0
    assert log == ["first"]


def test_native_poll_ends_once_the_other_direction_is_served(fds: Any) -> None:
    first, other, log = fds
    other.arrive()
    assert poll_after()(first.drain, first.fd, other.drain, other.fd, 10**9) == 1
    assert log == ["first", "other"]


def test_native_idle_window_polls_then_returns(fds: Any) -> None:
    first, other, log = fds
    polls = poll_after()(first.drain, first.fd, other.drain, other.fd, 2_000_000)
    assert log == ["first"] and polls >= 1


def test_native_wait_releases_the_gil(fds: Any) -> None:
    """The other direction turns readable only if another Python thread runs during the
    wait (the daemon's registry thread must not starve): it does, long before the 1 s
    window ends, and the wake-up serves it."""
    first, other, log = fds
    woke = threading.Event()

    def answer() -> None:
        woke.wait(10)
        other.arrive()

    helper = threading.Thread(target=answer)
    helper.start()

    def first_drain() -> None:
        first.drain()
        woke.set()

    try:
        poll_after()(first_drain, first.fd, other.drain, other.fd, 10**9)
    finally:
        woke.set()
        helper.join()
    assert log == ["first", "other"]


def test_native_drain_error_propagates_and_ends_the_poll(fds: Any) -> None:
    first, other, log = fds
    other.arrive()

    def broken() -> None:
        log.append("broken")
        raise RuntimeError("drain failed")

    with pytest.raises(RuntimeError, match="drain failed"):
        poll_after()(first.drain, first.fd, broken, other.fd, 10**9)
    assert log == ["first", "broken"]


def test_native_bad_arguments_are_one_line_errors(fds: Any) -> None:
    first, other, _ = fds
    call = poll_after()
    with pytest.raises(TypeError, match="callable"):
        call(None, first.fd, other.drain, other.fd, 0)
    with pytest.raises(ValueError, match="distinct fds"):
        call(first.drain, first.fd, other.drain, first.fd, 0)
    with pytest.raises(ValueError, match="distinct fds"):
        call(first.drain, -1, other.drain, other.fd, 0)
    with pytest.raises(ValueError, match="window"):
        call(first.drain, first.fd, other.drain, other.fd, -1)
    with pytest.raises(ValueError, match="window"):
        call(first.drain, first.fd, other.drain, other.fd, 10**9 + 1)


def test_native_closed_fd_is_an_error_not_a_spin(fds: Any) -> None:
    first, other, log = fds
    spare = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    closed = spare.fileno()
    spare.close()
    with pytest.raises(ValueError, match="not open"):
        poll_after()(first.drain, first.fd, other.drain, closed, 10**9)
    assert log == ["first"]


@settings(max_examples=60, deadline=None)
@given(script=st.lists(st.sampled_from(["first", "other", "both"]), min_size=0, max_size=6))
def test_native_calls_the_drains_as_the_reference_does(script: list[str]) -> None:
    """Each call of the first drain makes what ``script`` says readable (more of the same
    direction, the other direction, or both), then the other direction at the end: the
    native wake-up and the reference call the drains in the same order."""
    logs = []
    for implementation in ("reference", "native"):
        log: list[str] = []
        first, other = Fd("first", log), Fd("other", log)
        steps = iter([*script, "other"])

        def first_drain(first: Fd = first, other: Fd = other, steps: Any = steps) -> None:
            first.drain()
            step = next(steps, "other")
            if step in ("first", "both"):
                first.arrive()
            if step in ("other", "both"):
                other.arrive()

        try:
            if implementation == "native":
                poll_after()(first_drain, first.fd, other.drain, other.fd, 10**9)
            else:
                busy_poll.polling_after(first_drain, first.fd, other.drain, other.fd, 10**6)()
        finally:
            first.close()
            other.close()
        logs.append(log)
    assert logs[0] == logs[1]
    assert logs[0][-1] == "other" and logs[0].count("other") == 1
