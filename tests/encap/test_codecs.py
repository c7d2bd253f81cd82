"""The sans-IO codecs (encap/) checked against scapy as an independent oracle."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.utils import checksum as scapy_checksum

from encap import icmp, ipv4, udp_frame
from encap.checksum import incremental_update, internet_checksum, ones_complement_sum
from encap.errors import CodecError
from tests.helpers.mutation import mutate

# Every reason ipv4.parse / udp_frame.decode may give; drop counters are keyed by these.
PARSE_REASONS = {"truncated", "not_ipv4", "bad_ihl", "bad_length"}

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ipv4_addresses = st.integers(min_value=0, max_value=2**32 - 1).map(
    lambda n: ".".join(str(b) for b in n.to_bytes(4, "big"))
)
unicast_addresses = st.tuples(
    st.integers(1, 223).filter(lambda a: a != 127),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(1, 254),
).map(lambda t: ".".join(map(str, t)))


@st.composite
def ip_options(draw: st.DrawFn) -> list[object]:
    """A mix of NOPs and a record-route option, at most 40 bytes before scapy's padding."""
    options: list[object] = []
    budget = 40
    if draw(st.booleans()):
        routers = draw(st.lists(ipv4_addresses, max_size=9))
        options.append(IPOption_RR(routers=routers))
        budget -= 3 + 4 * len(routers)
    nops = draw(st.integers(0, budget))
    options.extend(IPOption_NOP() for _ in range(nops))
    draw(st.randoms()).shuffle(options)
    # At most 40 bytes, so scapy's EOL padding to a multiple of 4 still fits in IHL 15.
    assert sum(len(bytes(o)) for o in options) <= 40
    return options


@st.composite
def scapy_packets(draw: st.DrawFn, *, options: bool = True) -> IP:
    """A valid IPv4 packet built by scapy, with random header fields and payload."""
    upper = draw(st.sampled_from(["udp", "tcp", "icmp", "raw"]))
    payload = draw(st.binary(max_size=300))
    ip = IP(
        src=draw(ipv4_addresses),
        dst=draw(ipv4_addresses),
        tos=draw(st.integers(0, 255)),
        id=draw(st.integers(0, 0xFFFF)),
        flags=draw(st.integers(0, 7)),
        frag=draw(st.integers(0, 0x1FFF)),
        ttl=draw(st.integers(0, 255)),
        options=draw(ip_options()) if options else [],
    )
    if upper == "udp":
        return ip / UDP(sport=draw(st.integers(0, 0xFFFF)), dport=8285) / payload
    if upper == "tcp":
        return ip / TCP(sport=draw(st.integers(0, 0xFFFF)), dport=80, flags="S") / payload
    if upper == "icmp":
        return ip / ICMP(type=draw(st.integers(0, 255)), code=draw(st.integers(0, 255))) / payload
    ip.proto = draw(st.integers(0, 255))
    return ip / payload


def udp_packet(src: str = "10.244.1.2", dst: str = "10.244.2.3", payload: bytes = b"hi") -> bytes:
    return bytes(IP(src=src, dst=dst) / UDP(sport=1234, dport=5678) / payload)


def quick_ip(header_fields: dict[str, object]) -> bytes:
    return bytes(IP(src="10.0.0.1", dst="10.0.0.2", **header_fields) / UDP() / b"data")


# -- checksum ------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=2000))
@example(b"")
@example(b"\x00")
@example(b"\xff")
@example(b"\xff\xff")
@example(b"\xff\xff" * 7)
@example(b"\x00" * 20)
@example(b"\x01\x00\xfe\xff")
def test_internet_checksum_equals_scapy(data: bytes) -> None:
    expected = scapy_checksum(data)
    assert internet_checksum(data) == expected
    assert internet_checksum(bytearray(data)) == expected
    assert internet_checksum(memoryview(data)) == expected
    assert ones_complement_sum(data) == ~expected & 0xFFFF


@FAST
@given(st.binary(min_size=2, max_size=200).filter(lambda b: len(b) % 2 == 0))
def test_data_with_its_checksum_sums_to_zero(data: bytes) -> None:
    # The receiver's check: summing over data plus the checksum word gives 0xFFFF.
    assert internet_checksum(data + internet_checksum(data).to_bytes(2, "big")) == 0


def test_checksum_of_known_header() -> None:
    # The worked example from RFC 1071 section 3 style: a real IPv4 header.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(header) == 0xB861


@FAST
@given(scapy_packets(options=False))
def test_incremental_ttl_decrement_equals_full_recompute(pkt: IP) -> None:
    raw = bytearray(bytes(pkt))
    if raw[8] == 0:
        raw[8] = 1
        raw[10:12] = b"\x00\x00"
        raw[10:12] = internet_checksum(raw[:20]).to_bytes(2, "big")
    old_word = int.from_bytes(raw[8:10], "big")
    old_csum = int.from_bytes(raw[10:12], "big")
    raw[8] -= 1
    new_word = int.from_bytes(raw[8:10], "big")
    updated = incremental_update(old_csum, old_word, new_word)
    raw[10:12] = b"\x00\x00"
    assert updated == internet_checksum(raw[:20])
    raw[10:12] = updated.to_bytes(2, "big")
    # Scapy agrees the header checksum is right.
    reparsed = IP(bytes(raw))
    del reparsed.chksum
    assert IP(bytes(reparsed)).chksum == updated
    assert ipv4.header_checksum_ok(raw)


@FAST
@given(
    header=st.binary(min_size=20, max_size=20),
    word=st.sampled_from([0, 1, 2, 3, 4, 6, 7, 8, 9]),
    new_word=st.integers(0, 0xFFFF),
)
def test_incremental_update_any_word_equals_full_recompute(
    header: bytes, word: int, new_word: int
) -> None:
    raw = bytearray(header)
    raw[0] = 0x45  # a real header is never all zeros
    raw[10:12] = internet_checksum(bytes(raw[:10]) + b"\x00\x00" + bytes(raw[12:])).to_bytes(
        2, "big"
    )
    old_csum = int.from_bytes(raw[10:12], "big")
    old_word = int.from_bytes(raw[2 * word : 2 * word + 2], "big")
    if word == 0:
        new_word |= 0x4000  # keep the version nibble non-zero
    raw[2 * word : 2 * word + 2] = new_word.to_bytes(2, "big")
    raw[10:12] = b"\x00\x00"
    assert incremental_update(old_csum, old_word, new_word) == internet_checksum(raw)


def test_incremental_update_no_change_keeps_checksum() -> None:
    raw = bytes(IP(src="10.0.0.1", dst="10.0.0.2", ttl=17) / UDP())
    csum = int.from_bytes(raw[10:12], "big")
    word = int.from_bytes(raw[8:10], "big")
    assert incremental_update(csum, word, word) == csum


# -- ipv4.parse ----------------------------------------------------------------------------


@FAST
@given(scapy_packets())
def test_parse_matches_scapy(pkt: IP) -> None:
    raw = bytes(pkt)
    theirs = IP(raw)
    ours = ipv4.parse(raw)
    assert ours.ihl == theirs.ihl
    assert ours.header_length == theirs.ihl * 4
    assert ours.tos == theirs.tos
    assert ours.total_length == theirs.len == len(raw)
    assert ours.ident == theirs.id
    assert ours.flags_fragment == (int(theirs.flags) << 13) | theirs.frag
    assert ours.fragment_offset == theirs.frag
    assert ours.more_fragments == bool(int(theirs.flags) & 1)
    assert ours.dont_fragment == bool(int(theirs.flags) & 2)
    assert ours.ttl == theirs.ttl
    assert ours.protocol == theirs.proto
    assert ours.checksum == theirs.chksum
    assert str(ours.src_address) == theirs.src
    assert str(ours.dst_address) == theirs.dst
    assert ours.src == bytes(int(x) for x in theirs.src.split("."))
    assert ipv4.header_checksum_ok(raw)
    # The same from a memoryview and a bytearray, and with link-layer padding after it.
    assert ipv4.parse(memoryview(raw)) == ours
    assert ipv4.parse(bytearray(raw)) == ours
    assert ipv4.parse(raw + b"\x00" * 6) == ours


@FAST
@given(scapy_packets(), st.data())
def test_header_checksum_ok_detects_a_flipped_header_bit(pkt: IP, data: st.DataObject) -> None:
    raw = bytearray(bytes(pkt))
    header_length = (raw[0] & 0x0F) * 4
    # Any single bit flip outside the version/IHL byte changes the header sum.
    position = data.draw(st.integers(1, header_length - 1))
    bit = data.draw(st.integers(0, 7))
    raw[position] ^= 1 << bit
    assert not ipv4.header_checksum_ok(raw)


def test_parse_reads_options_length() -> None:
    raw = bytes(IP(src="10.0.0.1", dst="10.0.0.2", options=[IPOption_RR(routers=["1.2.3.4"])]))
    header = ipv4.parse(raw)
    assert header.ihl == 7
    assert header.header_length == 28


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "truncated"),
        (b"\x45", "truncated"),
        (udp_packet()[:19], "truncated"),
        (bytes([0x44]) + udp_packet()[1:], "bad_ihl"),
        (bytes([0x40]) + udp_packet()[1:], "bad_ihl"),
        (bytes([0x65]) + udp_packet()[1:], "not_ipv4"),
        (bytes([0x60]) + b"\x00" * 39, "not_ipv4"),
        (bytes([0x05]) + udp_packet()[1:], "not_ipv4"),
        # total length claims more than was received
        (udp_packet()[:-1], "truncated"),
        (udp_packet()[:20], "truncated"),
        # total length smaller than the header
        (udp_packet()[:2] + struct.pack("!H", 19) + udp_packet()[4:], "bad_length"),
        (udp_packet()[:2] + struct.pack("!H", 0) + udp_packet()[4:], "bad_length"),
        # IHL 15 (60 bytes) but total length 30
        (bytes([0x4F]) + udp_packet()[1:], "bad_length"),
    ],
    ids=[
        "empty",
        "one-byte",
        "19-bytes",
        "ihl-4",
        "ihl-0",
        "version-6",
        "ipv6-header",
        "version-0",
        "one-byte-short",
        "header-only",
        "total-19",
        "total-0",
        "ihl-15-short",
    ],
)
def test_parse_rejects_with_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(CodecError) as info:
        ipv4.parse(raw)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(reason)


def test_parse_rejects_real_ipv6_packet() -> None:
    from scapy.layers.inet6 import IPv6

    raw = bytes(IPv6(src="fc00::1", dst="fc00::2") / UDP() / b"x")
    with pytest.raises(CodecError) as info:
        ipv4.parse(raw)
    assert info.value.reason == "not_ipv4"


# -- build_header --------------------------------------------------------------------------


@FAST
@given(
    src=ipv4_addresses,
    dst=ipv4_addresses,
    protocol=st.integers(0, 255),
    payload_length=st.integers(0, 0xFFFF - 20),
    ttl=st.integers(0, 255),
    ident=st.integers(0, 0xFFFF),
    tos=st.integers(0, 255),
    flags_fragment=st.integers(0, 0xFFFF),
)
def test_build_header_is_accepted_by_scapy(
    src: str,
    dst: str,
    protocol: int,
    payload_length: int,
    ttl: int,
    ident: int,
    tos: int,
    flags_fragment: int,
) -> None:
    header = ipv4.build_header(
        src=bytes(int(x) for x in src.split(".")),
        dst=bytes(int(x) for x in dst.split(".")),
        protocol=protocol,
        payload_length=payload_length,
        ttl=ttl,
        ident=ident,
        tos=tos,
        flags_fragment=flags_fragment,
    )
    assert len(header) == 20
    assert scapy_checksum(header) == 0
    theirs = IP(header)
    assert (theirs.version, theirs.ihl) == (4, 5)
    assert theirs.len == 20 + payload_length
    assert (theirs.src, theirs.dst) == (src, dst)
    assert (theirs.proto, theirs.ttl, theirs.id, theirs.tos) == (protocol, ttl, ident, tos)
    assert (int(theirs.flags) << 13) | theirs.frag == flags_fragment
    rebuilt = theirs.copy()
    del rebuilt.chksum
    assert IP(bytes(rebuilt)).chksum == theirs.chksum
    parsed = ipv4.parse(header + b"\x00" * payload_length)
    assert parsed.total_length == 20 + payload_length
    assert ipv4.header_checksum_ok(header)


def test_build_header_defaults() -> None:
    header = ipv4.build_header(
        src=b"\x0a\x00\x00\x01", dst=b"\x0a\x00\x00\x02", protocol=1, payload_length=8
    )
    theirs = IP(header + b"\x08\x00\xf7\xff\x00\x00\x00\x00")
    assert (theirs.ttl, theirs.id, theirs.tos, int(theirs.flags), theirs.frag) == (64, 0, 0, 0, 0)
    assert theirs.haslayer(ICMP)


def test_build_header_rejects_oversized_payload() -> None:
    with pytest.raises(CodecError) as info:
        ipv4.build_header(src=b"\0" * 4, dst=b"\0" * 4, protocol=17, payload_length=0xFFFF - 19)
    assert info.value.reason == "too_long"
    # The largest legal size is fine.
    ipv4.build_header(src=b"\0" * 4, dst=b"\0" * 4, protocol=17, payload_length=0xFFFF - 20)


# -- ICMP destination unreachable ----------------------------------------------------------


def _check_dest_unreachable(original: bytes, out: bytes, router: str, code: int) -> IP:
    parsed = IP(out)
    assert parsed.version == 4 and parsed.ihl == 5
    assert parsed.proto == 1
    assert parsed.src == router
    assert parsed.dst == IP(original).src
    assert parsed.len == len(out)
    assert scapy_checksum(out[:20]) == 0
    rebuilt = parsed.copy()
    del rebuilt.chksum
    assert IP(bytes(rebuilt)).chksum == parsed.chksum
    assert parsed.haslayer(ICMP)
    message = parsed[ICMP]
    assert (message.type, message.code) == (3, code)
    assert scapy_checksum(out[20:]) == 0
    rebuilt_icmp = ICMP(out[20:])
    del rebuilt_icmp.chksum
    assert ICMP(bytes(rebuilt_icmp)).chksum == message.chksum
    # Unused field zero, then the quote: the original header and (some of) its data.
    assert out[24:28] == b"\x00\x00\x00\x00"
    total = IP(original).len
    assert out[28:] == original[: min(total, 548)]
    assert len(out) <= 576
    return parsed


@FAST
@given(pkt=scapy_packets(), router=unicast_addresses, ttl=st.integers(1, 255))
def test_dest_unreachable_decodes_in_scapy(pkt: IP, router: str, ttl: int) -> None:
    original = bytes(pkt)
    out = icmp.build_dest_unreachable(
        original, src=bytes(int(x) for x in router.split(".")), ttl=ttl
    )
    parsed = _check_dest_unreachable(original, out, router, 0)
    assert parsed.ttl == ttl
    # The router's own parser accepts what it generated.
    assert ipv4.parse(out).total_length == len(out)
    assert udp_frame.decode(out).protocol == ipv4.PROTO_ICMP


def test_dest_unreachable_quotes_udp_original_in_full() -> None:
    original = udp_packet(payload=b"hello")
    out = icmp.build_dest_unreachable(original, src=bytes([10, 244, 1, 0]))
    parsed = _check_dest_unreachable(original, out, "10.244.1.0", 0)
    # Scapy decodes the quote as the original packet (IPerror/UDPerror).
    quoted = parsed[ICMP].payload
    assert quoted.src == "10.244.1.2" and quoted.dst == "10.244.2.3"
    assert quoted.payload.sport == 1234 and quoted.payload.dport == 5678
    assert bytes(quoted) == original
    assert parsed.ttl == 64


def test_dest_unreachable_host_code_and_large_original() -> None:
    original = udp_packet(payload=b"x" * 1400)
    out = icmp.build_dest_unreachable(original, src=bytes([10, 244, 1, 0]), code=1)
    _check_dest_unreachable(original, out, "10.244.1.0", 1)
    assert len(out) == 576


def test_dest_unreachable_ignores_link_padding() -> None:
    original = udp_packet(payload=b"abc")
    out = icmp.build_dest_unreachable(original + b"\x00" * 10, src=bytes([10, 244, 1, 0]))
    _check_dest_unreachable(original, out, "10.244.1.0", 0)
    assert out[28:] == original


def test_dest_unreachable_of_garbage_raises_codec_error() -> None:
    with pytest.raises(CodecError):
        icmp.build_dest_unreachable(b"\x45\x00", src=b"\x0a\x00\x00\x01")


# -- may_send_error_for --------------------------------------------------------------------


def _icmp(type_: int, code: int = 0, **ip_fields: object) -> bytes:
    fields = {"src": "10.244.1.2", "dst": "10.244.9.9", **ip_fields}
    return bytes(IP(**fields) / ICMP(type=type_, code=code) / b"payload!")


@pytest.mark.parametrize(
    ("packet", "allowed"),
    [
        (_icmp(8), True),  # echo request
        (_icmp(0), True),  # echo reply is not an error
        (_icmp(13), True),  # timestamp request
        (_icmp(3, 1), False),  # destination unreachable
        (_icmp(4), False),  # source quench
        (_icmp(5), False),  # redirect
        (_icmp(11), False),  # time exceeded
        (_icmp(12), False),  # parameter problem
        (_icmp(11, options=[IPOption_NOP()] * 4), False),  # error after IP options
        (_icmp(8, options=[IPOption_NOP()] * 4), True),
        (udp_packet(), True),
        (bytes(IP(src="10.244.1.2", dst="10.244.9.9") / TCP()), True),
        # fragments: the first (MF, offset 0) yes, any later one no
        (bytes(IP(src="10.244.1.2", dst="10.244.9.9", flags="MF", frag=0) / UDP()), True),
        (bytes(IP(src="10.244.1.2", dst="10.244.9.9", flags="MF", frag=1) / (b"x" * 8)), False),
        (bytes(IP(src="10.244.1.2", dst="10.244.9.9", frag=185) / (b"x" * 8)), False),
        (bytes(IP(src="10.244.1.2", dst="10.244.9.9", flags="DF") / UDP()), True),
        # sources that are not one host
        (udp_packet(src="224.0.0.5"), False),
        (udp_packet(src="239.255.255.250"), False),
        (udp_packet(src="255.255.255.255"), False),
        (udp_packet(src="0.0.0.0"), False),
        (udp_packet(src="127.0.0.1"), False),
        # multicast / broadcast destinations
        (udp_packet(dst="224.0.0.251"), False),
        (udp_packet(dst="255.255.255.255"), False),
        # not a packet at all
        (b"", False),
        (b"\x60" + b"\x00" * 39, False),
        (udp_packet()[:-1], False),
    ],
)
def test_may_send_error_for(packet: bytes, allowed: bool) -> None:
    assert icmp.may_send_error_for(packet) is allowed
    assert icmp.may_send_error_for(memoryview(packet)) is allowed


def test_may_not_send_error_for_icmp_without_a_type_byte() -> None:
    raw = bytearray(bytes(IP(src="10.244.1.2", dst="10.244.9.9", proto=1)))
    assert len(raw) == 20
    assert icmp.may_send_error_for(bytes(raw)) is False


@FAST
@given(st.binary(max_size=120))
def test_may_send_error_for_never_raises(data: bytes) -> None:
    assert icmp.may_send_error_for(data) in (True, False)


# -- flannel udp framing -------------------------------------------------------------------


def test_udp_frame_constants() -> None:
    assert udp_frame.PORT == 8285
    assert udp_frame.OVERHEAD == 28
    assert 1500 - udp_frame.OVERHEAD == 1472


@FAST
@given(scapy_packets())
def test_udp_frame_round_trip_of_scapy_packets(pkt: IP) -> None:
    raw = bytes(pkt)
    datagram = udp_frame.encode(raw)
    assert bytes(datagram) == raw  # flannel adds nothing
    header = udp_frame.decode(datagram)
    assert header == ipv4.parse(raw)
    assert udp_frame.decode(memoryview(raw)) == header
    assert bytes(udp_frame.encode(memoryview(raw))) == raw


@FAST
@given(scapy_packets(), st.binary(min_size=1, max_size=20))
def test_udp_frame_rejects_trailing_bytes(pkt: IP, extra: bytes) -> None:
    with pytest.raises(CodecError) as info:
        udp_frame.decode(bytes(pkt) + extra)
    assert info.value.reason == "bad_length"


def test_udp_frame_rejects_short_datagram() -> None:
    with pytest.raises(CodecError) as info:
        udp_frame.decode(udp_packet()[:-3])
    assert info.value.reason == "truncated"


# -- robustness: only CodecError, with a known reason --------------------------------------


def _only_codec_errors(data: bytes | bytearray | memoryview) -> None:
    for decoder in (ipv4.parse, udp_frame.decode):
        try:
            decoder(data)
        except CodecError as e:
            assert e.reason in PARSE_REASONS, e.reason


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=100))
def test_random_bytes_only_raise_codec_error(data: bytes) -> None:
    _only_codec_errors(data)
    _only_codec_errors(memoryview(data))


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    raw = bytearray(bytes(draw(scapy_packets())))
    return mutate(draw, raw, max_edits=6, hot=24)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_packets())
def test_mutated_packets_only_raise_codec_error(data: bytes) -> None:
    _only_codec_errors(data)
    try:
        header = ipv4.parse(data)
    except CodecError:
        return
    # Whatever parses is self-consistent.
    assert 20 <= header.header_length <= header.total_length <= len(data)
    assert header.ihl >= 5
    icmp.may_send_error_for(data)
    out = icmp.build_dest_unreachable(data, src=b"\x0a\x00\x00\x01")
    assert ipv4.header_checksum_ok(out)
    assert scapy_checksum(out[20:]) == 0


# -- ICMP fragmentation needed (RFC 1191) ----------------------------------------------------


@FAST
@given(
    pkt=scapy_packets(),
    router=unicast_addresses,
    mtu=st.integers(0, 0xFFFF),
    ttl=st.integers(1, 255),
)
@example(pkt=IP(src="10.244.1.2", dst="10.244.2.3", flags="DF") / UDP() / (b"x" * 1400),
         router="10.244.1.0", mtu=1372, ttl=64)  # fmt: skip
def test_frag_needed_is_what_scapy_builds(pkt: IP, router: str, mtu: int, ttl: int) -> None:
    """Byte for byte the packet scapy makes of the same fields: type 3 code 4, the
    next-hop MTU in the header's last two bytes, the original quoted as for any
    destination-unreachable (its header and up to 548 bytes, so the error stays <= 576)."""
    original = bytes(pkt)
    src = bytes(int(x) for x in router.split("."))
    out = icmp.build_frag_needed(original, src=src, mtu=mtu, ttl=ttl)
    quote = original[: min(IP(original).len, 548)]
    theirs = IP(src=router, dst=pkt.src, ttl=ttl, id=0) / ICMP(
        type=3, code=4, nexthopmtu=mtu
    ) / quote  # fmt: skip
    assert out == bytes(theirs)
    parsed = IP(out)
    assert (parsed[ICMP].type, parsed[ICMP].code, parsed[ICMP].nexthopmtu) == (3, 4, mtu)
    assert out[24:26] == b"\x00\x00"  # unused
    assert scapy_checksum(out[:20]) == 0 and scapy_checksum(out[20:]) == 0
    assert len(out) <= 576


@pytest.mark.parametrize("mtu", [-1, 0x10000, 2**63])
def test_frag_needed_refuses_an_mtu_beyond_16_bits(mtu: int) -> None:
    original = bytes(IP(src="10.244.1.2", dst="10.244.2.3") / UDP() / b"x")
    with pytest.raises(CodecError) as info:
        icmp.build_frag_needed(original, src=bytes([10, 244, 1, 0]), mtu=mtu)
    assert info.value.reason == "bad_mtu"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120) | mutated_packets(), st.integers(0, 0xFFFF))
def test_frag_needed_of_anything_is_a_packet_or_a_codec_error(data: bytes, mtu: int) -> None:
    """Malformed originals raise CodecError only; what is built is a valid IPv4 ICMP packet."""
    try:
        out = icmp.build_frag_needed(data, src=bytes([10, 244, 1, 0]), mtu=mtu)
    except CodecError as e:
        assert e.reason in PARSE_REASONS, e.reason
        return
    assert ipv4.header_checksum_ok(out)
    assert scapy_checksum(out[20:]) == 0
    assert IP(out)[ICMP].nexthopmtu == mtu
