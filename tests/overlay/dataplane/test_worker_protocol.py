"""The pieces of `--workers` that need no testbed: the peer-table messages a worker
applies, the sum of the workers' counters, and the TUN steering program's flow hash."""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections import Counter
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest

from control.lease import Lease
from control.peer_table import PeerTable
from encap.ipv4 import build_header
from overlay.dataplane.counters import Counters, add_snapshots
from overlay.dataplane.spec import DataplaneSpec
from overlay.dataplane.vxlan import vxlan_prefix_for
from overlay.dataplane.worker_protocol import WorkerSpec, apply_message, lease_message
from overlay.observe.log import LogOptions
from tun import steering

BPF_PROG_TEST_RUN = 10


def test_worker_table_follows_the_main_table() -> None:
    mac = bytes.fromhex("020000000001")
    prefix_for = vxlan_prefix_for(1, mac)
    main, worker = PeerTable(8472, prefix_for), PeerTable(8472, prefix_for)
    a = Lease(
        IPv4Network("198.18.3.0/24"),
        IPv4Address("192.0.2.3"),
        "vxlan",
        {"VNI": 1, "VtepMAC": "02:00:00:00:00:03"},
    )
    b = Lease(IPv4Network("198.18.4.0/24"), IPv4Address("192.0.2.4"), "vxlan", {"VNI": 1})
    moved = Lease(a.subnet, IPv4Address("192.0.2.9"), "vxlan", a.backend_data)
    for added, removed in (([a, b], []), ([moved], []), ([], [b])):
        for lease in removed:
            main.remove(lease.subnet)
        for lease in added:
            main.upsert(lease)
        apply_message(worker, json.loads(lease_message(added, removed)))
        assert worker.peers() == main.peers()
    (peer,) = worker.peers()
    assert peer.addr == ("192.0.2.9", 8472) and peer.prefix == prefix_for(moved) != b""


def test_counters_of_the_workers_add_up() -> None:
    one, two = Counters(tx_packets=3, rx_bytes=10), Counters(tx_packets=4, tx_gso_sends=1)
    one.drops["rx_unknown_peer"] += 2
    two.drops["rx_unknown_peer"] += 1
    two.drops["tx_no_route"] += 5
    total = add_snapshots([one.snapshot(), two.snapshot()])
    assert total["tx_packets"] == 7 and total["rx_bytes"] == 10 and total["tx_gso_sends"] == 1
    assert total["drops"] == {"rx_unknown_peer": 3, "tx_no_route": 5}
    assert set(total) == set(Counters().snapshot())


def _steering_result(packet: bytes) -> int:
    """What the TUN steering program returns for ``packet`` (an IPv4 or IPv6 packet whose
    skb has no hash yet), run by the kernel itself with BPF_PROG_TEST_RUN."""
    libc = ctypes.CDLL(None, use_errno=True)
    prog = steering.load_hash_program()
    try:
        # The test run takes an Ethernet frame and hands the program the skb from the
        # network header on, as a TUN's transmit path does.
        ethertype = b"\x86\xdd" if packet[0] >> 4 == 6 else b"\x08\x00"
        frame = ctypes.create_string_buffer(bytes(12) + ethertype + packet)
        out = ctypes.create_string_buffer(len(frame) + 64)
        attr = struct.pack(
            "<IIIIQQII",
            prog,
            0,
            len(frame) - 1,  # create_string_buffer adds a NUL
            len(out),
            ctypes.addressof(frame),
            ctypes.addressof(out),
            1,
            0,
        ).ljust(80, b"\0")
        buffer = ctypes.create_string_buffer(attr, len(attr))
        if libc.syscall(steering.SYS_BPF, BPF_PROG_TEST_RUN, buffer, len(attr)) < 0:
            raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN")
        result: int = struct.unpack_from("<I", buffer.raw, 4)[0]
        return result
    finally:
        os.close(prog)


def _word(packet: bytes, at: int) -> int:
    return int.from_bytes(packet[at : at + 4], "big")


def _flow_hash(packet: bytes) -> int:
    """The program's fallback hash, written out in Python."""
    if packet[0] >> 4 == 6:  # every word of both addresses, the ports after the fixed header
        x = 0
        for at in range(8, 40, 4):
            x ^= _word(packet, at)
        if packet[6] in (6, 17):
            x ^= _word(packet, 40)
    else:
        x = _word(packet, 12) ^ _word(packet, 16)
        header = (packet[0] & 0x0F) * 4
        if packet[9] in (6, 17) and not int.from_bytes(packet[6:8], "big") & 0x1FFF:
            x ^= _word(packet, header)
    x ^= x >> 16
    x = (x * 0x9E3779B9) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _udp_packet(sport: int, dport: int = 5201, *, fragment: int = 0, proto: int = 17) -> bytes:
    ports = struct.pack("!HH", sport, dport) + bytes(4)
    return (
        build_header(
            src=bytes([198, 18, 1, 2]),
            dst=bytes([198, 18, 2, 2]),
            protocol=proto,
            payload_length=len(ports),
            flags_fragment=fragment,
        )
        + ports
    )


@pytest.mark.netns  # root: loading a BPF program needs CAP_BPF
def test_tun_steering_hashes_flows_without_a_socket_hash() -> None:
    packets = [_udp_packet(sport) for sport in range(40000, 40064)]
    packets += [_udp_packet(40000, proto=6), _udp_packet(40000, proto=1)]
    packets.append(_udp_packet(40001, fragment=100))  # a later fragment: no ports in it
    results = [_steering_result(p) for p in packets]
    assert results == [_flow_hash(p) for p in packets]
    # The flows of one pod pair spread over the queues (the kernel takes it modulo N).
    for queues in (2, 3, 4):
        used = Counter(r % queues for r in results[:64])
        assert len(used) == queues and min(used.values()) >= 64 // queues // 3, used
    # Ports left out where they are not ports: every packet of such a flow, one queue.
    assert _steering_result(_udp_packet(40001, fragment=100)) == _steering_result(
        _udp_packet(40002, fragment=100)
    )


@pytest.mark.parametrize("busy_poll_us", [0, 250])
def test_a_worker_gets_the_busy_poll_window_in_its_spec(busy_poll_us: int) -> None:
    """--busy-poll-us reaches each --workers process: the spec it is sent, as JSON."""
    spec = DataplaneSpec(
        framing="vxlan",
        subnet=IPv4Network("198.18.3.0/24"),
        port=8472,
        mtu=1450,
        offload=True,
        tun_tso=True,
        busy_poll_us=busy_poll_us,
        vni=1,
        mac=bytes.fromhex("020000000003"),
    )
    sent = WorkerSpec(spec, "192.0.2.3", "flannel0", True, 3, {}, LogOptions())
    received = WorkerSpec.from_json(json.loads(json.dumps(sent.to_json(1))))
    assert received.dataplane == spec
    assert received.dataplane.busy_poll_us == busy_poll_us


def _udp6_packet(sport: int, dport: int = 5201, *, next_header: int = 17, pod: int = 2) -> bytes:
    ports = struct.pack("!HH", sport, dport) + bytes(4)
    header = struct.pack("!IHBB", 6 << 28, len(ports), next_header, 64)
    src = IPv6Address(f"fd00:10:0:1::{pod:x}").packed
    return header + src + IPv6Address("fd00:10:0:2::2").packed + ports


@pytest.mark.netns  # root: loading a BPF program needs CAP_BPF
def test_tun_steering_hashes_ipv6_flows_by_their_addresses_and_ports() -> None:
    """An IPv6 packet without a socket hash (a pod's UDP) is hashed on IPv6's own fields:
    the flows of one pod pair spread over the queues by their ports, the pods' addresses
    (which differ in their last word) count, and a next header that is no TCP/UDP (an
    extension header, a fragment) leaves the ports out: every packet of the flow, one
    queue."""
    packets = [_udp6_packet(sport) for sport in range(40000, 40064)]
    packets += [_udp6_packet(40000, next_header=6), _udp6_packet(40000, next_header=44)]
    packets += [_udp6_packet(40000, pod=pod) for pod in range(3, 9)]
    results = [_steering_result(p) for p in packets]
    assert results == [_flow_hash(p) for p in packets]
    for queues in (2, 3, 4):
        used = Counter(r % queues for r in results[:64])
        assert len(used) == queues and min(used.values()) >= 64 // queues // 3, used
    assert len({r % 4 for r in results[-6:]}) > 1  # other pods, same ports: other queues
    assert _steering_result(_udp6_packet(40001, next_header=44)) == _steering_result(
        _udp6_packet(40002, next_header=44)
    )
