"""The udp backend's fast path: UDP GSO/GRO batching and TCP super-packets to and from
the TUN.

Unit tests check the sans-IO helpers in ``encap.gso`` against independent re-statements
of their rules (hypothesis); the netns tests run a 3-node testbed (n2 with --no-tun-tso, n3
with --no-offload) and prove with a capture that every datagram on the underlay is still
one inner IPv4 packet no larger than the TUN MTU, with complete checksums.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import struct
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP

from control.lease import Lease
from control.peer_table import PeerTable
from encap import gso, native
from encap.checksum import internet_checksum
from encap.ipv4 import build_header
from overlay.dataplane.counters import Counters
from overlay.dataplane.udp import UdpDataplane
from overlay.lab.testbed import Testbed
from overlay.lab.transfer import transfer
from tests.helpers import wire
from tests.helpers.fake_tun import FakeTun
from tests.helpers.paths import ROOT
from tests.helpers.readers import Readers
from tests.helpers.tcp_streams import Segment, gro_buffers, reseal, resegment, streams
from tests.helpers.testbed import node_status

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- plan_groups / split_points / cmsgs ---------------------------------------------------


@given(
    st.lists(st.tuples(st.integers(1, 1472), st.integers(0, 2)), max_size=300),
    st.integers(1, 70),
    st.integers(1472, 70000),
)
@FAST
def test_plan_groups_follows_the_gso_rules(
    items: list[tuple[int, int]], max_segments: int, max_bytes: int
) -> None:
    packets = [n for n, _ in items]
    keys = [("192.0.2.1", 8285 + k) for _, k in items]
    groups = gso.plan_groups(packets, keys, max_segments, max_bytes)
    # Every packet exactly once, in order.
    assert [i for a, b in groups for i in range(a, b)] == list(range(len(packets)))
    for a, b in groups:
        assert b > a
        size = packets[a]
        assert all(keys[i] == keys[a] for i in range(a, b))
        assert all(packets[i] == size for i in range(a, b - 1))
        assert packets[b - 1] <= size
        assert b - a <= max_segments
        assert sum(packets[a:b]) <= max_bytes or b - a == 1
    # Greedy: a group only ends where the next packet could not have joined it.
    for (a, b), (c, _) in zip(groups, groups[1:], strict=False):
        assert c == b
        joins = (
            keys[c] == keys[a]
            and packets[b - 1] == packets[a]
            and packets[c] <= packets[a]
            and b - a < max_segments
            and sum(packets[a : c + 1]) <= max_bytes
        )
        assert not joins


def test_plan_groups_typical_bulk_batch() -> None:
    packets = [1472] * 100 + [300] + [52] * 3
    keys = [("192.0.2.2", 8285)] * len(packets)
    assert gso.plan_groups(packets, keys) == [(0, 44), (44, 88), (88, 101), (101, 104)]
    assert gso.plan_groups([], []) == []


@given(st.integers(1, 65535), st.integers(1, 70000))
@FAST
def test_split_points_cover_the_buffer(total: int, size: int) -> None:
    pieces = gso.split_points(total, size)
    assert pieces[0][0] == 0 and pieces[-1][1] == total
    for (a, b), (c, _) in zip(pieces, pieces[1:], strict=False):
        assert b == c and b - a == size
    assert 0 < pieces[-1][1] - pieces[-1][0] <= size


def test_cmsgs() -> None:
    assert gso.segment_cmsg(1400) == [(17, 103, struct.pack("=H", 1400))]
    assert gso.gro_size([(17, 104, struct.pack("=i", 1432))], 9000) == 1432
    assert gso.gro_size([], 9000) == 9000
    assert gso.gro_size([(1, 2, b"xxxx")], 77) == 77


# -- valid_pieces / plan_tun_writes -----------------------------------------------------


def _without_ident(packet: bytes) -> bytes:
    """IPv4 ID (and so the header checksum) may change when the kernel resegments."""
    return packet[:4] + packet[6:10] + packet[12:]


ANY = (0, 32)  # (network >> shift, shift) that every address is inside


def planned_packets(writes: list[gso.Write]) -> list[bytes]:
    out = [seg for buffers, _, _ in writes for seg in resegment(buffers)]
    for buffers, count, size in writes:
        assert count == len(resegment(buffers))
        assert size == sum(map(len, resegment(buffers)))
    return out


@given(streams())
@FAST
def test_plan_tun_writes_resegments_to_the_same_packets(packets: list[bytes]) -> None:
    drops: Counter[str] = Counter()
    out: list[bytes] = []
    writes = 0
    for data, size, segment in gro_buffers(packets):
        planned = gso.plan_tun_writes(data, size, segment, (ANY,), ANY, drops)
        writes += len(planned)
        out += planned_packets(planned)
    assert not drops
    assert [_without_ident(p) for p in out] == [_without_ident(p) for p in packets]
    assert writes <= len(packets)


def test_plan_tun_writes_merges_a_bulk_run_into_one_write() -> None:
    seq, packets = 5, []
    for i in range(44):
        payload = bytes(1420 if i < 43 else 300)
        packets.append(Segment(40000, seq, 1, 0x18 if i == 43 else 0x10, payload, ident=i).build())
        seq += len(payload)
    [(data, size, segment)] = gro_buffers(packets)
    writes = gso.plan_tun_writes(data, size, segment, (ANY,), ANY, Counter())
    assert [count for _, count, _ in writes] == [44]
    buffers = writes[0][0]
    assert len(buffers) == 2 + 44  # vnet header, IPv4+TCP header, 44 payload views
    assert all(isinstance(b, memoryview) for b in buffers[2:])  # no copies of payloads
    header = bytes(buffers[1])
    assert header[33] == 0x18  # the last segment's PSH
    assert int.from_bytes(header[2:4], "big") == 52 + 43 * 1420 + 300
    assert struct.unpack("=BBHHHH", buffers[0]) == (1, 1, 52, 1420, 20, 16)
    assert planned_packets(writes) == [bytes(p) for p in packets]  # same IDs here too


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (3, 0x77, "rx_bad_length"),  # IPv4 total length
        (0, 0x65, "rx_not_ipv4"),  # version 6
        (13, 99, "rx_foreign_source"),  # source 198.99.x.x
        (17, 99, "rx_not_our_subnet"),  # destination 198.99.x.x
        (1, 4, None),  # TOS: valid, but ends the run
        (35, 1, None),  # window: valid, but ends the run
        (9, 17, "rx_bad_l4_header"),  # "UDP" whose length field is TCP's sequence number
        (10, 0, "rx_bad_ip_checksum"),  # not resealed below
        (500, 0x55, "rx_bad_l4_checksum"),  # a payload byte: not resealed below
        (0, 0x46, "rx_bad_ip_options"),  # IHL 6: the first 4 TCP bytes as an option
    ],
)
def test_plan_tun_writes_checks_every_segment_of_a_run(
    offset: int, value: int, reason: str | None
) -> None:
    seq, packets = 1, []
    for i in range(6):
        packets.append(Segment(40000, seq, 1, 0x10, bytes([i]) * 1000, ident=i).build())
        seq += 1000
    [(data, size, segment)] = gro_buffers(packets)
    data[3 * segment + offset] = value
    if reason not in ("rx_bad_ip_checksum", "rx_bad_l4_checksum"):
        reseal(data, 3 * segment, 4 * segment)
    theirs = ours = (0xC612, 16)  # 198.18.0.0/16 for both ends
    drops: Counter[str] = Counter()
    writes = gso.plan_tun_writes(data, size, segment, (theirs,), ours, drops)
    expected: Counter[str] = Counter()
    good = gso.valid_pieces(data, size, segment, (theirs,), ours, expected)
    assert drops == expected == (Counter({reason: 1}) if reason else Counter())
    assert [count for _, count, _ in writes] == ([3, 2] if reason else [3, 1, 2])
    assert [_stripped(p) for p in planned_packets(writes)] == [
        _stripped(bytes(data[a:b])) for a, b in good
    ]


def _stripped(packet: bytes) -> bytes:
    """Without the fields a resegmenting kernel rewrites: IPv4 ID and both checksums."""
    if len(packet) >= 40 and packet[0] == 0x45 and packet[9] == 6:
        packet = packet[:36] + packet[38:]
    return _without_ident(packet)


@given(
    streams(),
    st.lists(
        st.tuples(
            st.integers(0, 10**6),
            st.sampled_from([0, 1, 2, 3, 6, 7, 8, 9, 12, 16, 19, 20, 23, 27, 31, 32, 33, 35, 40]),
            st.integers(0, 255),
        ),
        max_size=4,
    ),
    st.sampled_from([(198, 18, 1, 0, 24), (198, 18, 1, 0, 28), (10, 0, 0, 0, 8)]),
    st.sampled_from([(198, 18, 2, 0, 24), (198, 18, 0, 0, 16), (198, 18, 3, 0, 24)]),
)
@FAST
def test_plan_tun_writes_validates_like_valid_pieces(
    packets: list[bytes],
    damage: list[tuple[int, int, int]],
    source: tuple[int, ...],
    destination: tuple[int, ...],
) -> None:
    def net(a: int, b: int, c: int, d: int, prefix: int) -> tuple[int, int]:
        return (int.from_bytes(bytes([a, b, c, d]), "big") >> (32 - prefix), 32 - prefix)

    theirs, ours = net(*source), net(*destination)
    for data, size, segment in gro_buffers(packets):
        for where, offset, value in damage:  # corrupt header bytes of some datagrams
            piece = (where % -(-size // segment)) * segment
            if piece + offset < size:
                data[piece + offset] = value
        expected: Counter[str] = Counter()
        good = gso.valid_pieces(data, size, segment, (theirs,), ours, expected)
        drops: Counter[str] = Counter()
        planned = planned_packets(gso.plan_tun_writes(data, size, segment, (theirs,), ours, drops))
        assert drops == expected
        assert [_stripped(p) for p in planned] == [_stripped(bytes(data[a:b])) for a, b in good]


# -- the dataplane's stages on a real underlay (tests/helpers/wire.py) and a fake TUN ------

OWN = IPv4Network("198.18.1.0/24")
PEER_A = Lease(IPv4Network("198.18.2.0/24"), IPv4Address(wire.PEER_A))
PEER_B = Lease(IPv4Network("198.18.3.0/24"), IPv4Address(wire.PEER_B))
UNDERLAY = pytest.mark.underlay


@pytest.fixture(params=["native", "pure"])
def codecs(request: pytest.FixtureRequest) -> str:
    """Each dataplane test runs on the native module and on the pure-Python reference."""
    if request.param == "native" and not native.AVAILABLE:
        pytest.fail(f"encap._native did not load: {native.LOAD_ERROR}")
    return str(request.param)


def dataplane(
    tun: FakeTun,
    link: wire.Wire,
    codecs: str,
    offload: bool = True,
    tun_tso: bool = False,
    mtu: int = 0,
) -> UdpDataplane:
    peers = PeerTable(link.port)
    peers.upsert(PEER_A)
    peers.upsert(PEER_B)
    dp = UdpDataplane(
        tun, link.sock, peers, OWN, Counters(), offload=offload, tun_tso=tun_tso, mtu=mtu
    )  # type: ignore[arg-type]
    dp.native = codecs == "native"
    return dp


def tx_batch() -> list[tuple[bytes, tuple[str, int]]]:
    """A drain's worth of packets: a bulk run to A, a short one, ACKs, a run to B."""

    def to(peer: Lease, i: int, payload: int) -> bytes:
        dst = bytes(peer.subnet.network_address.packed[:3]) + b"\x09"
        return (
            build_header(
                src=bytes([198, 18, 1, 5]), dst=dst, protocol=17, payload_length=payload, ident=i
            )
            + bytes([i & 0xFF]) * payload
        )

    a, b = (wire.PEER_A, 8285), (wire.PEER_B, 8285)
    plan = [(PEER_A, 1452)] * 70 + [(PEER_A, 300)] + [(PEER_A, 32)] * 3 + [(PEER_B, 1452)] * 5
    return [(to(peer, i, n), a if peer is PEER_A else b) for i, (peer, n) in enumerate(plan)]


@UNDERLAY
@pytest.mark.parametrize("vnet", [True, False])
def test_tx_sends_gso_groups_of_whole_packets(vnet: bool, codecs: str, wires: Any) -> None:
    tun, link = FakeTun(vnet), wires()
    dp = dataplane(tun, link, codecs)
    assert dp.features() == {
        "native": codecs == "native",
        "offload": True,
        "udp_gso": True,
        "udp_gro": True,
        "tun_gso": vnet,
        "tun_tso": False,
    }
    batch = tx_batch()
    for packet, _ in batch:
        tun.inject(packet)
    dp.on_tun_readable()
    assert link.datagrams() == batch
    # 70 + 1 to A cut at 44 segments, the 3 ACKs, B's 5: five sends, no single sendto.
    assert [(len(d) // size if size else 0, size) for d, size, _ in link.sent()] == [
        (44, 1472),
        (26, 1472),
        (3, 52),
        (5, 1472),
    ]
    assert dp.counters.tx_packets == len(batch)
    assert dp.counters.tx_gso_sends == 4
    # One histogram entry per send, by datagrams carried; the peers' counters per send.
    assert {n: k for n, k in enumerate(dp.counters.tx_batch) if k} == {44: 1, 27: 1, 3: 1, 5: 1}
    a, b = (dp.peers.get(p.subnet) for p in (PEER_A, PEER_B))
    assert a is not None and b is not None
    assert (a.stats.tx_packets, b.stats.tx_packets) == (74, 5)
    assert a.stats.tx_bytes == sum(len(p) for p, addr in batch if addr[0] == wire.PEER_A)
    assert a.stats.last_tx > 0 and a.stats.rx_packets == 0 and a.stats.last_rx == 0


@UNDERLAY
def test_tx_cuts_tun_super_packets_and_finishes_partial_checksums(codecs: str, wires: Any) -> None:
    """With TSO the TUN hands us a 64 KiB TCP super-packet and partial checksums; what
    leaves is whole MTU-sized packets with complete checksums (scapy checks them)."""
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs, tun_tso=True)
    assert dp.features()["tun_tso"]
    dst = bytes(PEER_A.subnet.network_address.packed[:3]) + b"\x09"
    ip = IP(src="198.18.1.5", dst=".".join(map(str, dst)), id=7, flags="DF")
    tcp = ip / TCP(sport=40000, dport=5201, seq=1000, flags="PA") / (bytes(range(256)) * 170)
    raw = bytearray(bytes(tcp))
    struct.pack_into("!H", raw, 36, 0x1234)  # the kernel leaves the pseudo-header sum
    tun.inject(bytes(raw), struct.pack("=BBHHHH", 1, 1, 40, 1432, 20, 16))
    udp = bytearray(bytes(ip / UDP(sport=5000, dport=5201) / (b"u" * 1000)))
    udp[26:28] = b"\x00\x07"  # any partial sum: it is recomputed over the whole datagram
    tun.inject(bytes(udp), struct.pack("=BBHHHH", 1, 0, 0, 0, 20, 6))
    tun.inject(bytes(raw), struct.pack("=BBHHHH", 1, 4, 40, 1432, 20, 16))  # TCPV6: no
    valid = bytes(ip / UDP(sport=5000, dport=5202) / (b"v" * 100))
    tun.inject(valid, struct.pack("=BBHHHH", 2, 0, 0, 0, 0, 0))  # DATA_VALID: as it is
    dp.on_tun_readable()
    datagrams = [d for d, _ in link.datagrams()]
    assert datagrams.pop() == valid
    assert len(datagrams) == 31 + 1  # 43,520 B of payload in 1432-byte segments, the UDP one
    payload = b""
    for i, datagram in enumerate(datagrams[:-1]):
        packet = IP(datagram)
        assert len(datagram) <= 1472 and packet.id == 7 + i
        assert packet[TCP].seq == 1000 + 1432 * i
        assert str(packet[TCP].flags) == ("PA" if i == 30 else "A")
        resealed = packet.copy()
        del resealed.chksum, resealed[TCP].chksum
        assert bytes(IP(bytes(resealed))) == datagram  # both checksums complete
        payload += bytes(packet[TCP].payload)
    assert payload == bytes(range(256)) * 170
    sealed = IP(datagrams[-1])
    del sealed[UDP].chksum
    assert bytes(IP(bytes(sealed))) == bytes(ip / UDP(sport=5000, dport=5201) / (b"u" * 1000))
    assert dp.counters.tx_tun_super_packets == 1
    assert dp.counters.drops == {"tx_gso_unsupported": 1}


@UNDERLAY
@pytest.mark.parametrize(
    ("error", "worked_before", "gso_after"),
    [(errno.EIO, True, False), (errno.EINVAL, False, False), (errno.EINVAL, True, True)],
)
def test_tx_falls_back_to_sendto_when_a_gso_send_fails(
    error: int, worked_before: bool, gso_after: bool, codecs: str, wires: Any
) -> None:
    """EINVAL for real: the kernel refuses GSO on a socket without UDP checksums
    (SO_NO_CHECK). EIO (a device that cannot checksum a GSO send) cannot be produced on
    this kernel, so seccomp fails the sendmsg calls with it (tests/helpers/wire.py)."""
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs)
    if worked_before:
        tun.inject(tx_batch()[0][0])
        tun.inject(tx_batch()[1][0])
        dp.on_tun_readable()
        assert link.sent()[0][1] == 1472
        link.log.clear()
    batch = tx_batch()
    for packet, _ in batch:
        tun.inject(packet)
    if error == errno.EINVAL:
        link.sock.setsockopt(socket.SOL_SOCKET, wire.SO_NO_CHECK, 1)
        dp.on_tun_readable()
    else:
        wire.failing_sendmsg(error, dp.on_tun_readable)
    # Every packet still leaves, one sendto each; GSO stays on only after a late EINVAL.
    assert link.datagrams() == batch and all(size == 0 for _, size, _ in link.sent())
    assert dp.gso is gso_after and dp.features()["udp_gso"] is gso_after
    assert not dp.counters.drops
    assert dp.counters.tx_gso_sends == worked_before and dp.counters.tx_batch[1] == len(batch)


class OldKernelSocket(socket.socket):
    """A socket on a kernel without UDP_SEGMENT and UDP_GRO (Linux < 4.18): the refusal
    is faked, the rest is the real socket."""

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
        if level == gso.SOL_UDP and option in (gso.UDP_SEGMENT, gso.UDP_GRO):
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        super().setsockopt(level, option, value, *rest)


@UNDERLAY
def test_unsupported_offloads_and_no_offload_take_the_plain_path(codecs: str, wires: Any) -> None:
    for sock_class, offload in ((OldKernelSocket, True), (None, False)):
        tun, link = FakeTun(True), wires(sock_class=sock_class)
        dp = dataplane(tun, link, codecs, offload=offload)
        assert dp.features() == {
            "native": codecs == "native",
            "offload": offload,
            "udp_gso": False,
            "udp_gro": False,
            "tun_gso": False,
            "tun_tso": False,
        }
        assert link.sock.getsockopt(gso.SOL_UDP, gso.UDP_GRO) == 0 and tun.vnet_hdr is False
        batch = tx_batch()
        for packet, _ in batch:
            tun.inject(packet)
        dp.on_tun_readable()
        assert link.datagrams() == batch and all(size == 0 for _, size, _ in link.sent())
        link.close()


@UNDERLAY
@pytest.mark.parametrize("vnet", [True, False])
def test_rx_splits_gro_receives_and_validates_each_datagram(
    vnet: bool, codecs: str, wires: Any
) -> None:
    tun, link = FakeTun(vnet), wires()
    dp = dataplane(tun, link, codecs)
    src, dst = bytes([198, 18, 2, 7]), bytes([198, 18, 1, 5])  # from A's subnet to ours
    seq, run = 1, []
    for i in range(30):
        segment = Segment(40000, seq, 1, 0x10, bytes([i]) * 1400, ident=i, src=src, dst=dst)
        run.append(segment.build())
        seq += 1400
    spoofed = bytearray(run[10])
    spoofed[12:16] = bytes([198, 18, 3, 7])  # B's subnet, sent by A
    reseal(spoofed, 0, len(spoofed))
    datagrams = run[:10] + [bytes(spoofed)] + run[11:]
    link.queue(b"".join(datagrams), len(run[0]), wire.PEER_A)
    link.queue(run[0], 0, wire.STRANGER)  # not a peer
    link.queue(b"", 0, wire.PEER_A)  # empty
    link.queue(run[0][:30], 0, wire.PEER_A)  # truncated
    dp.on_socket_readable_gro()
    assert [_without_ident(p) for p in tun.written()] == [
        _without_ident(p) for p in run[:10] + run[11:]
    ]
    assert dp.counters.drops == Counter(
        {"rx_foreign_source": 1, "rx_unknown_peer": 1, "rx_not_ipv4": 1, "rx_bad_length": 1}
    )
    assert dp.counters.rx_packets == 29
    # With IFF_VNET_HDR the two runs around the spoofed datagram are two super-packets.
    assert tun.writes == (2 if vnet else 29)
    assert dp.counters.rx_tun_super_packets == (2 if vnet else 0)
    assert dp.counters.rx_gro_receives == 1


@UNDERLAY
def test_rx_counts_batches_and_peers(codecs: str, wires: Any) -> None:
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs)
    src, dst = bytes([198, 18, 2, 7]), bytes([198, 18, 1, 5])
    run = [Segment(1, 1 + 100 * i, 1, 0x10, b"r" * 100, src=src, dst=dst).build() for i in range(7)]
    link.queue(b"".join(run), len(run[0]), wire.PEER_A)
    link.queue(run[0], 0, wire.PEER_A)  # a single one, from a GRO socket
    dp.on_socket_readable_gro()
    assert {n: k for n, k in enumerate(dp.counters.rx_batch) if k} == {7: 1, 1: 1}
    a = dp.peers.get(PEER_A.subnet)
    assert a is not None
    assert (a.stats.rx_packets, a.stats.rx_bytes) == (8, 8 * len(run[0]))
    assert a.stats.last_rx > 0 and a.stats.tx_packets == 0


@UNDERLAY
def test_a_nodes_traffic_counts_on_its_oldest_lease(codecs: str, wires: Any) -> None:
    """A node with two leases: what we send to either and what it sends from either
    counts on its oldest lease (PeerTable.by_public_ip), in both directions."""
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs)
    second = Lease(IPv4Network("198.18.9.0/24"), IPv4Address(wire.PEER_A))
    dp.peers.upsert(second)
    src = bytes([198, 18, 1, 5])
    for n in (9, 2, 9):  # to A's second lease, its first, its second again
        tun.inject(Segment(1, 1, 1, 0x18, b"t" * 60, src=src, dst=bytes([198, 18, n, 1])).build())
    dp.on_tun_readable()
    for n in (9, 2):
        packet = Segment(1, 1, 1, 0x18, b"r" * 60, src=bytes([198, 18, n, 7]), dst=src).build()
        link.queue(packet, 0, wire.PEER_A)
    dp.on_socket_readable_gro()
    oldest, newer = dp.peers.get(PEER_A.subnet), dp.peers.get(second.subnet)
    assert oldest is not None and newer is not None
    assert (oldest.stats.tx_packets, oldest.stats.rx_packets) == (3, 2)
    assert (newer.stats.tx_packets, newer.stats.rx_packets) == (0, 0)


@UNDERLAY
def test_rx_accepts_every_lease_of_a_sender(codecs: str, wires: Any) -> None:
    """A node may hold several leases (PeerTable.sources_of): its datagrams are accepted
    from inside any of them, and only those."""
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs)
    dp.peers.upsert(Lease(IPv4Network("198.18.9.0/24"), IPv4Address(wire.PEER_A)))
    dst = bytes([198, 18, 1, 5])
    packets = [
        Segment(1, 1, 1, 0x18, b"p" * 60, src=bytes([198, 18, n, 7]), dst=dst).build()
        for n in (2, 9, 3)  # A's first lease, A's second lease, B's
    ]
    for packet in packets:
        link.queue(packet, 0, wire.PEER_A)
    dp.on_socket_readable_gro()
    assert [_without_ident(p) for p in tun.written()] == [_without_ident(p) for p in packets[:2]]
    assert dp.counters.drops == {"rx_foreign_source": 1}


# -- packets beyond the TUN's MTU (queued before the underlay's MTU was lowered) ----------


def _frag_needed_for(reply: bytes, original: bytes, mtu: int) -> bool:
    """``reply`` is ICMP frag-needed from our TUN address to ``original``'s sender, with
    ``mtu`` and the quote a router sends (scapy decodes it)."""
    parsed = IP(reply)
    return bool(
        parsed.src == "198.18.1.0"
        and parsed.dst == IP(original).src
        and (parsed[ICMP].type, parsed[ICMP].code, parsed[ICMP].nexthopmtu) == (3, 4, mtu)
        and reply[28:] == original[:548]
    )


@UNDERLAY
def test_tx_answers_frag_needed_beyond_the_mtu(codecs: str, wires: Any) -> None:
    """MTU 1372: a TCP packet of 1428 bytes with DF, and a super-packet cut into segments
    of 1452, are dropped and answered with frag-needed (mtu 1372); a UDP packet of 1428
    without DF goes as it is; packets of exactly 1372 go. After set_mtu(1472) the same
    packets go: the native drains heard of the new MTU."""
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs, tun_tso=True, mtu=1372)
    src, to_a = bytes([198, 18, 1, 5]), bytes([198, 18, 2, 9])
    options = b""  # TCP headers of 20 bytes: the super-packet's hdr_len 40
    big_tcp = Segment(1, 1, 1, 0x18, b"t" * 1388, src=src, dst=to_a, options=options).build()
    big_udp = Segment(1, 1, 1, 0, b"u" * 1400, src=src, dst=to_a, protocol=17).build()
    fits = Segment(1, 1, 1, 0x18, b"f" * 1332, src=src, dst=to_a, options=options).build()
    bulk = Segment(1, 1, 1, 0x10, b"s" * 4200, src=src, dst=to_a, options=options).build()
    super_hdr = struct.pack("=BBHHHH", 1, 1, 40, 1412, 20, 16)  # segments of 40 + 1412
    assert (len(big_tcp), len(big_udp), len(fits)) == (1428, 1428, 1372)

    def run() -> tuple[list[bytes], list[bytes]]:
        """One drain of the four reads: the datagrams it sent, what it wrote back."""
        before = len(link.datagrams())  # every send so far
        for packet in (big_tcp, big_udp, fits):
            tun.inject(packet)
        tun.inject(bulk, super_hdr)
        dp.on_tun_readable()
        return [d for d, _ in link.datagrams()[before:]], tun.written()

    sent, written = run()
    assert sent == [big_udp, fits]
    # The super-packet's quote is its first segment, as cut (ident, sequence, checksums).
    first_segment = Segment(1, 1, 1, 0x10, b"s" * 1412, src=src, dst=to_a, options=b"").build()
    assert len(written) == 2
    assert _frag_needed_for(written[0], big_tcp, 1372)
    assert _frag_needed_for(written[1], first_segment, 1372)
    counters = dp.counters.snapshot()
    assert counters["drops"] == {"tx_too_big": 2}
    assert counters["icmp_frag_needed_sent"] == 2
    assert counters["tx_packets"] == 2

    dp.set_mtu(1472)
    sent, written = run()
    assert written == []
    assert len(sent) == 3 + 3  # the three packets, the super-packet as 3 segments of <= 1452
    assert sent[:3] == [big_tcp, big_udp, fits]
    assert dp.counters.snapshot()["drops"] == {"tx_too_big": 2}


@UNDERLAY
def test_set_mtu_reaches_a_running_dataplane(codecs: str, wires: Any) -> None:
    """Started on an event loop (the native drains are its readers), then set_mtu: the
    readers that run next use the new MTU, and nothing the old ones counted is lost."""
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs, mtu=1372)
    src, to_a = bytes([198, 18, 1, 5]), bytes([198, 18, 2, 9])
    packet = Segment(1, 1, 1, 0x18, b"t" * 1388, src=src, dst=to_a, options=b"").build()
    loop = asyncio.new_event_loop()

    def run_until(done: Callable[[], object]) -> None:
        for _ in range(200):
            loop.run_until_complete(asyncio.sleep(0.01))
            if done():
                return
        raise AssertionError("the dataplane did not get to it in 2 s")

    try:
        dp.start(loop)
        tun.inject(packet)
        written: list[bytes] = []
        run_until(lambda: written.extend(tun.written()) or written)
        assert _frag_needed_for(written[0], packet, 1372)
        dp.set_mtu(1472)
        tun.inject(packet)
        run_until(link.datagrams)
        assert [d for d, _ in link.datagrams()] == [packet]
        dp.stop(loop)
        counters = dp.counters.snapshot()
        assert (counters["drops"], counters["tx_packets"]) == ({"tx_too_big": 1}, 1)
    finally:
        loop.close()


class RecordingTap:
    """A fake trace: the Tap protocol (overlay.observe.tap) is the interface under test here."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def inner(self, direction: str, packet: bytes) -> None:
        self.events.append(("inner", direction, bytes(packet)))

    def outer(self, direction: str, datagram: bytes, peer: tuple[str, int]) -> None:
        self.events.append(("outer", direction, bytes(datagram), peer))

    def drop(self, reason: str, data: bytes, peer: tuple[str, int] | None) -> None:
        self.events.append(("drop", reason, bytes(data), peer))


@UNDERLAY
def test_an_attached_tap_sees_every_packet_and_drop(codecs: str, wires: Any) -> None:
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs, tun_tso=True)
    tap = RecordingTap()
    dp.tap = tap
    # TX: a TCP super-packet (reported as the segments it is cut into), a packet with
    # no route, and a 10-byte runt.
    src, to_a = bytes([198, 18, 1, 5]), bytes([198, 18, 2, 9])
    bulk = Segment(1, 1, 1, 0x10, bytes(range(200)) * 10, src=src, dst=to_a).build()
    tun.inject(bulk, struct.pack("=BBHHHH", 1, 1, 52, 800, 20, 16))
    nowhere = Segment(1, 1, 1, 0x10, b"n", src=src, dst=bytes([198, 18, 77, 1])).build()
    tun.inject(nowhere)
    tun.inject(b"\x45" + bytes(9))
    dp.on_tun_readable()
    sent = [d for d, _ in link.datagrams()]
    assert len(sent) == 3  # 2000 bytes of payload in 800-byte segments
    [unreachable] = tun.written()  # the ICMP error for the packet without a route
    assert unreachable[9] == 1 and unreachable[28:] == nowhere
    # The ICMP error goes into the TUN, so the trace shows it written there.
    expected_tx: list[tuple[Any, ...]] = [("drop", "tx_no_route", nowhere, None)]
    expected_tx.append(("inner", "rx", unreachable))
    expected_tx.append(("drop", "tx_not_ipv4", b"\x45" + bytes(9), None))
    for datagram in sent:
        expected_tx += [("inner", "tx", datagram), ("outer", "tx", datagram, (wire.PEER_A, 8285))]
    assert tap.events == expected_tx
    # RX: one GRO receive from A with a spoofed datagram in it, one from a stranger.
    tap.events.clear()
    dst = bytes([198, 18, 1, 5])
    good = [
        Segment(1, 1 + 50 * i, 1, 0x10, b"g" * 50, src=bytes([198, 18, 2, 7]), dst=dst).build()
        for i in range(3)
    ]
    spoofed = bytearray(good[1])
    spoofed[12:16] = bytes([198, 18, 3, 7])
    reseal(spoofed, 0, len(spoofed))
    batch = [good[0], bytes(spoofed), good[2]]
    link.queue(b"".join(batch), len(good[0]), wire.PEER_A)
    link.queue(good[0], 0, wire.STRANGER)
    dp.on_socket_readable_gro()
    peer = (wire.PEER_A, 8285)
    assert tap.events == [
        ("outer", "rx", good[0], peer),
        ("inner", "rx", good[0]),
        ("outer", "rx", bytes(spoofed), peer),
        ("drop", "rx_foreign_source", bytes(spoofed), peer),
        ("outer", "rx", good[2], peer),
        ("inner", "rx", good[2]),
        ("drop", "rx_unknown_peer", good[0], (wire.STRANGER, 8285)),
    ]
    assert [_without_ident(p) for p in tun.written()] == [
        _without_ident(good[0]),
        _without_ident(good[2]),
    ]
    assert dp.counters.rx_packets == 2
    # Detached: the fast path again, nothing reported.
    dp.tap = None
    link.queue(b"".join(batch), len(good[0]), wire.PEER_A)
    dp.on_socket_readable_gro()
    assert len(tap.events) == 7 and dp.counters.rx_packets == 4


@UNDERLAY
@pytest.mark.parametrize("vnet", [True, False])
def test_rx_gathers_single_datagrams_into_runs(vnet: bool, codecs: str, wires: Any) -> None:
    """A sender without GSO (the kernel's vxlan device, flannel's C proxy) sends one
    datagram per packet: a run of them from one peer is gathered and written as if GRO
    had coalesced it; whatever does not fit the run ends it and is still delivered."""
    tun, link = FakeTun(vnet), wires()
    dp = dataplane(tun, link, codecs)
    src, dst = bytes([198, 18, 2, 7]), bytes([198, 18, 1, 5])
    seq, run = 1, []
    for i in range(100):
        size = 1400 if i not in (20, 99) else 700  # two short ones, each ends a run
        run.append(Segment(40000, seq, 1, 0x10, bytes([i]) * size, ident=i, src=src, dst=dst))
        seq += size
    packets = [segment.build() for segment in run]
    from_b = Segment(1, 1, 1, 0x10, b"b" * 100, src=bytes([198, 18, 3, 7]), dst=dst).build()
    arrivals = [(p, wire.PEER_A) for p in packets[:30]] + [(from_b, wire.PEER_B)]
    arrivals += [(p, wire.PEER_A) for p in packets[30:]]
    for data, source in arrivals:
        link.queue(data, 0, source)
    dp.on_socket_readable_gro()
    assert [_without_ident(p) for p in tun.written()] == [
        _without_ident(p) for p in packets[:30] + [from_b] + packets[30:]
    ]
    assert not dp.counters.drops and dp.counters.rx_packets == 101
    assert dp.counters.rx_gro_receives == 0
    # Runs: 0-20 (ends short), 21-29 (ends at B's datagram), B alone, then 30-74 (45
    # datagrams of 1440 bytes: the next would pass 64 KiB) and 75-99.
    assert tun.writes == (5 if vnet else 101)
    assert dp.counters.rx_tun_super_packets == (4 if vnet else 0)


@UNDERLAY
def test_rx_plain_path_validates_each_datagram(codecs: str, wires: Any) -> None:
    tun, link = FakeTun(False), wires()
    dp = dataplane(tun, link, codecs, offload=False)
    good = Segment(1, 1, 1, 0x10, b"x" * 50, src=bytes([198, 18, 2, 7]), dst=bytes([198, 18, 1, 5]))
    packet = good.build()
    for data in (packet, b"", packet[:30], b"\x60" + packet[1:]):
        link.queue(data, 0, wire.PEER_A)
    link.queue(packet, 0, wire.PEER_B)  # from B, inside A's subnet
    dp.on_socket_readable()
    assert tun.written() == [packet]
    assert dp.counters.drops == Counter(
        {"rx_not_ipv4": 2, "rx_bad_length": 1, "rx_foreign_source": 1}
    )


@UNDERLAY
def test_rx_counts_a_full_or_broken_tun(codecs: str, wires: Any) -> None:
    tun, link = FakeTun(True, buffer=4096), wires()  # room for a few writes, then EAGAIN
    dp = dataplane(tun, link, codecs)
    src, dst = bytes([198, 18, 2, 7]), bytes([198, 18, 1, 5])
    run = [Segment(1, 1 + 1000 * i, 1, 0x11, bytes(1000), src=src, dst=dst) for i in range(40)]
    for segment in run:
        link.queue(segment.build(), 0, wire.PEER_A)
    dp.on_socket_readable_gro()
    written = dp.counters.rx_packets
    assert 0 < written < 40 and dp.counters.drops == {"rx_tun_full": 40 - written}
    tun.kernel.close()  # the reader gone: the writes fail
    link.queue(run[0].build(), 0, wire.PEER_A)
    dp.on_socket_readable_gro()
    assert dp.counters.drops["rx_tun_error"] == 1 and dp.counters.rx_packets == written


SWITCH_TUN = r"""
import os, select, subprocess, sys
sys.path.insert(0, sys.argv[1])
from tun.device import TunDevice
tun = TunDevice("fpt0")
sh = lambda cmd: subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout
sh("ip addr add 10.77.0.1/32 dev fpt0 && ip link set fpt0 up mtu 1400 txqueuelen 5000")
sh("ip route add 10.77.0.0/16 dev fpt0")
old_fd = tun.fd
assert tun.enable_vnet_hdr() and tun.vnet_hdr and tun.offset == 10 and tun.enable_vnet_hdr()
link = sh("ip -d link show fpt0")
assert "vnet_hdr on" in link and "mtu 1400" in link and "qlen 5000" in link, link
assert "10.77.0.1/32" in sh("ip addr show fpt0") and "10.77.0.0/16" in sh("ip route")
subprocess.Popen("ping -c1 -W1 10.77.0.9 >/dev/null", shell=True)
select.select([tun.fd], [], [], 3)
(packet,) = tun.read_batch(1)
assert packet[0] == 0x45 and packet[16:20] == bytes([10, 77, 0, 9]), packet[:20].hex()
tun.close()
assert subprocess.run("ip link show fpt0", shell=True, capture_output=True).returncode != 0
print("ok")
"""


@pytest.mark.netns
def test_tun_switches_to_vnet_hdr_in_place(netns: Any) -> None:
    ns = netns("tun")
    root = str(ROOT)
    result = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SWITCH_TUN, root],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


# -- end to end on a testbed ---------------------------------------------------------------

CAPTURE = r"""
import json, os, select, socket, struct, sys
ETH_P_ALL, SOL_PACKET, PACKET_VNET_HDR, PACKET_STATISTICS = 3, 263, 15, 6
iface, pcap_path, meta_path = sys.argv[1:4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)  # gso_type/gso_size of each captured skb
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
s.bind((iface, ETH_P_ALL))
s.setblocking(False)
meta = []
with open(pcap_path, "wb") as pcap:
    pcap.write(struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
    print("ready", flush=True)
    done = False
    while not done:
        ready, _, _ = select.select([s, sys.stdin], [], [], 1.0)
        done = sys.stdin in ready
        while True:
            try:
                data, addr = s.recvfrom(262144)
            except BlockingIOError:
                break
            frame = data[10:]
            if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
                continue
            ihl = (frame[14] & 0x0F) * 4
            ports = struct.unpack_from("!HH", frame, 14 + ihl)
            if 8285 not in ports:
                continue
            flags, gso_type, _, gso_size, _, _ = struct.unpack_from("=BBHHHH", data)
            pcap.write(struct.pack("=IIII", 0, 0, len(frame), len(frame)) + frame)
            meta.append([gso_type, gso_size, addr[2]])
stats = struct.unpack("=II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
json.dump({"frames": meta, "seen": stats[0], "dropped": stats[1]}, open(meta_path, "w"))
"""


class MixedOffloads(Testbed):
    """A testbed whose last node runs ``--no-offload`` (the plain per-packet path) and
    whose second node reads its TUN packet by packet (``--no-tun-tso``)."""

    __test__ = False

    def daemon_argv(self, i: int) -> list[str]:
        argv = super().daemon_argv(i)
        if i == self.nodes:
            return [*argv, "--no-offload"]
        return [*argv, "--no-tun-tso"] if i == 2 else argv


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    tb = MixedOffloads("fp" + uuid.uuid4().hex[:6], nodes=3, pods_per_node=1, registry="file")
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def _pod(bed: Testbed, name: str) -> dict[str, str]:
    return next(p for p in bed.status()["pods"] if p["name"] == name)


@pytest.mark.netns
def test_fast_path_transfer_is_intact_and_wire_is_one_packet_per_datagram(
    bed: Testbed, tmp_path: Path
) -> None:
    pcap, meta_file = tmp_path / "n1.pcap", tmp_path / "n1.json"
    capture = bed.popen(
        "n1",
        [sys.executable, "-c", CAPTURE, "eth0", str(pcap), str(meta_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
        transfer(bed, "n1-p1", "n2-p1", 20 * 1024 * 1024, 5301)
        # n2 reads its TUN packet by packet (--no-tun-tso); n1 cut super-packets.
        transfer(bed, "n2-p1", "n1-p1", 10 * 1024 * 1024, 5304)
    finally:
        assert capture.stdin is not None
        capture.stdin.close()
        capture.wait(timeout=20)
    meta = json.loads(meta_file.read_text())
    assert meta["dropped"] == 0

    from scapy.layers.inet import IP, TCP, UDP
    from scapy.utils import rdpcap

    mtu = int(
        next(
            line.split("=")[1]
            for line in (bed.subnet_file(1).read_text().splitlines())
            if line.startswith("FLANNEL_MTU=")
        )
    )
    frames = rdpcap(str(pcap))
    assert len(frames) == len(meta["frames"]) > 0
    datagrams = gso_frames = 0
    for frame, (gso_type, gso_size, _direction) in zip(frames, meta["frames"], strict=True):
        outer = frame[IP]
        assert outer[UDP].sport == 8285 or outer[UDP].dport == 8285
        raw = bytes(outer)
        payload = raw[outer.ihl * 4 + 8 :]
        if gso_type:
            # A UDP GSO super-packet on the veth (no wire to segment it here): the kernel
            # or a NIC cuts it into gso_size datagrams; check each one.
            assert gso_type == 5  # VIRTIO_NET_HDR_GSO_UDP_L4
            gso_frames += 1
            pieces = [payload[i : i + gso_size] for i in range(0, len(payload), gso_size)]
        else:
            pieces = [payload]
        for piece in pieces:
            datagrams += 1
            inner = IP(piece)
            assert inner.version == 4
            assert inner.len == len(piece) <= mtu, (inner.len, len(piece))
            assert internet_checksum(piece[: inner.ihl * 4]) == 0
            if inner.proto == 6:
                tcp = piece[inner.ihl * 4 :]
                pseudo = piece[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
                assert internet_checksum(pseudo + tcp + b"\0" * (len(tcp) % 2)) == 0
                assert inner.haslayer(TCP)
    # 30 MiB at an MSS of at most mtu - 40 bytes: the fast path really batched them.
    assert datagrams > 30 * 1024 * 1024 // (mtu - 40)
    assert gso_frames > 0
    n1, n2 = node_status(bed, "n1")["counters"], node_status(bed, "n2")["counters"]
    assert not n1["drops"] and not n2["drops"], (n1["drops"], n2["drops"])
    # n1 sent GSO batches, n2 received them coalesced and wrote TCP super-packets.
    assert n1["tx_gso_sends"] > 0 and n2["rx_gro_receives"] > 0
    assert n2["rx_tun_super_packets"] > 0
    # n1 read super-packets from its TUN, n2 did not; what both sent is checked above.
    assert n1["tx_tun_super_packets"] > 0 and n2["tx_tun_super_packets"] == 0
    assert node_status(bed, "n1")["features"]["tun_tso"]
    assert not node_status(bed, "n2")["features"]["tun_tso"]


@pytest.mark.netns
def test_no_offload_node_talks_to_offload_nodes(bed: Testbed) -> None:
    # n3 runs the plain per-packet path; n1 sends GSO batches to it and gets single
    # datagrams back (as from a real flannel peer), both ways byte-exact.
    transfer(bed, "n1-p1", "n3-p1", 5 * 1024 * 1024, 5302)
    transfer(bed, "n3-p1", "n1-p1", 5 * 1024 * 1024, 5303)
    result = bed.exec(
        "n3-p1",
        ["ping", "-c", "3", "-i", "0.2", "-W", "2", _pod(bed, "n2-p1")["ip"]],
        capture_output=True,
        text=True,
    )
    assert " 0% packet loss" in result.stdout, result.stdout
    assert not node_status(bed, "n3")["counters"]["drops"]


@UNDERLAY
def test_registered_callbacks_see_changes_and_count_completely(codecs: str, wires: Any) -> None:
    """What the loop calls: a peer table change is used at the next wake-up, gso turned
    off is honoured, a trace takes the Python path, and the counts (kept in C between
    wake-ups) are complete in every snapshot() and after stop()."""
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, codecs)
    loop = Readers()
    dp.start(loop)  # type: ignore[arg-type]
    transmit, receive = loop.callbacks[tun.fd], loop.callbacks[link.sock.fileno()]
    src, to_a = bytes([198, 18, 1, 5]), bytes([198, 18, 2, 9])
    packets = [
        build_header(src=src, dst=to_a, protocol=17, payload_length=100, ident=i) + bytes(100)
        for i in range(3)
    ]
    tun.inject(packets[0])
    transmit()
    assert link.datagrams() == [(packets[0], (wire.PEER_A, 8285))]
    a = dp.peers.get(PEER_A.subnet)
    assert a is not None
    assert dp.counters.snapshot()["tx_packets"] == 1
    assert (a.stats.tx_packets, a.stats.tx_bytes) == (1, 120) and a.stats.last_tx > 0
    # The lease of A's subnet moves to B's public IP: the next wake-up sends there.
    moved = Lease(PEER_A.subnet, IPv4Address(wire.PEER_B), create_revision=9)
    assert dp.peers.upsert(moved)
    tun.inject(packets[1])
    transmit()
    assert link.datagrams()[1:] == [(packets[1], (wire.PEER_B, 8285))]  # (sent() is cumulative)
    # gso off at run time: two packets to one peer leave as two sendto()s
    dp.gso = False
    tun.inject(packets[1])
    tun.inject(packets[2])
    transmit()
    assert [(size, to) for _, size, to in link.sent()[2:]] == [(0, (wire.PEER_B, 8285))] * 2
    # RX from A's old address: no longer a peer; from B (now A's subnet's node): written
    dst = bytes([198, 18, 1, 5])
    inner = Segment(1, 1, 1, 0x10, b"r" * 100, src=bytes([198, 18, 2, 7]), dst=dst).build()
    link.queue(inner, 0, wire.PEER_A)
    link.queue(inner, 0, wire.PEER_B)
    receive()
    assert [_without_ident(p) for p in tun.written()] == [_without_ident(inner)]
    # a trace attached: the wake-up goes to the Python methods, which report to it
    tap = RecordingTap()
    dp.tap = tap  # type: ignore[assignment]
    tun.inject(packets[0])
    transmit()
    assert [e[:2] for e in tap.events] == [("inner", "tx"), ("outer", "tx")]
    dp.tap = None
    tun.inject(packets[0])
    transmit()
    dp.stop(loop)  # type: ignore[arg-type]
    assert not loop.callbacks
    counters = dp.counters
    assert (counters.tx_packets, counters.tx_bytes) == (6, 6 * 120)
    assert (counters.rx_packets, counters.drops["rx_unknown_peer"]) == (1, 1)
    assert {n: k for n, k in enumerate(counters.tx_batch) if k} == {1: 6}
    moved_peer = dp.peers.get(PEER_A.subnet)
    b = dp.peers.get(PEER_B.subnet)
    assert moved_peer is not None and b is not None
    # B's public IP maps to its oldest lease: B's own (create_revision 0), so its stats
    assert (b.stats.tx_packets, b.stats.rx_packets) == (5, 1)
    assert moved_peer.stats is a.stats and a.stats.tx_packets == 1
    assert counters.snapshot() == dp.counters.snapshot()  # nothing left pending


@UNDERLAY
def test_native_drains_refuse_a_wake_up_inside_a_wake_up(wires: Any) -> None:
    """A callback's Python (here _no_route) that calls the drains again gets an error,
    not a second wake-up on the same state, also with a trace attached meanwhile (the
    Python path would read into the arena the wake-up still holds); a flush is fine."""
    if not native.AVAILABLE:
        pytest.fail(f"encap._native did not load: {native.LOAD_ERROR}")
    tun, link = FakeTun(True), wires()
    dp = dataplane(tun, link, "native")
    loop = Readers()
    dp.start(loop)  # type: ignore[arg-type]
    transmit = loop.callbacks[tun.fd]
    seen: list[object] = []

    def no_route(packet: bytes) -> None:
        dp.counters.snapshot()
        for tap in (None, object()):  # also a wake-up a trace would take (same arena)
            dp.tap = tap  # type: ignore[assignment]
            try:
                transmit()
            except RuntimeError as e:
                seen.append(str(e))
        dp.tap = None

    dp._no_route = no_route  # type: ignore[method-assign]
    src = bytes([198, 18, 1, 5])
    tun.inject(
        build_header(src=src, dst=bytes([198, 18, 77, 1]), protocol=17, payload_length=8) + bytes(8)
    )
    transmit()
    assert len(seen) == 2 and all("inside a wake-up" in e for e in seen), seen
    dp.stop(loop)  # type: ignore[arg-type]
