"""overlay.kernel.rtnl packs and parses both families: an IPv6 route, neighbour and fdb
remote go out as AF_INET6 messages of the right sizes (what flannel-v6.<VNI> needs), and
a dumped IPv6 route reads back with its family, so a check never mistakes it for an IPv4
one with the same integer."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from overlay.kernel import rtnl

V6 = IPv6Address("fd00:10:0:2::").packed
GW6 = IPv6Address("2001:db8::2").packed


def _attrs(body: bytes, start: int) -> dict[int, bytes]:
    return rtnl.attrs(body, start, len(body), frozenset(range(32)))


def test_an_ipv6_route_is_an_af_inet6_message_with_16_byte_addresses() -> None:
    request = rtnl.route_request(True, V6, 64, gateway=GW6, oif=7, onlink=True)
    family, dst_len, _, _, table, proto, scope, kind, flags = rtnl.RTMSG.unpack_from(request.body)
    assert (family, dst_len, table, proto) == (socket.AF_INET6, 64, 254, rtnl.RTPROT_STATIC)
    assert (scope, kind, flags) == (rtnl.RT_SCOPE_UNIVERSE, rtnl.RTN_UNICAST, rtnl.RTNH_F_ONLINK)
    got = _attrs(request.body, rtnl.RTMSG.size)
    assert (got[rtnl.RTA_DST], got[rtnl.RTA_GATEWAY]) == (V6, GW6)


def test_an_ipv6_device_route_has_no_link_scope_an_ipv4_one_does() -> None:
    v6 = rtnl.route_request(True, V6, 64, oif=3)
    v4 = rtnl.route_request(True, IPv4Address("10.5.0.0").packed, 16, oif=3)
    assert rtnl.RTMSG.unpack_from(v6.body)[6] == rtnl.RT_SCOPE_UNIVERSE
    assert rtnl.RTMSG.unpack_from(v4.body)[6] == rtnl.RT_SCOPE_LINK


def test_ipv6_neighbours_and_fdb_remotes() -> None:
    mac = bytes.fromhex("0a0000000002")
    neighbour = rtnl.neighbour_request(True, 5, V6, mac)
    assert rtnl.NDMSG.unpack_from(neighbour.body)[0] == socket.AF_INET6
    assert _attrs(neighbour.body, rtnl.NDMSG.size)[rtnl.NDA_DST] == V6
    fdb = rtnl.fdb_request(True, 5, mac, GW6)
    assert rtnl.NDMSG.unpack_from(fdb.body)[0] == rtnl.AF_BRIDGE
    assert _attrs(fdb.body, rtnl.NDMSG.size)[rtnl.NDA_DST] == GW6


def test_an_address_of_another_size_is_refused_before_it_is_sent() -> None:
    with pytest.raises(ValueError, match="5 bytes"):
        rtnl.route_request(True, b"\0" * 5, 8)
    with pytest.raises(ValueError, match="6 bytes"):
        rtnl.fdb_request(True, 5, b"\0" * 6, b"\0" * 6)


def test_a_dumped_ipv6_route_keeps_its_family_and_protocol() -> None:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET6, 64, 0, 0, 254, 2, 0, 1, 0)
    body += rtnl.attr(rtnl.RTA_TABLE, rtnl.U32.pack(254)) + rtnl.attr(rtnl.RTA_DST, V6)
    body += rtnl.attr(rtnl.RTA_OIF, rtnl.U32.pack(9))
    route = rtnl._route(body, 0, len(body))
    assert route is not None
    assert (route.family, route.dst, route.dst_len) == (
        socket.AF_INET6,
        int(IPv6Address("fd00:10:0:2::")),
        64,
    )
    assert (route.gateway, route.oif, route.protocol) == (None, 9, rtnl.RTPROT_KERNEL)


def _decoded_by_pyroute2(body: bytes) -> object:
    """``body`` behind a netlink header, decoded by pyroute2's own rtmsg (the oracle)."""
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    header = struct.pack("=IHHII", 16 + len(body), 24, 0, 1, 0)
    msg = rtmsg(header + body)
    msg.decode()
    return msg


@pytest.mark.parametrize("mtu", [1280, 1430, 65515])
def test_a_route_mtu_is_the_rtax_mtu_metric_pyroute2_reads(mtu: int) -> None:
    """The TUN's IPv6 network route carries its MTU as `ip route ... mtu N` does."""
    request = rtnl.route_request(True, V6, 56, oif=3, mtu=mtu)
    msg: Any = _decoded_by_pyroute2(request.body)
    assert msg.get_attr("RTA_DST") == "fd00:10:0:2::"
    assert msg.get_attr("RTA_OIF") == 3
    assert msg.get_attr("RTA_METRICS").get_attr("RTAX_MTU") == mtu


def test_no_mtu_no_metrics_and_a_deletion_carries_none() -> None:
    for request in (
        rtnl.route_request(True, V6, 56, oif=3),
        rtnl.route_request(False, V6, 56, oif=3, mtu=1430),
    ):
        msg: Any = _decoded_by_pyroute2(request.body)
        assert msg.get_attr("RTA_METRICS") is None
