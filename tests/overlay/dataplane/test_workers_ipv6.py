"""The pieces of `--workers` with IPv6 that need no testbed: a worker's copy of the peer
table gets the IPv6 half of each lease, its spec carries our IPv6 subnet and VTEP MAC,
its IPv6 socket is handed over (and closed with the IPv4 one when it cannot be made),
the IPv6 half's counts add up over the processes, and its trace knows both addresses."""

from __future__ import annotations

import json
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.lease import Lease
from encap import vxlan
from overlay.backends.vxlan import ipv6_route_mtu
from overlay.dataplane.counters import sum_ipv6_status
from overlay.dataplane.ipv6 import IPV6_EXTRA_OVERHEAD
from overlay.dataplane.spec import DataplaneSpec
from overlay.dataplane.worker_protocol import WorkerSpec, apply_message, lease_message
from overlay.dataplane.workers import _Sockets, worker_fd_args
from overlay.observe.log import LogOptions
from overlay.observe.trace import Endpoint

MAC = bytes.fromhex("020000000001")
MAC6 = bytes.fromhex("020000000011")


def _spec() -> DataplaneSpec:
    return DataplaneSpec(
        framing="vxlan",
        subnet=IPv4Network("198.18.1.0/24"),
        port=8472,
        mtu=1450,
        offload=True,
        tun_tso=True,
        vni=1,
        mac=MAC,
        subnet6=IPv6Network("fd00:10:0:1::/64"),
        mac6=MAC6,
    )


def _dual_lease(n: int) -> Lease:
    return Lease(
        IPv4Network(f"198.18.{n}.0/24"),
        IPv4Address(f"192.0.2.{n}"),
        "vxlan",
        {"VNI": 1, "VtepMAC": f"02:00:00:00:00:{n:02x}"},
        ipv6_subnet=IPv6Network(f"fd00:10:0:{n:x}::/64"),
        public_ipv6=IPv6Address(f"2001:db8::{n:x}"),
        backend_v6_data={"VNI": 1, "VtepMAC": f"02:00:00:00:01:{n:02x}"},
    )


def test_the_spec_carries_the_ipv6_half_to_a_worker() -> None:
    sent = WorkerSpec(_spec(), "192.0.2.1", "flannel0", True, 3, {}, LogOptions())
    received = WorkerSpec.from_json(json.loads(json.dumps(sent.to_json(1))))
    assert received.dataplane == _spec()
    assert received.dataplane.subnet6 == IPv6Network("fd00:10:0:1::/64")


def test_a_workers_table_reaches_each_peer_over_ipv6_as_the_main_one_does() -> None:
    """The lease messages carry PublicIPv6 and BackendV6Data: the worker's table looks up
    the same peer, with the same IPv6 prefix (to its flannel-v6 VTEP MAC, type 0x86DD)."""
    main, worker = _spec().peer_table(), _spec().peer_table()
    leases = [_dual_lease(n) for n in (2, 3, 4)]
    for added, removed in ((leases, []), ([], leases[1:2])):
        main.apply(added, [lease.ident for lease in removed])
        apply_message(worker, json.loads(lease_message(added, removed)))
    for n in (2, 3, 4):
        address = IPv6Address(f"fd00:10:0:{n:x}::7").packed
        ours, theirs = main.lookup6(address), worker.lookup6(address)
        if n == 3:
            assert ours is None and theirs is None
            continue
        assert ours is not None and theirs is not None
        assert theirs.addr == ours.addr == (f"2001:db8::{n:x}", 8472)
        assert theirs.prefix == ours.prefix
        assert theirs.prefix[8:14] == bytes.fromhex(f"0200000001{n:02x}")
        assert theirs.prefix[20:22] == vxlan.ETHERTYPE_IPV6.to_bytes(2, "big")


def test_the_worker_gets_the_ipv6_socket_fd_only_with_the_ipv6_half() -> None:
    assert worker_fd_args((5, 6, 7)) == ["--control-fd", "5", "--tun-fd", "6", "--socket-fd", "7"]
    assert worker_fd_args((5, 6, 7, 8))[-2:] == ["--socket6-fd", "8"]


def test_the_ipv4_socket_is_closed_when_the_ipv6_one_cannot_be_opened() -> None:
    made: list[socket.socket] = []

    def open4() -> socket.socket:
        made.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        return made[-1]

    def open6() -> socket.socket:
        raise OSError(98, "cannot bind UDP [2001:db8::1]:8472: Address already in use")

    with pytest.raises(OSError, match="Address already in use"):
        _Sockets(open4, open6).open()
    assert made[0].fileno() == -1
    (only,) = _Sockets(open4, None).open()
    only.close()


@given(
    st.lists(
        st.dictionaries(st.sampled_from(["ndp_replies", "ipv6_tx_gso_sends"]), st.integers(0, 9)),
        max_size=4,
    )
)
def test_the_ipv6_halfs_counts_add_up_key_by_key(reports: list[dict[str, int]]) -> None:
    total = sum_ipv6_status(reports)
    for key in {k for r in reports for k in r}:
        assert total[key] == sum(r.get(key, 0) for r in reports)
    assert set(total) == {k for r in reports for k in r}


def test_a_workers_trace_has_both_underlay_addresses() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock6.bind(("::1", 0))
        endpoint = Endpoint.of([sock, sock6], 22)
        assert endpoint == Endpoint("127.0.0.1", sock.getsockname()[1], 22, "::1")
        assert Endpoint.of([sock], 0).address6 is None
    finally:
        sock.close()
        sock6.close()


@pytest.mark.parametrize(("tun", "route"), [(1450, 1430), (8950, 8930), (1400, 1380)])
def test_the_ipv6_route_mtu_is_what_the_ipv6_half_forwards(tun: int, route: int) -> None:
    assert ipv6_route_mtu(tun) == route == tun - IPV6_EXTRA_OVERHEAD
