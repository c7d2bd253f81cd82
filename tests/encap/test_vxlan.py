"""encap/vxlan.py and encap/arp.py checked against scapy and tshark as independent decoders."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw
from scapy.utils import wrpcap

from encap import arp, vxlan
from encap.errors import CodecError
from tests.helpers.mutation import mutate

# Every reason vxlan.decode may give; drop counters are keyed by these.
DECODE_REASONS = {"truncated", "bad_flags", "wrong_vni", "bad_ethertype", "foreign_mac"}
ARP_REASONS = {"truncated", "not_ethernet_ipv4"}

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OUR_MAC = bytes.fromhex("c6d2326f8f44")  # the VtepMAC from flannel's lease example
PEER_MAC = bytes.fromhex("0a580af40101")
VNI = 1

macs = st.binary(min_size=6, max_size=6)
vnis = st.integers(0, vxlan.MAX_VNI)
ipv4_addresses = st.integers(0, 2**32 - 1).map(
    lambda n: ".".join(str(b) for b in n.to_bytes(4, "big"))
)


def ip_bytes(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def inner_packet(src: str = "10.244.1.2", dst: str = "10.244.2.3", payload: bytes = b"hi") -> bytes:
    return bytes(IP(src=src, dst=dst) / UDP(sport=1234, dport=5678) / payload)


def frame(
    packet: bytes | None = None,
    *,
    vni: int = VNI,
    dst: bytes = OUR_MAC,
    src: bytes = PEER_MAC,
    ethertype: int = vxlan.ETHERTYPE_IPV4,
) -> bytes:
    """A datagram as a peer sends it to us."""
    return vxlan.encode(
        vxlan.prefix(vni, dst, src, ethertype), inner_packet() if packet is None else packet
    )


def reason_of(datagram: bytes | bytearray | memoryview) -> str:
    """The reason our node (VNI 1, OUR_MAC) drops ``datagram``."""
    with pytest.raises(CodecError) as info:
        vxlan.decode(datagram, vni=VNI, mac=OUR_MAC)
    return info.value.reason


# -- constants and header ------------------------------------------------------------------


def test_constants() -> None:
    assert (vxlan.PORT, vxlan.IANA_PORT) == (8472, 4789)
    assert (vxlan.HEADER_LEN, vxlan.ETHER_LEN, vxlan.PREFIX_LEN) == (8, 14, 22)
    assert vxlan.OVERHEAD == 50
    assert 1500 - vxlan.OVERHEAD == 1450  # flannel.1's MTU on a 1500-byte underlay
    assert vxlan.FLAG_I == 0x08
    assert (vxlan.ETHERTYPE_IPV4, vxlan.ETHERTYPE_ARP) == (0x0800, 0x0806)
    assert vxlan.BROADCAST == b"\xff" * 6
    assert (arp.REQUEST, arp.REPLY) == (1, 2)


def test_header_bytes() -> None:
    assert vxlan.header(1) == bytes.fromhex("0800000000000100")
    assert vxlan.header(0) == bytes.fromhex("0800000000000000")
    assert vxlan.header(0xABCDEF) == bytes.fromhex("08000000abcdef00")
    assert vxlan.header(vxlan.MAX_VNI) == bytes.fromhex("08000000ffffff00")


@pytest.mark.parametrize("vni", [-1, 1 << 24, 2**32])
def test_header_rejects_vni_outside_24_bits(vni: int) -> None:
    with pytest.raises(CodecError) as info:
        vxlan.header(vni)
    assert info.value.reason == "bad_vni"
    with pytest.raises(CodecError) as info:
        vxlan.prefix(vni, OUR_MAC, PEER_MAC)
    assert info.value.reason == "bad_vni"


def test_prefix_rejects_bad_mac_and_ethertype() -> None:
    with pytest.raises(CodecError) as info:
        vxlan.prefix(1, OUR_MAC[:5], PEER_MAC)
    assert info.value.reason == "bad_mac"
    with pytest.raises(CodecError) as info:
        vxlan.prefix(1, OUR_MAC, PEER_MAC + b"\x00")
    assert info.value.reason == "bad_mac"
    with pytest.raises(CodecError) as info:
        vxlan.prefix(1, OUR_MAC, PEER_MAC, 0x10000)
    assert info.value.reason == "bad_ethertype"


@FAST
# Values below 0x0600 are 802.3 lengths, which scapy (rightly) decodes as Dot3.
@given(vni=vnis, dst=macs, src=macs, ethertype=st.integers(0x0600, 0xFFFF))
def test_header_and_prefix_round_trip(vni: int, dst: bytes, src: bytes, ethertype: int) -> None:
    head = vxlan.header(vni)
    assert len(head) == vxlan.HEADER_LEN
    assert head[0] == vxlan.FLAG_I and head[1:4] == b"\0\0\0" and head[7] == 0
    assert int.from_bytes(head[4:7], "big") == vni
    pre = vxlan.prefix(vni, dst, src, ethertype)
    assert len(pre) == vxlan.PREFIX_LEN
    assert pre[:8] == head
    assert (pre[8:14], pre[14:20], int.from_bytes(pre[20:22], "big")) == (dst, src, ethertype)
    # scapy reads the same fields back.
    theirs = VXLAN(pre + b"\0" * 20)
    assert (int(theirs.flags), theirs.vni, theirs.reserved1, theirs.reserved2) == (8, vni, 0, 0)
    assert (theirs[Ether].dst, theirs[Ether].src) == (vxlan.format_mac(dst), vxlan.format_mac(src))
    assert theirs[Ether].type == ethertype


# -- our frames decoded by scapy -----------------------------------------------------------


@FAST
@given(
    vni=vnis,
    dst=macs,
    src=macs,
    inner_src=ipv4_addresses,
    inner_dst=ipv4_addresses,
    ttl=st.integers(0, 255),
    payload=st.binary(max_size=200),
)
def test_our_frame_decodes_in_scapy(
    vni: int, dst: bytes, src: bytes, inner_src: str, inner_dst: str, ttl: int, payload: bytes
) -> None:
    inner = bytes(IP(src=inner_src, dst=inner_dst, ttl=ttl) / UDP(sport=7, dport=9) / payload)
    datagram = vxlan.encode(vxlan.prefix(vni, dst, src), inner)
    assert len(datagram) == len(inner) + vxlan.PREFIX_LEN
    outer = (
        Ether()
        / IP(src="192.168.64.3", dst="192.168.64.4")
        / UDP(sport=40000, dport=vxlan.PORT)
        / Raw(datagram)
    )
    # Through scapy's own 8472 binding, from the wire bytes.
    parsed = Ether(bytes(outer))
    assert parsed.haslayer(VXLAN)
    theirs = parsed[VXLAN]
    assert int(theirs.flags) == 0x08
    assert theirs.vni == vni
    eth = theirs[Ether]
    assert (eth.dst, eth.src, eth.type) == (vxlan.format_mac(dst), vxlan.format_mac(src), 0x0800)
    ip = eth[IP]
    assert (ip.src, ip.dst, ip.ttl) == (inner_src, inner_dst, ttl)
    assert bytes(ip) == inner
    assert bytes(ip[UDP].payload) == payload
    # And our decoder accepts it back.
    assert vxlan.decode(datagram, vni=vni, mac=dst) == (vxlan.ETHERTYPE_IPV4, 22)


def test_encode_accepts_memoryview_and_bytearray() -> None:
    pre = vxlan.prefix(VNI, OUR_MAC, PEER_MAC)
    inner = inner_packet()
    assert vxlan.encode(pre, memoryview(inner)) == pre + inner
    assert vxlan.encode(pre, bytearray(inner)) == pre + inner


# -- scapy's frames decoded by us ----------------------------------------------------------


@FAST
@given(
    vni=vnis,
    dst=macs,
    src=macs,
    inner_dst=ipv4_addresses,
    payload=st.binary(max_size=200),
    port=st.sampled_from([vxlan.PORT, vxlan.IANA_PORT]),
)
def test_scapy_frame_is_accepted(
    vni: int, dst: bytes, src: bytes, inner_dst: str, payload: bytes, port: int
) -> None:
    inner = IP(src="10.244.1.2", dst=inner_dst) / ICMP(type=8) / payload
    built = (
        VXLAN(vni=vni, flags=0x08)
        / Ether(dst=vxlan.format_mac(dst), src=vxlan.format_mac(src))
        / inner
    )
    outer = Ether() / IP() / UDP(sport=40000, dport=port) / built
    datagram = bytes(Ether(bytes(outer))[UDP].payload)
    assert datagram == bytes(built)
    for view in (datagram, bytearray(datagram), memoryview(datagram)):
        ethertype, offset = vxlan.decode(view, vni=vni, mac=dst)
        assert (ethertype, offset) == (vxlan.ETHERTYPE_IPV4, vxlan.PREFIX_LEN)
        assert bytes(view[offset:]) == bytes(inner)


def test_scapy_default_vxlan_flags_are_accepted() -> None:
    # scapy's VXLAN()/Ether() sets flags 0x0C (I + GPE's P bit); the reserved bit is ignored.
    built = VXLAN(vni=VNI) / Ether(dst=vxlan.format_mac(OUR_MAC)) / IP() / ICMP()
    raw = bytes(built)
    assert raw[0] == 0x0C
    assert vxlan.decode(raw, vni=VNI, mac=OUR_MAC) == (vxlan.ETHERTYPE_IPV4, 22)


def test_reserved_bits_are_ignored() -> None:
    # RFC 7348 section 5: reserved fields MUST be ignored by the receiver.
    raw = bytearray(frame())
    raw[0] = 0xFF
    raw[1:4] = b"\xaa\xbb\xcc"
    raw[7] = 0x55
    assert vxlan.decode(raw, vni=VNI, mac=OUR_MAC) == (vxlan.ETHERTYPE_IPV4, 22)


# -- malformed frames ----------------------------------------------------------------------


def test_wrong_vni() -> None:
    assert reason_of(frame(vni=2)) == "wrong_vni"
    assert reason_of(frame(vni=VNI | 1 << 16)) == "wrong_vni"
    assert reason_of(frame(vni=0)) == "wrong_vni"
    assert vxlan.decode(frame(vni=0), vni=0, mac=OUR_MAC)[0] == vxlan.ETHERTYPE_IPV4


@pytest.mark.parametrize("size", [0, 1, 8, 21, 22, 30, 41])
def test_truncated(size: int) -> None:
    assert reason_of(frame()[:size]) == "truncated"
    assert reason_of(memoryview(frame())[:size]) == "truncated"


def test_truncated_only_counts_ipv4_payload_for_ipv4() -> None:
    # A bare 22-byte ARP frame has passed the VXLAN checks; arp.parse judges the rest.
    short_arp = frame(b"", dst=vxlan.BROADCAST, ethertype=vxlan.ETHERTYPE_ARP)
    assert vxlan.decode(short_arp, vni=VNI, mac=OUR_MAC) == (vxlan.ETHERTYPE_ARP, 22)
    # The smallest IPv4 frame: a bare 20-byte header.
    bare = bytes(IP(src="10.244.1.2", dst="10.244.2.3"))
    assert len(bare) == 20
    assert vxlan.decode(frame(bare), vni=VNI, mac=OUR_MAC)[0] == vxlan.ETHERTYPE_IPV4


@pytest.mark.parametrize("ethertype", [0x86DD, 0x8100, 0x88CC, 0x0000, 0xFFFF, 0x0801])
def test_bad_ethertype(ethertype: int) -> None:
    assert reason_of(frame(ethertype=ethertype)) == "bad_ethertype"


def test_real_ipv6_inner_frame_is_bad_ethertype() -> None:
    built = (
        VXLAN(vni=VNI, flags=0x08)
        / Ether(dst=vxlan.format_mac(OUR_MAC), src=vxlan.format_mac(PEER_MAC))
        / IPv6(src="fc00::1", dst="fc00::2")
        / UDP()
    )
    assert reason_of(bytes(built)) == "bad_ethertype"


def test_foreign_mac() -> None:
    assert reason_of(frame(dst=PEER_MAC)) == "foreign_mac"
    flipped = bytes([OUR_MAC[0] ^ 1]) + OUR_MAC[1:]
    assert reason_of(frame(dst=flipped)) == "foreign_mac"
    # Broadcast is only for ARP: an IPv4 packet to ff:ff:.. is not for our VTEP.
    assert reason_of(frame(dst=vxlan.BROADCAST)) == "foreign_mac"
    assert reason_of(frame(dst=PEER_MAC, ethertype=vxlan.ETHERTYPE_ARP)) == "foreign_mac"


def test_arp_accepts_our_mac_and_broadcast() -> None:
    payload = arp.build(arp.REQUEST, PEER_MAC, b"\x0a\xf4\x02\x00", b"\0" * 6, b"\x0a\xf4\x01\x00")
    for dst in (OUR_MAC, vxlan.BROADCAST):
        datagram = frame(payload, dst=dst, ethertype=vxlan.ETHERTYPE_ARP)
        assert vxlan.decode(datagram, vni=VNI, mac=OUR_MAC) == (vxlan.ETHERTYPE_ARP, 22)


def test_missing_i_flag() -> None:
    raw = bytearray(frame())
    raw[0] = 0x00
    assert reason_of(raw) == "bad_flags"
    raw[0] = 0xF7  # every flag bit but I
    assert reason_of(raw) == "bad_flags"
    gpe_without_i = bytes(
        VXLAN(vni=VNI, flags=0x04) / Ether(dst=vxlan.format_mac(OUR_MAC)) / IP() / ICMP()
    )
    assert reason_of(gpe_without_i) == "bad_flags"


def test_checks_run_in_the_documented_order() -> None:
    # Everything wrong at once reports the first check; fixing each reveals the next.
    raw = bytearray(frame(vni=9, dst=PEER_MAC, ethertype=0x86DD))
    raw[0] = 0
    assert reason_of(raw[:21]) == "truncated"
    assert reason_of(raw) == "bad_flags"
    raw[0] = vxlan.FLAG_I
    assert reason_of(raw) == "wrong_vni"
    raw[4:7] = VNI.to_bytes(3, "big")
    assert reason_of(raw) == "bad_ethertype"
    raw[20:22] = b"\x08\x00"
    assert reason_of(raw) == "foreign_mac"
    raw[8:14] = OUR_MAC
    assert vxlan.decode(raw, vni=VNI, mac=OUR_MAC) == (vxlan.ETHERTYPE_IPV4, 22)
    # A short IPv4 frame is truncated before anything else is looked at.
    short = bytearray(frame(b"\x45" * 19, vni=9))
    short[0] = 0
    assert reason_of(short) == "truncated"


# -- robustness ----------------------------------------------------------------------------


def _only_codec_errors(data: bytes | bytearray | memoryview) -> None:
    try:
        ethertype, offset = vxlan.decode(data, vni=VNI, mac=OUR_MAC)
    except CodecError as e:
        assert e.reason in DECODE_REASONS, e.reason
        return
    # Whatever is accepted is self-consistent.
    assert offset == vxlan.PREFIX_LEN
    assert data[0] & vxlan.FLAG_I
    assert int.from_bytes(data[4:7], "big") == VNI
    assert int.from_bytes(data[20:22], "big") == ethertype
    if ethertype == vxlan.ETHERTYPE_IPV4:
        assert bytes(data[8:14]) == OUR_MAC
        assert len(data) >= offset + 20
    else:
        assert ethertype == vxlan.ETHERTYPE_ARP
        assert bytes(data[8:14]) in (OUR_MAC, vxlan.BROADCAST)
        try:
            arp.parse(data[offset:])
        except CodecError as e:
            assert e.reason in ARP_REASONS, e.reason


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
@example(b"")
@example(b"\x08" + b"\x00" * 21)
def test_random_bytes_only_raise_codec_error(data: bytes) -> None:
    _only_codec_errors(data)
    _only_codec_errors(memoryview(data))
    try:
        arp.parse(data)
    except CodecError as e:
        assert e.reason in ARP_REASONS, e.reason


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        raw = bytearray(frame(inner_packet(payload=draw(st.binary(max_size=40)))))
    else:
        payload = arp.build(arp.REQUEST, PEER_MAC, bytes(4), bytes(6), bytes(4))
        raw = bytearray(frame(payload, dst=vxlan.BROADCAST, ethertype=vxlan.ETHERTYPE_ARP))
    return mutate(draw, raw, max_edits=4, hot=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_frames())
def test_mutated_frames_only_raise_codec_error(data: bytes) -> None:
    _only_codec_errors(data)
    _only_codec_errors(bytearray(data))


# -- vtep_mac and MAC text -----------------------------------------------------------------


def test_vtep_mac_is_stable_and_well_formed() -> None:
    mac = vxlan.vtep_mac("192.168.64.3", 1)
    assert mac == vxlan.vtep_mac("192.168.64.3", 1)
    assert len(mac) == 6
    assert mac[0] & 0x02 and not mac[0] & 0x01
    assert mac != vxlan.vtep_mac("192.168.64.4", 1)
    assert mac != vxlan.vtep_mac("192.168.64.3", 2)


def test_vtep_mac_is_pinned() -> None:
    # A changed derivation would change every node's published VtepMAC on upgrade.
    assert vxlan.format_mac(vxlan.vtep_mac("192.168.64.3", 1)) == "a2:a1:dd:cf:a6:fd"


@FAST
@given(a=ipv4_addresses, b=ipv4_addresses, vni=vnis)
def test_vtep_mac_properties(a: str, b: str, vni: int) -> None:
    mac = vxlan.vtep_mac(a, vni)
    assert len(mac) == 6
    assert mac[0] & 0x02, "locally administered"
    assert not mac[0] & 0x01, "unicast"
    assert mac == vxlan.vtep_mac(a, vni)
    if a != b:
        assert mac != vxlan.vtep_mac(b, vni)
    assert vxlan.parse_mac(vxlan.format_mac(mac)) == mac


def test_vtep_mac_normalises_the_address_and_rejects_garbage() -> None:
    assert vxlan.vtep_mac("fd00::1", 1) == vxlan.vtep_mac("fd00:0:0::0001", 1)
    assert vxlan.vtep_mac("fd00::1", 1) != vxlan.vtep_mac("fd00::2", 1)
    for bad, reason in [("192.168.64", "bad_address"), ("", "bad_address"), ("x", "bad_address")]:
        with pytest.raises(CodecError) as info:
            vxlan.vtep_mac(bad, 1)
        assert info.value.reason == reason
    with pytest.raises(CodecError) as info:
        vxlan.vtep_mac("192.168.64.3", 1 << 24)
    assert info.value.reason == "bad_vni"


@FAST
@given(macs)
def test_mac_text_round_trip(mac: bytes) -> None:
    text = vxlan.format_mac(mac)
    assert text == ":".join(f"{b:02x}" for b in mac)
    assert text == Ether(src=text).src  # scapy's own spelling
    assert vxlan.parse_mac(text) == mac
    assert vxlan.parse_mac(text.upper()) == mac


def test_format_mac_example() -> None:
    assert vxlan.format_mac(bytes.fromhex("c6d2326f8f44")) == "c6:d2:32:6f:8f:44"
    assert vxlan.parse_mac("C6:D2:32:6F:8F:44") == bytes.fromhex("c6d2326f8f44")
    with pytest.raises(CodecError) as info:
        vxlan.format_mac(b"\x00" * 5)
    assert info.value.reason == "bad_mac"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "c6:d2:32:6f:8f",
        "c6:d2:32:6f:8f:44:00",
        "c6-d2-32-6f-8f-44",
        "c6d2.326f.8f44",
        "c6d2326f8f44",
        "c6:d2:32:6f:8f:4",
        "c6:d2:32:6f:8f:4g",
        " c6:d2:32:6f:8f:44",
        "c6:d2:32:6f:8f:44\n",
        "c6:d2:32:6f:8f: 4",
        "c6:d2:32:6f:8f:٤٤",  # Arabic-Indic digits are not hex
    ],
)
def test_parse_mac_rejects(text: str) -> None:
    with pytest.raises(CodecError) as info:
        vxlan.parse_mac(text)
    assert info.value.reason == "bad_mac"


# -- ARP -----------------------------------------------------------------------------------


@FAST
@given(
    op=st.sampled_from([1, 2]),
    hwsrc=macs,
    psrc=ipv4_addresses,
    hwdst=macs,
    pdst=ipv4_addresses,
    padding=st.binary(max_size=18),
)
def test_scapy_arp_parses(
    op: int, hwsrc: bytes, psrc: str, hwdst: bytes, pdst: str, padding: bytes
) -> None:
    fmt = vxlan.format_mac
    raw = bytes(ARP(op=op, hwsrc=fmt(hwsrc), psrc=psrc, hwdst=fmt(hwdst), pdst=pdst))
    assert len(raw) == 28
    expected = arp.ArpPacket(op, hwsrc, ip_bytes(psrc), hwdst, ip_bytes(pdst))
    assert arp.parse(raw) == expected
    assert arp.parse(memoryview(raw + padding)) == expected  # Ethernet padding is ignored
    assert arp.build(op, hwsrc, ip_bytes(psrc), hwdst, ip_bytes(pdst)) == raw


def test_arp_request_over_vxlan_gets_a_reply_scapy_understands() -> None:
    # What a kernel VXLAN peer without a static neigh entry broadcasts for our VTEP address.
    request = (
        VXLAN(vni=VNI, flags=0x08)
        / Ether(dst="ff:ff:ff:ff:ff:ff", src=vxlan.format_mac(PEER_MAC))
        / ARP(op="who-has", hwsrc=vxlan.format_mac(PEER_MAC), psrc="10.244.2.0", pdst="10.244.1.0")
    )
    datagram = bytes(request)
    ethertype, offset = vxlan.decode(datagram, vni=VNI, mac=OUR_MAC)
    assert ethertype == vxlan.ETHERTYPE_ARP
    asked = arp.parse(datagram[offset:])
    assert asked.operation == arp.REQUEST
    assert asked.target_ip == ip_bytes("10.244.1.0")

    answer = arp.reply(asked, OUR_MAC)
    assert len(answer) == 28
    out = vxlan.encode(vxlan.prefix(VNI, asked.sender_mac, OUR_MAC, vxlan.ETHERTYPE_ARP), answer)
    theirs = VXLAN(out)
    assert int(theirs.flags) == 0x08 and theirs.vni == VNI
    eth = theirs[Ether]
    assert (eth.dst, eth.src, eth.type) == (
        vxlan.format_mac(PEER_MAC),
        vxlan.format_mac(OUR_MAC),
        0x0806,
    )
    reply = eth[ARP]
    assert reply.op == 2  # is-at
    assert (reply.hwtype, reply.ptype, reply.hwlen, reply.plen) == (1, 0x0800, 6, 4)
    assert (reply.hwsrc, reply.psrc) == (vxlan.format_mac(OUR_MAC), "10.244.1.0")
    assert (reply.hwdst, reply.pdst) == (vxlan.format_mac(PEER_MAC), "10.244.2.0")
    assert reply.answers(request[ARP])
    # And the peer, seeing it addressed to its own VTEP MAC, accepts it.
    assert vxlan.decode(out, vni=VNI, mac=PEER_MAC) == (vxlan.ETHERTYPE_ARP, 22)
    assert arp.parse(out[22:]) == arp.ArpPacket(
        2, OUR_MAC, ip_bytes("10.244.1.0"), PEER_MAC, ip_bytes("10.244.2.0")
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "truncated"),
        (bytes(ARP())[:5], "truncated"),
        (bytes(ARP())[:27], "truncated"),
        (bytes(ARP(hwtype=6)), "not_ethernet_ipv4"),
        (bytes(ARP(ptype=0x86DD)), "not_ethernet_ipv4"),
        (bytes(ARP(hwlen=8)), "not_ethernet_ipv4"),
        (bytes(ARP(plen=16)), "not_ethernet_ipv4"),
        # An IPv6-sized ARP (plen 16) is not ours even though its header is short.
        (bytes(ARP(plen=16))[:10], "not_ethernet_ipv4"),
    ],
    ids=["empty", "5-bytes", "27-bytes", "ieee802", "ipv6", "hwlen-8", "plen-16", "plen-16-short"],
)
def test_arp_parse_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(CodecError) as info:
        arp.parse(raw)
    assert info.value.reason == reason


def test_arp_build_rejects_bad_lengths() -> None:
    cases = [
        ((1, OUR_MAC[:5], bytes(4), bytes(6), bytes(4)), "bad_mac"),
        ((1, OUR_MAC, bytes(4), bytes(7), bytes(4)), "bad_mac"),
        ((1, OUR_MAC, bytes(3), bytes(6), bytes(4)), "bad_address"),
        ((1, OUR_MAC, bytes(4), bytes(6), bytes(16)), "bad_address"),
        ((0x10000, OUR_MAC, bytes(4), bytes(6), bytes(4)), "bad_operation"),
    ]
    for args, reason in cases:
        with pytest.raises(CodecError) as info:
            arp.build(*args)
        assert info.value.reason == reason


# -- tshark as a second, independent decoder -----------------------------------------------


def test_tshark_decodes_our_frame(tmp_path: Path) -> None:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed (apt-get install tshark)")
    inner = bytes(IP(src="10.244.1.2", dst="10.244.2.3") / ICMP(type=8, id=1, seq=1) / b"ping")
    datagram = vxlan.encode(vxlan.prefix(0x1234, PEER_MAC, OUR_MAC), inner)
    outer = (
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="192.168.64.3", dst="192.168.64.4")
        / UDP(sport=40000, dport=vxlan.PORT)
        / Raw(datagram)
    )
    pcap = tmp_path / "vxlan.pcap"
    wrpcap(str(pcap), [outer])
    # tshark 4.0 only dissects 4789 as VXLAN by default; 8472 needs the decode-as.
    result = subprocess.run(
        [
            tshark,
            "-r",
            str(pcap),
            "-d",
            f"udp.port=={vxlan.PORT},vxlan",
            "-T",
            "fields",
            "-E",
            "separator=/t",
            "-e",
            "vxlan.vni",
            "-e",
            "vxlan.flag_i",
            "-e",
            "eth.dst",
            "-e",
            "eth.src",
            "-e",
            "ip.dst",
            "-e",
            "icmp.type",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    vni, flag_i, eth_dst, eth_src, ip_dst, icmp_type = lines[0].split("\t")
    assert int(vni) == 0x1234
    assert flag_i in ("1", "True")
    # Repeated fields come outer first, then inner, comma-separated.
    assert eth_dst.split(",") == ["02:00:00:00:00:02", vxlan.format_mac(PEER_MAC)]
    assert eth_src.split(",") == ["02:00:00:00:00:01", vxlan.format_mac(OUR_MAC)]
    assert ip_dst.split(",") == ["192.168.64.4", "10.244.2.3"]
    assert icmp_type == "8"
