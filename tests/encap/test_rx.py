"""encap.gso's receive rules (drop_reason, vxlan_reason, the oversize super-packet of
plan_tun_writes) against scapy as the oracle: what the kernel would accept is delivered,
partial checksums are completed to what scapy computes, everything else is named."""

from __future__ import annotations

import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR

from encap import gso, native
from encap.checksum import ones_complement_sum
from tests.helpers.tcp_streams import resegment

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOURCES = ((0xC61201, 8),)  # 198.18.1.0/24
OURS = (0xC61202, 8)  # 198.18.2.0/24
CHECKS = [gso.drop_reason]
if native.AVAILABLE:
    CHECKS.append(native.module().drop_reason)


def packet(
    proto: str = "tcp",
    payload: bytes = b"x" * 300,
    options: list[object] | None = None,
    src: str = "198.18.1.5",
    dst: str = "198.18.2.9",
    flags: str = "",
) -> IP:
    ip = IP(src=src, dst=dst, id=7, ttl=63, flags=flags, options=options or [])
    if proto == "tcp":
        return ip / TCP(sport=40000, dport=5201, seq=9, flags="PA") / payload
    if proto == "udp":
        return ip / UDP(sport=5000, dport=5201) / payload
    return ip / ICMP() / payload


def partial(pkt: IP) -> bytearray:
    """``pkt`` as a kernel with checksum offload hands it over: the L4 checksum field holds
    the folded pseudo-header sum (CHECKSUM_PARTIAL)."""
    raw = bytearray(bytes(pkt))
    ihl = (raw[0] & 0x0F) * 4
    field = ihl + (16 if pkt.proto == 6 else 6)
    pseudo = raw[12:20] + struct.pack("!BBH", 0, pkt.proto, len(raw) - ihl)
    raw[field : field + 2] = ones_complement_sum(pseudo).to_bytes(2, "big")
    return raw


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_valid_packets_pass_unchanged(check: object, proto: str) -> None:
    for options in (None, [IPOption_NOP(), IPOption_RR(routers=["1.2.3.4"])]):
        raw = bytearray(bytes(packet(proto, options=options)))
        before = bytes(raw)
        assert check(raw, 0, len(raw), SOURCES, OURS) is None  # type: ignore[operator]
        assert raw == before


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("size", [0, 1, 300, 1401])
def test_partial_checksums_are_completed_as_scapy_computes_them(
    check: object, proto: str, size: int
) -> None:
    pkt = packet(proto, (bytes(range(256)) * 6)[:size])
    raw = partial(pkt)
    assert check(raw, 0, len(raw), SOURCES, OURS) is None  # type: ignore[operator]
    assert raw == bytes(pkt)  # scapy filled in the complete checksum


@pytest.mark.parametrize("check", CHECKS)
def test_udp_without_checksum_passes(check: object) -> None:
    raw = bytearray(bytes(packet("udp")))
    raw[26:28] = b"\0\0"
    assert check(raw, 0, len(raw), SOURCES, OURS) is None  # type: ignore[operator]


def _damaged(proto: str, where: int, value: int) -> bytearray:
    raw = bytearray(bytes(packet(proto)))
    raw[where] = value
    return raw


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (_damaged("tcp", 200, 0x55), "rx_bad_l4_checksum"),  # a payload byte
        (_damaged("udp", 200, 0x55), "rx_bad_l4_checksum"),
        (_damaged("tcp", 10, 0x00), "rx_bad_ip_checksum"),
        (_damaged("icmp", 8, 0x01), "rx_bad_ip_checksum"),  # TTL, checksum not redone
        (bytearray(bytes(packet("tcp", b""))[:30] + b"\0" * 0), "rx_bad_length"),
        (bytearray(b"\x60" + bytes(packet("tcp"))[1:]), "rx_not_ipv4"),
    ],
)
def test_corrupt_packets_are_named(check: object, raw: bytearray, reason: str) -> None:
    assert check(raw, 0, len(raw), SOURCES, OURS) == reason  # type: ignore[operator]


def _resealed_ip(raw: bytearray) -> bytearray:
    """The IPv4 header checksum recomputed (so a test reaches the rule after it)."""
    ihl = (raw[0] & 0x0F) * 4
    raw[10:12] = b"\0\0"
    raw[10:12] = (~ones_complement_sum(raw[:ihl]) & 0xFFFF).to_bytes(2, "big")
    return raw


@pytest.mark.parametrize("check", CHECKS)
def test_header_rules_beyond_the_checksum(check: object) -> None:
    def reason(raw: bytearray) -> str | None:
        return check(raw, 0, len(raw), SOURCES, OURS)  # type: ignore[operator, no-any-return]

    small = bytearray(bytes(IP(src="198.18.1.5", dst="198.18.2.9", proto=6)))  # 20 bytes
    small[0] = 0x46  # IHL 24 > total length 20
    assert reason(_resealed_ip(small)) == "rx_bad_ihl"
    bad_option = bytearray(bytes(packet("icmp", options=[IPOption_NOP()] * 4)))
    bad_option[21] = 0x07  # NOP, then RR whose length (the next NOP byte, 1) is < 2
    assert reason(_resealed_ip(bad_option)) == "rx_bad_ip_options"
    long_option = bytearray(bytes(packet("icmp", options=[IPOption_NOP()] * 4)))
    long_option[22:24] = b"\x07\x09"  # an option running past the header
    assert reason(_resealed_ip(long_option)) == "rx_bad_ip_options"
    ended = bytearray(bytes(packet("icmp", options=[IPOption_NOP()] * 4)))
    ended[20:24] = b"\x00\x07\xff\xff"  # END: what follows is padding
    assert reason(_resealed_ip(ended)) is None
    foreign = bytearray(bytes(packet("icmp", src="198.18.3.1")))
    assert reason(foreign) == "rx_foreign_source"
    assert check(foreign, 0, len(foreign), SOURCES + ((0xC61203, 8),), OURS) is None  # type: ignore[operator]
    elsewhere = bytearray(bytes(packet("icmp", dst="198.18.7.1")))
    assert reason(elsewhere) == "rx_not_our_subnet"
    short_tcp = bytearray(bytes(IP(src="198.18.1.5", dst="198.18.2.9", proto=6) / (b"\0" * 12)))
    assert reason(short_tcp) == "rx_bad_l4_header"
    udp_length = bytearray(bytes(packet("udp")))
    udp_length[24:26] = (9).to_bytes(2, "big")
    assert reason(udp_length) == "rx_bad_l4_header"
    fragment = bytearray(bytes(packet("tcp", flags="MF")))
    fragment[200] ^= 0xFF
    assert reason(fragment) is None  # the kernel checks a fragment's L4 after reassembly


@given(
    st.sampled_from(["tcp", "udp"]),
    st.binary(max_size=600),
    st.integers(0, 0xFFFF),
)
@FAST
def test_only_a_complete_or_partial_checksum_passes(proto: str, payload: bytes, field: int) -> None:
    """Whatever the checksum field holds: delivered iff scapy calls it complete or it is
    the pseudo-header sum (then completed to scapy's value)."""
    pkt = packet(proto, payload)
    good = bytes(pkt)
    raw = bytearray(good)
    at = 20 + (16 if proto == "tcp" else 6)
    raw[at : at + 2] = field.to_bytes(2, "big")
    pseudo_raw = partial(pkt)
    is_partial = raw == pseudo_raw or (
        ones_complement_sum(raw[at : at + 2]) == ones_complement_sum(pseudo_raw[at : at + 2])
    )
    rechecked = IP(bytes(raw))
    del rechecked[TCP if proto == "tcp" else UDP].chksum
    complete = bytes(IP(bytes(rechecked))) == bytes(raw)
    equivalent = field in (0, 0xFFFF) and good[at : at + 2] in (b"\0\0", b"\xff\xff")
    no_checksum = proto == "udp" and field == 0
    for check in CHECKS:
        data = bytearray(raw)
        reason = check(data, 0, len(data), SOURCES, OURS)
        if complete or no_checksum or equivalent:
            assert reason is None and data == raw
        elif is_partial:
            assert reason is None and data == good
        else:
            assert reason == "rx_bad_l4_checksum"


@pytest.mark.parametrize("plan", ["pure", "native"])
def test_tcp_beyond_the_mtu_goes_in_as_a_super_packet(plan: str) -> None:
    """A kernel vxlan peer's TSO packet, handed to our socket whole: one write of
    GSO_TCPV4 that the kernel cuts into MTU-sized segments."""
    payload = bytes(range(256)) * 40
    raw = partial(packet("tcp", payload))
    data = bytearray(raw) + bytearray(100)
    planner = gso.plan_tun_writes if plan == "pure" else native.module().plan_tun_writes
    drops: Counter[str] = Counter()
    writes = planner(data, len(raw), len(raw), SOURCES, OURS, drops, None, None, 1450)
    assert not drops and len(writes) == 1
    buffers, count, size = writes[0]
    assert (count, size) == (1, len(raw))
    assert struct.unpack("=BBHHHH", bytes(buffers[0])) == (1, 1, 40, 1410, 20, 16)
    segments = resegment(list(buffers))
    assert all(len(s) <= 1450 for s in segments) and len(segments) == -(-len(payload) // 1410)
    assert b"".join(bytes(IP(s)[TCP].payload) for s in segments) == payload
    for segment in segments:  # each with complete checksums, as scapy computes them
        sealed = IP(segment)
        del sealed.chksum, sealed[TCP].chksum
        assert bytes(IP(bytes(sealed))) == segment
    # Without an MTU (or within it) the packet goes in as it came.
    plain = planner(bytearray(raw), len(raw), len(raw), SOURCES, OURS, drops)
    assert [count for _, count, _ in plain] == [1] and bytes(plain[0][0][0]) == bytes(10)


@pytest.mark.parametrize("plan", ["pure", "native"])
def test_vxlan_headers_are_checked_per_datagram(plan: str) -> None:
    vni, mac = b"\x00\x00\x01", bytes.fromhex("02aabbccddee")
    head = b"\x08\0\0\0" + vni + b"\0" + mac + bytes(6) + b"\x08\x00"
    inner = bytes(packet("icmp", b"p" * 100))
    cases = {
        "ok": head + inner,
        "rx_vxlan_bad_flags": b"\x00" + head[1:] + inner,
        "rx_vxlan_wrong_vni": head[:4] + b"\0\0\2" + head[7:] + inner,
        "rx_vxlan_foreign_mac": head[:8] + bytes(6) + head[14:] + inner,
        "rx_vxlan_bad_ethertype": head[:20] + b"\x86\xdd" + inner,
        "arp": head[:20] + b"\x08\x06" + inner,
        "rx_vxlan_truncated": head + inner[:19],
    }
    planner = gso.valid_pieces if plan == "pure" else native.module().valid_pieces
    for name, datagram in cases.items():
        drops: Counter[str] = Counter()
        arp: list[int] = []
        pieces = planner(
            bytearray(datagram), len(datagram), 9000, SOURCES, OURS, drops, (vni, mac), arp
        )
        if name == "ok":
            assert pieces == [(22, len(datagram))] and not drops and not arp
        elif name == "arp":
            assert pieces == [] and not drops and arp == [0]
        else:
            assert pieces == [] and drops == Counter({name: 1}) and not arp
