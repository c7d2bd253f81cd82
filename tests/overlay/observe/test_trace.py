"""`overlay trace` without a daemon: the filter language (against a re-statement of its
rules, with hypothesis), the tracer (captures decoded by scapy), the request checks and
the client's one-line summaries."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from control.lease import Lease
from control.peer_table import PeerTable
from encap import pcapng
from overlay.cli import trace as trace_cli
from overlay.observe import trace, trace_filter
from overlay.observe.trace_filter import FilterError, Record

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ADDRESSES = ["198.18.1.2", "198.18.2.3", "198.18.2.9", "10.0.0.1"]


def _record(**fields: object) -> Record:
    record = Record("inner", "tx", None)
    for name, value in fields.items():
        setattr(record, name, value)
    return record


records = st.builds(
    lambda point, direction, reason, src, dst, proto, sport, dport, peer: Record(
        point,
        direction,
        reason,
        int(IPv4Address(src)),
        int(IPv4Address(dst)),
        proto,
        sport,
        dport,
        int(IPv4Address(peer)) if peer else None,
        IPv4Network("198.18.2.0/24") if peer == "192.0.2.2" else None,
    ),
    st.sampled_from(["inner", "outer"]),
    st.sampled_from(["tx", "rx"]),
    st.sampled_from([None, "rx_foreign_source", "tx_no_route", "rx_vxlan_wrong_vni"]),
    st.sampled_from(ADDRESSES),
    st.sampled_from(ADDRESSES),
    st.sampled_from([1, 6, 17, 47]),
    st.sampled_from([None, 53, 80]),
    st.sampled_from([None, 53, 8080]),
    st.sampled_from([None, "192.0.2.2", "192.0.2.3"]),
)


def _ip(text: str) -> int:
    return int(IPv4Address(text))


# (expression, the same rule written directly)
RULES = [
    ("", lambda r: True),
    ("icmp", lambda r: r.proto == 1),
    ("tcp or udp", lambda r: r.proto in (6, 17)),
    ("proto 47", lambda r: r.proto == 47),
    ("host 198.18.2.3", lambda r: _ip("198.18.2.3") in (r.src, r.dst)),
    ("src 198.18.1.2", lambda r: r.src == _ip("198.18.1.2")),
    ("dst host 198.18.2.9", lambda r: r.dst == _ip("198.18.2.9")),
    ("net 198.18.2.0/24", lambda r: any(a >> 8 == _ip("198.18.2.0") >> 8 for a in (r.src, r.dst))),
    ("src net 10.0.0.0/8", lambda r: r.src >> 24 == 10),
    ("port 53", lambda r: 53 in (r.sport, r.dport)),
    ("dst port 8080", lambda r: r.dport == 8080),
    ("src port 80", lambda r: r.sport == 80),
    ("peer 192.0.2.2", lambda r: r.peer_ip == _ip("192.0.2.2")),
    ("peer 198.18.2.7", lambda r: r.peer_net == IPv4Network("198.18.2.0/24")),
    ("peer 198.18.0.0/16", lambda r: r.peer_net is not None),
    ("peer 192.0.2.0/24", lambda r: r.peer_ip is not None),
    ("inner", lambda r: r.point == "inner"),
    ("outer and in", lambda r: r.point == "outer" and r.direction == "rx"),
    ("out", lambda r: r.direction == "tx"),
    ("drop", lambda r: r.reason is not None),
    ("reason rx_*", lambda r: r.reason is not None and r.reason.startswith("rx_")),
    ("not icmp and !udp", lambda r: r.proto not in (1, 17)),
    (
        "icmp or tcp and port 80",
        lambda r: r.proto == 1 or (r.proto == 6 and 80 in (r.sport, r.dport)),
    ),
    ("(icmp or tcp) && port 80", lambda r: r.proto in (1, 6) and 80 in (r.sport, r.dport)),
    ("not (drop || outer)", lambda r: r.reason is None and r.point != "outer"),
    ("outer icmp", lambda r: r.point == "outer" and r.proto == 1),
    (
        "inner tcp or not inner udp",  # (inner and tcp) or ((not inner) and udp)
        lambda r: (r.point == "inner" and r.proto == 6) or (r.point != "inner" and r.proto == 17),
    ),
]


@given(records)
@FAST
def test_filters_select_what_their_rule_says(record: Record) -> None:
    for text, rule in RULES:
        assert trace_filter.parse(text)(record) == bool(rule(record)), text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("hots 1.2.3.4", "unknown filter word 'hots'"),
        ("host", "ends where an address"),
        ("host 1.2.3", "'1.2.3' is not an IPv4 or IPv6 address"),
        ("net 10.0.0.0/33", "is not an IPv4 or IPv6 network"),
        ("port 70000", "'70000' is not a port"),
        ("icmp or", "ends where a filter word"),
        ("(icmp", "ends where ')'"),
        ("icmp)", "unexpected ')'"),
        ("icmp and", "ends where a filter word"),
        ("proto x", "not a protocol"),
    ],
)
def test_bad_filters_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(FilterError) as e:
        trace_filter.parse(text)
    assert words in str(e.value) and "\n" not in str(e.value)


@given(st.text(max_size=40))
@FAST
def test_any_text_parses_or_is_one_filter_error(text: str) -> None:
    try:
        predicate = trace_filter.parse(text)
    except FilterError as e:
        assert "\n" not in str(e)
        return
    predicate(_record(src=1, dst=2, proto=1))


def test_inner_fields_reads_addresses_protocol_and_ports() -> None:
    record = Record("inner", "tx", None)
    packet = bytes(IP(src="198.18.1.2", dst="198.18.2.3") / TCP(sport=1234, dport=80))
    trace_filter.inner_fields(record, packet)
    assert (record.src, record.dst, record.proto) == (
        _ip("198.18.1.2"),
        _ip("198.18.2.3"),
        6,
    )
    assert (record.sport, record.dport) == (1234, 80)
    fragment = Record("inner", "tx", None)
    trace_filter.inner_fields(fragment, bytes(IP(dst="1.2.3.4", frag=3, proto=17) / (b"x" * 8)))
    assert fragment.sport is None  # no ports in a later fragment
    nothing = Record("inner", "tx", None)
    trace_filter.inner_fields(nothing, b"\x50" + bytes(39))  # neither IPv4 nor IPv6
    assert nothing.src is None


# -- the tracer -----------------------------------------------------------------------------

PEER = Lease(IPv4Network("198.18.2.0/24"), IPv4Address("192.0.2.2"))


def _tracer(text: str = "", headroom: int = 0, snaplen: int = 65535) -> tuple[trace.Tracer, list]:
    peers = PeerTable(8285)
    peers.upsert(PEER)
    got: list[trace.Capture] = []
    request = trace.TraceRequest(text, 0, snaplen)
    endpoint = trace.Endpoint("192.0.2.1", 8285, headroom)
    return trace.Tracer(request, got.append, endpoint, peers), got


PING = bytes(IP(src="198.18.1.5", dst="198.18.2.7") / ICMP() / b"payload")


def test_outer_captures_decode_as_udp_around_the_packet() -> None:
    tracer, got = _tracer()
    tracer.outer("tx", PING, ("192.0.2.2", 8285))
    tracer.outer("rx", PING, ("192.0.2.2", 40000))
    out, back = (IP(c.data) for c in got)
    assert (out.src, out[UDP].sport, out.dst, out[UDP].dport) == (
        "192.0.2.1",
        8285,
        "192.0.2.2",
        8285,
    )
    assert (back.src, back[UDP].sport, back.dst) == ("192.0.2.2", 40000, "192.0.2.1")
    assert bytes(out[UDP].payload) == PING
    assert [c.interface for c in got] == [trace.OUTER] * 2
    assert [c.direction for c in got] == ["tx", "rx"]
    assert got[0].length == 28 + len(PING)


def test_vxlan_outer_captures_decode_as_vxlan() -> None:
    from encap import vxlan

    tracer, got = _tracer("peer 198.18.2.0/24 and icmp", headroom=22)
    frame = vxlan.prefix(1, b"\x02" * 6, b"\x04" * 6) + PING
    tracer.outer("tx", frame, ("192.0.2.2", 8472))
    (capture,) = got
    decoded = IP(capture.data)
    assert decoded[UDP].dport == 8472
    inner = VXLAN(bytes(decoded[UDP].payload))
    assert inner.vni == 1 and inner[Ether].type == 0x0800 and inner[IP].dst == "198.18.2.7"


def test_drops_carry_their_reason_and_the_filter_sees_the_peer() -> None:
    tracer, got = _tracer("drop and peer 192.0.2.2")
    spoofed = bytes(IP(src="198.18.254.9", dst="198.18.1.5") / UDP() / b"x")
    tracer.drop("rx_foreign_source", spoofed, ("192.0.2.2", 8285))
    tracer.drop("rx_unknown_peer", spoofed, ("192.0.2.200", 8285))  # not peer 192.0.2.2
    tracer.drop("tx_no_route", bytes(IP(src="198.18.1.5", dst="198.18.9.9")), None)
    tracer.inner("tx", PING)  # not a drop
    (capture,) = got
    assert capture.comment == "dropped: rx_foreign_source"
    assert capture.interface == trace.OUTER and capture.direction == "rx"
    assert bytes(IP(capture.data)[UDP].payload) == spoofed


def test_inner_packets_are_matched_to_their_peer_by_address() -> None:
    tracer, got = _tracer("peer 192.0.2.2")
    tracer.inner("tx", PING)  # to 198.18.2.7, inside the peer's subnet
    tracer.inner("rx", bytes(IP(src="198.18.2.7", dst="198.18.1.5") / ICMP()))
    tracer.inner("tx", bytes(IP(src="198.18.1.5", dst="198.18.3.1") / ICMP()))  # another
    assert [c.direction for c in got] == ["tx", "rx"]


def test_snap_length_cuts_the_data_not_the_length() -> None:
    tracer, got = _tracer(snaplen=40)
    tracer.inner("tx", PING)
    tracer.outer("tx", PING, ("192.0.2.2", 8285))
    assert [len(c.data) for c in got] == [min(40, len(PING)), 40]
    assert [c.length for c in got] == [len(PING), 28 + len(PING)]


def test_tap_set_attaches_one_tracer_directly_and_several_through_a_fanout() -> None:
    class Plane:
        tap: object = None

        def set_tap(self, tap: object) -> None:
            self.tap = tap

    plane = Plane()
    taps = trace.TapSet(plane)
    first, got1 = _tracer("icmp")
    second, got2 = _tracer()
    taps.add(first)
    assert plane.tap is first
    taps.add(second)
    plane.tap.inner("tx", PING)  # type: ignore[attr-defined]
    assert len(got1) == len(got2) == 1
    taps.remove(first)
    taps.remove(second)
    assert plane.tap is None


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        ([], "JSON object"),
        ({"filter": 3}, "filter must be a string"),
        ({"count": -1}, "count -1"),
        ({"count": True}, "count True"),
        ({"snaplen": 0}, "snap length 0"),
        ({"snaplen": 10**9}, "must be 1 to"),
        ({"filter": "bogus"}, "unknown filter word"),
    ],
)
def test_trace_requests_are_checked(request_: object, words: str) -> None:
    with pytest.raises(ValueError) as e:
        trace.TraceRequest.parse(request_)
    assert words in str(e.value)


def test_capture_survives_the_worker_protocol() -> None:
    capture = trace.Capture(1, "rx", 123, b"\x00\xff" * 5, 99, "dropped: x")
    assert trace.Capture.from_json(json.loads(json.dumps(capture.to_json()))) == capture


async def test_stream_writes_pcapng_stops_at_the_count_and_counts_what_it_missed() -> None:
    class Transport:
        def __init__(self) -> None:
            self.size = 0

        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return self.size

    class Writer:
        def __init__(self) -> None:
            self.transport = Transport()
            self.data = bytearray()

        def write(self, data: bytes) -> None:
            self.data += data

    writer = Writer()
    stream = trace.PcapngStream(writer, trace.TraceRequest("", 2, 100), "flannel0", "eth0")  # type: ignore[arg-type]
    stream.emit(trace.Capture(0, "tx", 1, PING, len(PING), None))
    writer.transport.size = trace.STREAM_BACKLOG + 1  # a reader that stopped reading
    stream.emit(trace.Capture(1, "rx", 2, PING, len(PING), None))
    writer.transport.size = 0
    stream.emit(trace.Capture(1, "rx", 3, PING, len(PING), "dropped: y"))
    assert stream.done.is_set()
    stream.emit(trace.Capture(1, "rx", 4, PING, len(PING), None))  # after the count
    stream.close()
    blocks = pcapng.BlockReader().feed(bytes(writer.data))
    kinds = [kind for kind, _ in blocks]
    assert kinds.count(pcapng.BLOCK_EPB) == 2 and kinds.count(pcapng.BLOCK_ISB) == 2
    dropped = [trace_cli._isb_dropped(b) for kind, b in blocks if kind == pcapng.BLOCK_ISB]
    assert dropped == [0, 1]
    await asyncio.sleep(0)


def test_summary_lines_say_what_tcpdump_would() -> None:
    lines = []

    class Out:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    summary = trace_cli._Summary(Out())  # type: ignore[arg-type]
    for kind, block in pcapng.BlockReader().feed(
        pcapng.section_header()
        + pcapng.interface_description(name="flannel0")
        + pcapng.interface_description(name="eth0:udp/8285")
        + pcapng.enhanced_packet(0, 0, PING, direction="out")
        + pcapng.enhanced_packet(
            1,
            0,
            pcapng.udp_headers(b"\xc0\x00\x02\x02", 8285, b"\xc0\x00\x02\x01", 8285, len(PING))
            + PING,
            direction="in",
            comment="dropped: rx_foreign_source",
        )
    ):
        summary.block(kind, block)
    assert "flannel0 Out IP 198.18.1.5 > 198.18.2.7: ICMP echo request" in lines[0]
    assert "eth0:udp/8285 In  192.0.2.2.8285 > 192.0.2.1.8285: IP 198.18.1.5" in lines[1]
    assert lines[1].strip().endswith("[dropped: rx_foreign_source]")


def test_trace_cost_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import trace_cost

    assert trace_cost.main(["--rounds", "1", "--loops", "2"]) == 0
    out = capsys.readouterr().out
    assert "socket -> TUN" in out and "trace keeping all" in out
    assert "moved: 264 in, 264 out" in out  # 2 loops x 3 variants x 44, each way
