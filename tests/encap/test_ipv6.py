"""encap/ipv6.py (issue 20) against scapy as an independent encoder and decoder: the
receive rules on valid, partial-checksum, corrupt and hostile IPv6 packets (hypothesis,
random and mutated), the ICMPv6 errors, and neighbour solicitation / advertisement."""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Packet, Raw

from encap import ipv6
from encap.errors import CodecError
from tests.helpers.mutation import mutate

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PEER_NET = IPv6Network("fd00:10:0:77::/64")
OWN_NET = IPv6Network("fd00:10:0:34::/64")
SOURCES = ((int(PEER_NET.network_address) >> 64, 64),)
OWN = (int(OWN_NET.network_address) >> 64, 64)
SRC = "fd00:10:0:77::5"
DST = "fd00:10:0:34::2"
OUR_MAC = bytes.fromhex("0e0000000106")


def reason_of(packet: bytes | bytearray) -> tuple[str | None, bytearray]:
    data = bytearray(packet)
    return ipv6.drop_reason6(data, 0, len(data), SOURCES, OWN), data


payloads = st.binary(max_size=300)
upper = st.sampled_from(["tcp", "udp", "echo", "reply"])
extensions = st.lists(st.sampled_from(["dest", "routing0"]), max_size=3)


def build(kind: str, payload: bytes, chain: list[str], hop_by_hop: bool = False) -> bytes:
    """A valid packet from SRC to DST built by scapy (its checksums scapy's own)."""
    layer: Packet = IPv6(src=SRC, dst=DST)
    if hop_by_hop:
        layer = layer / IPv6ExtHdrHopByHop()
    for ext in chain:
        layer = layer / (IPv6ExtHdrDestOpt() if ext == "dest" else IPv6ExtHdrRouting(segleft=0))
    l4 = {
        "tcp": TCP(sport=4321, dport=80, flags="PA", seq=7),
        "udp": UDP(sport=4321, dport=9999),
        "echo": ICMPv6EchoRequest(id=1, seq=2),
        "reply": ICMPv6EchoReply(id=1, seq=2),
    }[kind]
    return bytes(layer / l4 / Raw(payload))


@FAST
@given(kind=upper, payload=payloads, chain=extensions, hop_by_hop=st.booleans())
def test_scapys_valid_packets_pass_unchanged(
    kind: str, payload: bytes, chain: list[str], hop_by_hop: bool
) -> None:
    packet = build(kind, payload, chain, hop_by_hop)
    reason, data = reason_of(packet)
    assert reason is None
    assert bytes(data) == packet


def checksum_field(packet: bytes) -> int:
    """Where scapy's packet keeps its L4 checksum (no extension headers)."""
    return 40 + {6: 16, 17: 6, 58: 2}[packet[6]]


@FAST
@given(kind=upper, payload=payloads)
def test_a_partial_checksum_is_completed_to_scapys(kind: str, payload: bytes) -> None:
    """The kernel's vxlan device over a veth leaves the pseudo-header sum in the field;
    it is completed in place, to exactly what scapy computes."""
    packet = build(kind, payload, [])
    field = checksum_field(packet)
    partial = bytearray(packet)
    length = len(packet) - 40
    pseudo = ipv6.pseudo_sum6(packet, 0, packet[6], length) % 0xFFFF or 0xFFFF
    partial[field : field + 2] = pseudo.to_bytes(2, "big")
    reason, data = reason_of(partial)
    assert reason is None
    assert bytes(data) == packet


@FAST
@given(kind=upper, payload=payloads, flip=st.integers(1, 0xFFFF))
def test_a_corrupt_checksum_is_dropped(kind: str, payload: bytes, flip: int) -> None:
    packet = bytearray(build(kind, payload, []))
    field = checksum_field(bytes(packet))
    good = packet[field] << 8 | packet[field + 1]
    pseudo = ipv6.pseudo_sum6(packet, 0, packet[6], len(packet) - 40) % 0xFFFF
    bad = good ^ flip
    # Equivalent spellings of the right sum, and the partial sum, are not corrupt.
    if bad % 0xFFFF in (good % 0xFFFF, pseudo) or (packet[6] == 17 and bad == 0):
        return
    packet[field : field + 2] = bad.to_bytes(2, "big")
    assert reason_of(packet)[0] == "rx_bad_l4_checksum"


def test_udp_without_a_checksum_is_dropped_as_the_kernel_does() -> None:
    packet = bytearray(build("udp", b"x", []))
    packet[46:48] = b"\0\0"
    assert reason_of(packet)[0] == "rx_bad_l4_checksum"


def test_hostile_headers_are_dropped_by_reason() -> None:
    good = build("udp", b"hello", [])
    jumbo = bytearray(bytes(IPv6(src=SRC, dst=DST) / IPv6ExtHdrHopByHop() / UDP() / Raw(b"x")))
    jumbo[4:6] = b"\0\0"
    chain = build("udp", b"x", ["dest"] * 9)
    past_end = bytearray(build("udp", b"", ["dest"]))
    past_end[41] = 200  # a destination-options header longer than the packet
    hbh_late = bytes(IPv6(src=SRC, dst=DST) / IPv6ExtHdrDestOpt(nh=0) / IPv6ExtHdrHopByHop())
    reserved = bytes(IPv6(src=SRC, dst=DST, nh=255) / Raw(b"x" * 8))
    cases = {
        "rx_ipv6_truncated": good[:39],
        "rx_ipv6_bad_version": b"\x45" + good[1:],
        "rx_ipv6_jumbo": bytes(jumbo),
        "rx_ipv6_bad_length": good + b"\0",
        "rx_ipv6_ext_chain_too_long": chain,
        "rx_ipv6_bad_ext_header": bytes(past_end),
        "rx_ipv6_bad_next_header": hbh_late,
        "rx_foreign_source": bytes(IPv6(src=DST, dst=DST) / UDP() / Raw(b"x")),
        "rx_not_our_subnet": bytes(IPv6(src=SRC, dst=SRC) / UDP() / Raw(b"x")),
        "rx_bad_l4_header": bytes(IPv6(src=SRC, dst=DST, nh=6) / Raw(b"x" * 8)),
    }
    for reason, packet in cases.items():
        assert reason_of(packet)[0] == reason, reason
    assert reason_of(reserved)[0] == "rx_ipv6_bad_next_header"
    assert set(cases) <= set(ipv6.RX_DROP_REASONS6)


def test_fragments_and_routed_packets_are_left_to_the_kernel() -> None:
    """A fragment's or a routed packet's L4 checksum cannot be checked here."""
    fragment = bytearray(bytes(IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(m=1) / UDP() / b"x"))
    fragment[-3] ^= 0xFF  # its checksum no longer matches: still passed on
    assert reason_of(fragment)[0] is None
    routed = bytearray(build("tcp", b"abc", ["routing0"]))
    routed[-1] ^= 0xFF
    assert reason_of(routed)[0] is None


@FAST
@given(kind=upper, payload=st.binary(max_size=64), chain=extensions, draw=st.data())
def test_mutated_packets_never_crash_and_give_a_known_reason(
    kind: str, payload: bytes, chain: list[str], draw: st.DataObject
) -> None:
    packet = mutate(draw.draw, bytearray(build(kind, payload, chain)), 4, 80)
    data = bytearray(packet) + b"trailing bytes outside the range"
    reason = ipv6.drop_reason6(data, 0, len(packet), SOURCES, OWN)
    assert reason is None or reason in ipv6.RX_DROP_REASONS6
    assert data[len(packet) :] == b"trailing bytes outside the range"


@FAST
@given(data=st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    reason = ipv6.drop_reason6(bytearray(data), 0, len(data), SOURCES, OWN)
    assert reason is None or reason in ipv6.RX_DROP_REASONS6
    ipv6.may_send_error_for(data)
    ipv6.solicited_target(data)


def test_a_range_outside_the_buffer_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        ipv6.drop_reason6(bytearray(10), 0, 11, SOURCES, OWN)


def test_destination_unreachable_and_packet_too_big_decode_in_scapy() -> None:
    original = build("tcp", b"y" * 2000, [])
    gateway = OWN_NET.network_address.packed
    error = IPv6(ipv6.build_dest_unreachable(original, src=gateway))
    assert error.src == str(OWN_NET.network_address) and error.dst == SRC and error.hlim == 64
    unreachable = error[ICMPv6DestUnreach]
    assert unreachable.code == 0
    assert len(bytes(error)) == 1280  # as much of the packet as fits the minimum MTU
    again = IPv6(bytes(error))
    del again[ICMPv6DestUnreach].cksum
    assert IPv6(bytes(again))[ICMPv6DestUnreach].cksum == unreachable.cksum
    too_big = IPv6(ipv6.build_packet_too_big(original, src=gateway, mtu=1430))
    assert too_big[ICMPv6PacketTooBig].mtu == 1430


def test_errors_are_not_sent_for_errors_multicast_or_later_fragments() -> None:
    assert ipv6.may_send_error_for(build("echo", b"", []))
    assert ipv6.may_send_error_for(build("tcp", b"", ["dest"]))
    error = ipv6.build_dest_unreachable(build("udp", b"", []), src=IPv6Address(DST).packed)
    assert not ipv6.may_send_error_for(error)
    assert not ipv6.may_send_error_for(bytes(IPv6(src=SRC, dst="ff02::1") / UDP()))
    assert not ipv6.may_send_error_for(bytes(IPv6(src="::", dst=DST) / UDP()))
    assert not ipv6.may_send_error_for(bytes(IPv6(src="ff02::1", dst=DST) / UDP()))
    later = bytes(IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(offset=10) / Raw(b"x" * 8))
    assert not ipv6.may_send_error_for(later)
    assert not ipv6.may_send_error_for(b"\x45" + bytes(39))


def test_a_solicitation_for_our_vtep_gets_scapys_idea_of_an_advertisement() -> None:
    vtep = OWN_NET.network_address
    solicitation = bytes(
        IPv6(src=SRC, dst="ff02::1:ff00:0", hlim=255)
        / ICMPv6ND_NS(tgt=str(vtep))
        / ICMPv6NDOptSrcLLAddr(lladdr="0e:00:00:00:02:06")
    )
    assert ipv6.solicited_target(solicitation) == vtep.packed
    advert = IPv6(ipv6.build_neighbor_advertisement(solicitation, target=vtep.packed, mac=OUR_MAC))
    assert advert.src == str(vtep) and advert.dst == SRC and advert.hlim == 255
    na = advert[ICMPv6ND_NA]
    assert (na.R, na.S, na.O, na.tgt) == (0, 1, 1, str(vtep))
    assert advert[ICMPv6NDOptDstLLAddr].lladdr == "0e:00:00:00:01:06"
    again = IPv6(bytes(advert))
    del again[ICMPv6ND_NA].cksum
    assert IPv6(bytes(again))[ICMPv6ND_NA].cksum == na.cksum
    assert ipv6.solicited_node_mac(vtep.packed) == bytes.fromhex("3333ff000000")


@pytest.mark.parametrize(
    "broken",
    ["hop_limit", "checksum", "unspecified_source", "truncated", "echo"],
)
def test_what_is_no_valid_solicitation_is_not_answered(broken: str) -> None:
    target = str(OWN_NET.network_address)
    packet = bytearray(
        bytes(
            IPv6(src="::" if broken == "unspecified_source" else SRC, dst=DST, hlim=255)
            / (ICMPv6EchoRequest() if broken == "echo" else ICMPv6ND_NS(tgt=target))
        )
    )
    if broken == "hop_limit":
        packet[7] = 64
    elif broken == "checksum":
        packet[42] ^= 1
    elif broken == "truncated":
        packet = packet[:50]
    assert ipv6.solicited_target(packet) is None


def test_build_checks_its_arguments() -> None:
    with pytest.raises(CodecError):
        ipv6.build_packet(b"\0" * 4, b"\0" * 16, 17, b"", 64)
    with pytest.raises(CodecError):
        ipv6.build_error(b"short", src=bytes(16), kind=1)
    with pytest.raises(CodecError):
        ipv6.build_neighbor_advertisement(bytes(64), target=bytes(16), mac=b"\0")
