"""The filter language of `overlay trace`: a few of tcpdump's words, not BPF.

An expression selects captured packets; words combine with ``and``/``&&``, ``or``/``||``,
``not``/``!`` and parentheses (``not`` binds tightest, then ``and``, then ``or``); two
words side by side mean ``and`` (``outer icmp``)::

    host ADDR          the inner packet's source or destination is ADDR (IPv4 or IPv6)
    src ADDR           ... its source (also ``src host ADDR``)
    dst ADDR           ... its destination (also ``dst host ADDR``)
    net CIDR           source or destination inside CIDR (``src net``, ``dst net``)
    ip | ip6           the inner packet is IPv4, IPv6
    icmp | icmp6       the inner packet's protocol: ICMP (1), ICMPv6 (58),
    tcp | udp          TCP, UDP (either family; ``proto N`` for any other: for IPv6 the
                       protocol after the extension headers)
    port N             inner TCP/UDP source or destination port (``src port``, ``dst port``)
    peer ADDR|CIDR     the node on the other side: its public IP (PublicIP or PublicIPv6),
                       or (a part of) its subnet (IPv4 or IPv6)
    inner | outer      where it was captured: the TUN side, or the UDP datagram
    in | out           towards this node's pods (rx), or away from them (tx)
    drop               only packets the dataplane dropped
    reason NAME        dropped with this reason (a ``*`` matches any run of characters)

Addresses are compared as integers: an IPv4 address as it is, an IPv6 one with bit 128
set (``V6``), so that the two families never match each other (``::a00:1`` is not
``10.0.0.1``). The empty expression selects everything. ``parse`` raises FilterError with a one-line
message naming the offending word.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from encap import ipv6

PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17}
PROTO_ICMPV6 = ipv6.PROTO_ICMPV6
V6 = 1 << 128  # the tag of an IPv6 address as an integer (see the module's docstring)
Network = IPv4Network | IPv6Network
_TOKEN = re.compile(r"\s*(\(|\)|&&|\|\||!|[^\s()!&|]+)")


class FilterError(ValueError):
    """A filter expression that does not parse; the message says where and why."""


@dataclass(slots=True)
class Record:
    """What a filter looks at: one captured packet, with its inner IP fields."""

    point: str  # "inner" or "outer"
    direction: str  # "tx" (away from our pods) or "rx" (towards them)
    reason: str | None  # the drop reason, None when it was not dropped
    src: int | None = None  # inner addresses as ints (IPv6 tagged V6); None: no inner IP
    dst: int | None = None
    proto: int | None = None  # IPv6: the upper-layer protocol, past extension headers
    sport: int | None = None
    dport: int | None = None
    peer_ip: int | None = None  # the other node's public IP (IPv6 tagged V6)
    peer_net: Network | None = None  # its subnet (the lease that matched)
    version: int | None = None  # 4 or 6: the inner packet's IP version


Predicate = Callable[[Record], bool]


def inner_fields(record: Record, packet: bytes | bytearray | memoryview) -> None:
    """Fill the inner fields of ``record`` from an IPv4 or IPv6 ``packet`` (left None if
    it is neither, or too short for its header; ports only for an unfragmented or
    first-fragment TCP/UDP packet). Any bytes at all: a capture may be cut anywhere."""
    if len(packet) >= ipv6.HEADER_LEN and packet[0] >> 4 == 6:
        _inner6_fields(record, packet)
        return
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return
    record.version = 4
    record.src = int.from_bytes(packet[12:16], "big")
    record.dst = int.from_bytes(packet[16:20], "big")
    record.proto = proto = packet[9]
    header = (packet[0] & 0x0F) * 4
    first = not (packet[6] & 0x1F or packet[7])
    if proto in (6, 17) and first and len(packet) >= header + 4:
        record.sport = packet[header] << 8 | packet[header + 1]
        record.dport = packet[header + 2] << 8 | packet[header + 3]


def _inner6_fields(record: Record, packet: bytes | bytearray | memoryview) -> None:
    """``inner_fields`` of an IPv6 packet: the protocol after its extension headers
    (walked within the captured bytes; a broken chain leaves the protocol unknown), the
    ports of a TCP/UDP packet without a fragment or routing header (``encap.ipv6``'s
    walk tells no first fragment from a later one: no ports for either)."""
    record.version = 6
    record.src = V6 | int.from_bytes(packet[8:24], "big")
    record.dst = V6 | int.from_bytes(packet[24:40], "big")
    walked = ipv6.upper_layer(packet, 0, len(packet))
    if isinstance(walked, str):  # a drop reason: no protocol to read
        return
    record.proto, at, whole = walked
    if record.proto in (6, 17) and whole and len(packet) >= at + 4:
        record.sport = packet[at] << 8 | packet[at + 1]
        record.dport = packet[at + 2] << 8 | packet[at + 3]


def address_key(text: str) -> int:
    """An address (either family) as the integer the records hold; ValueError if bad."""
    address = ip_address(text)
    return int(address) | (V6 if address.version == 6 else 0)


def _address(word: str) -> int:
    try:
        return address_key(word)
    except ValueError:
        raise FilterError(f"{word!r} is not an IPv4 or IPv6 address") from None


def _network(word: str) -> Network:
    try:
        return ip_network(word, strict=False)
    except ValueError:
        raise FilterError(f"{word!r} is not an IPv4 or IPv6 network (CIDR)") from None


def _number(word: str, what: str, top: int) -> int:
    if not word.isdigit() or int(word) > top:
        raise FilterError(f"{word!r} is not a {what} (0-{top})")
    return int(word)


def _in(network: Network) -> Callable[[int | None], bool]:
    """Whether a record's address (as ``address_key`` makes it) lies in ``network``: the
    tag bit of IPv6 keeps the families apart."""
    base = address_key(str(network.network_address))
    shift = network.max_prefixlen - network.prefixlen
    return lambda a: a is not None and a >> shift == base >> shift


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[str] = []
        at = 0
        while at < len(text):
            match = _TOKEN.match(text, at)
            if match is None:
                if text[at:].strip():
                    raise FilterError(f"cannot read the filter from {text[at:].strip()!r}")
                break
            self.tokens.append(match.group(1))
            at = match.end()
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, what: str) -> str:
        word = self.peek()
        if word is None:
            raise FilterError(f"the filter ends where {what} was expected")
        self.at += 1
        return word

    def expression(self) -> Predicate:
        left = self.conjunction()
        while self.peek() in ("or", "||"):
            self.at += 1
            right = self.conjunction()
            left = (lambda a, b: lambda r: a(r) or b(r))(left, right)
        return left

    def conjunction(self) -> Predicate:
        left = self.negation()
        while (word := self.peek()) is not None and word not in ("or", "||", ")"):
            if word in ("and", "&&"):
                self.at += 1
            right = self.negation()
            left = (lambda a, b: lambda r: a(r) and b(r))(left, right)
        return left

    def negation(self) -> Predicate:
        if self.peek() in ("not", "!"):
            self.at += 1
            inner = self.negation()
            return lambda r: not inner(r)
        if self.peek() == "(":
            self.at += 1
            inner = self.expression()
            if self.take("')'") != ")":
                raise FilterError(f"expected ')' before {self.tokens[self.at - 1]!r}")
            return inner
        return self.primitive()

    def primitive(self) -> Predicate:
        word = self.take("a filter word")
        if word in ("src", "dst"):
            return self._directed(word)
        if word == "host":
            address = _address(self.take("an address after 'host'"))
            return lambda r: r.src == address or r.dst == address
        if word == "net":
            inside = _in(_network(self.take("a network after 'net'")))
            return lambda r: inside(r.src) or inside(r.dst)
        if word == "port":
            port = _number(self.take("a port after 'port'"), "port", 0xFFFF)
            return lambda r: r.sport == port or r.dport == port
        if word in PROTOCOLS:
            number = PROTOCOLS[word]
            return lambda r: r.proto == number
        if word == "icmp6":
            return lambda r: r.proto == PROTO_ICMPV6
        if word in ("ip", "ip6"):
            version = 4 if word == "ip" else 6
            return lambda r: r.version == version
        if word == "proto":
            number = _number(self.take("a protocol number after 'proto'"), "protocol", 255)
            return lambda r: r.proto == number
        if word == "peer":
            return self._peer(self.take("an address or network after 'peer'"))
        if word in ("inner", "outer"):
            return lambda r: r.point == word
        if word in ("in", "rx"):
            return lambda r: r.direction == "rx"
        if word in ("out", "tx"):
            return lambda r: r.direction == "tx"
        if word in ("drop", "dropped"):
            return lambda r: r.reason is not None
        if word == "reason":
            pattern = self.take("a drop reason after 'reason'")
            return lambda r: r.reason is not None and fnmatch.fnmatchcase(r.reason, pattern)
        raise FilterError(
            f"unknown filter word {word!r} (use host, src, dst, net, port, ip, ip6, icmp, "
            "icmp6, tcp, udp, proto, peer, inner, outer, in, out, drop, reason, and, or, not)"
        )

    def _directed(self, side: str) -> Predicate:
        word = self.take(f"host, net, port or an address after {side!r}")
        pick: Callable[[Record], int | None] = (
            (lambda r: r.src) if side == "src" else (lambda r: r.dst)
        )
        if word == "net":
            inside = _in(_network(self.take("a network after 'net'")))
            return lambda r: inside(pick(r))
        if word == "port":
            port = _number(self.take("a port after 'port'"), "port", 0xFFFF)
            if side == "src":
                return lambda r: r.sport == port
            return lambda r: r.dport == port
        if word == "host":
            word = self.take("an address after 'host'")
        address = _address(word)
        return lambda r: pick(r) == address

    def _peer(self, word: str) -> Predicate:
        if "/" in word:
            network = _network(word)
            inside = _in(network)
            return lambda r: (
                inside(r.peer_ip) or (r.peer_net is not None and r.peer_net.overlaps(network))
            )
        address = _address(word)
        host = ip_address(word)
        return lambda r: r.peer_ip == address or (r.peer_net is not None and host in r.peer_net)


def parse(text: str) -> Predicate:
    """The predicate for a filter expression (everything for an empty one)."""
    parser = _Parser(text)
    if not parser.tokens:
        return lambda r: True
    predicate = parser.expression()
    if parser.peek() is not None:
        raise FilterError(f"unexpected {parser.peek()!r} in the filter")
    return predicate
