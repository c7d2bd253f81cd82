"""`overlay trace` of IPv6 (issue 20) without a daemon: the filter's IPv6 words against a
re-statement of their rules (hypothesis), the inner fields of IPv6 packets (scapy-built,
extension headers, fragments), outer captures of the IPv6 underlay decoded by scapy with
a valid UDP checksum, and random or mutated IPv6 input into every decoder of the tracer
and its readers: never an exception."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from control.lease import Lease
from control.peer_table import PeerTable
from encap import pcapng, vxlan
from overlay.cli import trace as trace_cli
from overlay.observe import drop_log, trace, trace_filter
from overlay.observe.trace_filter import V6, FilterError, Record

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

V6_ADDRESSES = ["fd00:10:0:1::5", "fd00:10:0:2::9", "fd00:10:1::1", "::a00:1"]
V4_ADDRESSES = ["10.0.0.1", "198.18.2.3"]
PEER6 = "2001:db8::2"


def _key(text: str) -> int:
    return trace_filter.address_key(text)


def _make(point, direction, src, dst, proto, sport, dport, peer) -> Record:  # type: ignore[no-untyped-def]
    version = ip_address(src).version
    dst = dst if ip_address(dst).version == version else src
    net = None
    if peer == PEER6:
        net = IPv6Network("fd00:10:0:2::/64")
    elif peer == "192.0.2.2":
        net = IPv4Network("198.18.2.0/24")
    return Record(
        point,
        direction,
        None,
        _key(src),
        _key(dst),
        proto,
        sport,
        dport,
        _key(peer) if peer else None,
        net,
        version,
    )


records = st.builds(
    _make,
    st.sampled_from(["inner", "outer"]),
    st.sampled_from(["tx", "rx"]),
    st.sampled_from(V6_ADDRESSES + V4_ADDRESSES),
    st.sampled_from(V6_ADDRESSES + V4_ADDRESSES),
    st.sampled_from([1, 6, 17, 58]),
    st.sampled_from([None, 53, 80]),
    st.sampled_from([None, 53, 8080]),
    st.sampled_from([None, PEER6, "2001:db8::3", "192.0.2.2"]),
)


def _in6(address: int | None, network: str) -> bool:
    net = IPv6Network(network)
    return (
        address is not None
        and address & V6 != 0
        and IPv6Address(address ^ V6) in net  # only IPv6 addresses lie in an IPv6 network
    )


# (expression, the same rule written directly)
RULES = [
    ("host fd00:10:0:1::5", lambda r: _key("fd00:10:0:1::5") in (r.src, r.dst)),
    ("src fd00:10:0:1::5", lambda r: r.src == _key("fd00:10:0:1::5")),
    ("dst host fd00:10:0:2::9", lambda r: r.dst == _key("fd00:10:0:2::9")),
    ("net fd00:10::/56", lambda r: _in6(r.src, "fd00:10::/56") or _in6(r.dst, "fd00:10::/56")),
    ("src net fd00:10:0:2::/64", lambda r: _in6(r.src, "fd00:10:0:2::/64")),
    ("dst net fd00:10:1::/48", lambda r: _in6(r.dst, "fd00:10:1::/48")),
    # the families never meet: ::a00:1 is not 10.0.0.1, and 10/8 holds no IPv6 address
    ("host 10.0.0.1", lambda r: int(IPv4Address("10.0.0.1")) in (r.src, r.dst)),
    ("host ::a00:1", lambda r: V6 | 0x0A000001 in (r.src, r.dst)),
    ("net 10.0.0.0/8", lambda r: any(a is not None and a >> 24 == 10 for a in (r.src, r.dst))),
    ("ip6", lambda r: r.version == 6),
    ("ip", lambda r: r.version == 4),
    ("icmp6", lambda r: r.proto == 58),
    ("ip6 and icmp6 and not ip", lambda r: r.version == 6 and r.proto == 58),
    ("ip6 and port 53", lambda r: r.version == 6 and 53 in (r.sport, r.dport)),
    ("peer 2001:db8::2", lambda r: r.peer_ip == _key(PEER6)),
    ("peer fd00:10:0:2::7", lambda r: r.peer_net == IPv6Network("fd00:10:0:2::/64")),
    ("peer fd00:10::/56", lambda r: r.peer_net == IPv6Network("fd00:10:0:2::/64")),
    ("peer 2001:db8::/64", lambda r: r.peer_ip is not None and r.peer_ip & V6 != 0),
    ("peer 198.18.2.7", lambda r: r.peer_net == IPv4Network("198.18.2.0/24")),
]


@given(records)
@FAST
def test_ipv6_filters_select_what_their_rule_says(record: Record) -> None:
    for text, rule in RULES:
        assert trace_filter.parse(text)(record) == bool(rule(record)), text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("host fd00::1::2", "'fd00::1::2' is not an IPv4 or IPv6 address"),
        ("net fd00::/129", "'fd00::/129' is not an IPv4 or IPv6 network"),
        ("peer fd00:zz::/64", "is not an IPv4 or IPv6 network"),
    ],
)
def test_bad_ipv6_words_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(FilterError) as e:
        trace_filter.parse(text)
    assert words in str(e.value) and "\n" not in str(e.value)


SRC6, DST6 = "fd00:10:0:1::5", "fd00:10:0:2::9"


def _fields(packet: bytes) -> Record:
    record = Record("inner", "tx", None)
    trace_filter.inner_fields(record, packet)
    return record


def test_inner_fields_read_ipv6_addresses_protocol_and_ports() -> None:
    tcp = _fields(bytes(IPv6(src=SRC6, dst=DST6) / TCP(sport=1234, dport=80)))
    assert (tcp.version, tcp.src, tcp.dst, tcp.proto) == (6, _key(SRC6), _key(DST6), 6)
    assert (tcp.sport, tcp.dport) == (1234, 80)
    # past a hop-by-hop and a destination options header: still UDP and its ports
    chained = IPv6(src=SRC6, dst=DST6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    udp = _fields(bytes(chained / UDP(sport=5353, dport=53)))
    assert (udp.proto, udp.sport, udp.dport) == (17, 5353, 53)
    echo = _fields(bytes(IPv6(src=SRC6, dst=DST6) / ICMPv6EchoRequest()))
    assert (echo.proto, echo.sport) == (58, None)
    later = _fields(
        bytes(IPv6(src=SRC6, dst=DST6) / IPv6ExtHdrFragment(offset=3, nh=17) / (b"x" * 8))
    )
    assert (later.proto, later.sport) == (17, None)  # no ports in a fragment
    cut = _fields(bytes(chained / UDP())[:44])  # the chain runs past the capture
    assert (cut.version, cut.src, cut.proto) == (6, _key(SRC6), None)
    assert _fields(bytes(IPv6(src=SRC6, dst=DST6))[:39]).src is None  # no whole header


# -- the tracer on the IPv6 half ---------------------------------------------------------

LEASE = Lease(
    IPv4Network("198.18.2.0/24"),
    IPv4Address("192.0.2.2"),
    ipv6_subnet=IPv6Network("fd00:10:0:2::/64"),
    public_ipv6=IPv6Address(PEER6),
)
LOCAL6 = "2001:db8::1"
MAC, PEER_MAC = bytes.fromhex("0a0000000001"), bytes.fromhex("0a0000000002")
PING6 = bytes(IPv6(src=SRC6, dst=DST6) / ICMPv6EchoRequest(id=7, seq=1) / b"payload")


def _tracer(text: str = "", headroom: int = 22) -> tuple[trace.Tracer, list[trace.Capture]]:
    peers = PeerTable(8472)
    peers.upsert(LEASE)
    got: list[trace.Capture] = []
    endpoint = trace.Endpoint("192.0.2.1", 8472, headroom, LOCAL6)
    return trace.Tracer(trace.TraceRequest(text, 0, 65535), got.append, endpoint, peers), got


def _datagram(packet: bytes) -> bytes:
    return vxlan.prefix(1, PEER_MAC, MAC, vxlan.ETHERTYPE_IPV6) + packet


def test_outer_ipv6_captures_decode_as_vxlan_over_ipv6_with_a_valid_checksum() -> None:
    tracer, got = _tracer()
    tracer.outer("tx", _datagram(PING6), (PEER6, 8472))
    tracer.outer("rx", _datagram(PING6), (PEER6, 8472))
    sent, received = (IPv6(c.data) for c in got)
    assert (sent.src, sent.dst, received.src, received.dst) == (LOCAL6, PEER6, PEER6, LOCAL6)
    assert sent[UDP].dport == 8472 and sent.plen == len(got[0].data) - 40
    check = IPv6(bytes(sent))
    check[UDP].chksum = None  # scapy computes it again: the same as the one we wrote
    assert IPv6(bytes(check))[UDP].chksum == sent[UDP].chksum != 0
    inner = VXLAN(bytes(sent[UDP].payload))
    assert inner.vni == 1 and inner[Ether].type == 0x86DD
    assert inner[IPv6].src == SRC6 and inner[ICMPv6EchoRequest].id == 7


def test_ipv6_filters_see_inner_and_outer_ipv6_and_the_peer() -> None:
    for text, expected in [
        ("host fd00:10:0:2::9", 3),
        ("net fd00:10::/56 and icmp6", 3),
        ("peer 2001:db8::2", 3),
        ("peer fd00:10:0:2::/64", 3),
        ("host 198.18.2.9 or icmp", 0),
        ("outer", 2),  # the datagram and its drop
        ("drop and reason rx_ipv6_*", 1),
    ]:
        tracer, got = _tracer(text)
        tracer.inner("tx", PING6)  # the peer: the owner of its destination
        tracer.outer("rx", _datagram(PING6), (PEER6, 8472))  # the sender
        tracer.drop("rx_ipv6_bad_length", _datagram(PING6), (PEER6, 8472))
        assert len(got) == expected, text


def test_a_dropped_ipv6_datagram_carries_its_reason_and_reads_back() -> None:
    tracer, got = _tracer()
    tracer.drop("rx_ipv6_jumbo", _datagram(PING6), (PEER6, 8472))
    tracer.drop("tx_no_route", PING6, None)
    outer, inner = got
    assert (outer.interface, outer.comment) == (trace.OUTER, "dropped: rx_ipv6_jumbo")
    assert (inner.interface, inner.comment) == (trace.INNER, "dropped: tx_no_route")
    summary = drop_log.summary(outer)
    assert summary["peer"] == f"[{PEER6}]:8472"
    assert summary["packet"] == f"IP6 {SRC6} > {DST6}: ICMP6 echo request"
    assert summary["length"] == len(_datagram(PING6))


def test_summary_lines_show_ipv6_as_tcpdump_would() -> None:
    lines: list[str] = []

    class Out:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    tracer, got = _tracer()
    tracer.inner("tx", PING6)
    tracer.outer("tx", _datagram(PING6), (PEER6, 8472))
    summary = trace_cli._Summary(Out())  # type: ignore[arg-type]
    stream = pcapng.section_header() + pcapng.interface_description(name="flannel0")
    stream += pcapng.interface_description(name="eth0:udp/8472")
    for capture in got:
        stream += pcapng.enhanced_packet(capture.interface, 0, capture.data)
    for kind, block in pcapng.BlockReader().feed(stream):
        summary.block(kind, block)
    assert f"flannel0     IP6 {SRC6} > {DST6}: ICMP6 echo request" in lines[0]
    assert f"{LOCAL6}.8472 > {PEER6}.8472: VXLAN, IP6 {SRC6} > {DST6}: ICMP6 echo" in lines[1]


# -- hostile input: never an exception ------------------------------------------------------


def _mutated(packet: bytes, data: st.DataObject) -> bytes:
    """A real packet cut somewhere and with a few bytes changed."""
    out = bytearray(packet[: data.draw(st.integers(0, len(packet)))])
    for _ in range(data.draw(st.integers(0, 4))):
        if out:
            out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
    return bytes(out)


SAMPLES = [
    PING6,
    bytes(IPv6(src=SRC6, dst=DST6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP()),
    bytes(IPv6(src=SRC6, dst=DST6) / IPv6ExtHdrFragment(offset=0, nh=6) / TCP()),
]


@given(st.data())
@FAST
def test_random_and_mutated_ipv6_never_crash_the_tracer_or_its_readers(
    data: st.DataObject,
) -> None:
    if data.draw(st.booleans()):
        packet = _mutated(data.draw(st.sampled_from(SAMPLES)), data)
    else:
        packet = b"\x60" + data.draw(st.binary(max_size=120))
    datagram = _datagram(packet)[: data.draw(st.integers(0, 22 + len(packet)))]
    text = data.draw(st.sampled_from(["", "ip6 and port 53", "net fd00::/8", "peer fd00::/8"]))
    tracer, got = _tracer(text, headroom=data.draw(st.sampled_from([0, 22])))
    tracer.inner(data.draw(st.sampled_from(["tx", "rx"])), packet)
    tracer.outer("rx", datagram, (PEER6, 8472))
    tracer.outer("tx", datagram, ("2001:db8::99", 8472))  # no such peer
    tracer.drop("rx_ipv6_bad_ext_header", datagram, (PEER6, 8472))
    tracer.drop("tx_no_route", packet, None)
    for capture in got:
        trace.describe(capture.data)
        drop_log.summary(capture)
        trace_cli._Summary(None).line(  # type: ignore[arg-type]
            pcapng.enhanced_packet(capture.interface, 0, capture.data)
        )
