"""`overlay trace`: capture what crosses a running daemon, as pcapng.

The client sends one request line on the status socket (``trace {"filter": ..., "count":
..., "snaplen": ...}``); the daemon attaches a :class:`Tracer` (an ``overlay.observe.tap.Tap``)
to its dataplane and streams pcapng back until the count is reached or the client goes
away, then detaches it: with no trace attached the dataplane pays nothing.

Two capture points, two pcapng interfaces, both raw IP (IPv4 and IPv6 alike):

- interface 0, the TUN (``flannel0``): inner packets as read from it (outbound, towards a
  peer) and as written into it (inbound), IPv4 and, with vxlan's IPv6 half, IPv6;
- interface 1, the underlay sockets: each UDP datagram with IP and UDP headers
  synthesized from the addresses and ports (``encap.pcapng.udp_headers``, or
  ``udp6_headers`` for a datagram of the IPv6 socket), so tshark decodes flannel's udp
  with ``-d udp.port==8285,ip`` and VXLAN with ``-d udp.port==8472,vxlan``.

A dropped packet is captured where it was dropped (a datagram we received on interface 1,
a packet read from the TUN on interface 0) with ``dropped: <reason>`` as its packet
comment. With ``--workers N`` every worker traces its own queue and sends its captures to
the main process, which merges them into the one stream.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, NamedTuple

from control.peer_table import Peer, PeerTable
from encap import ipv6 as ipv6_codec
from encap import pcapng
from overlay.observe import trace_filter
from overlay.observe.tap import Buffer, Direction, Tap

DEFAULT_SNAPLEN = 262144  # tcpdump's
MAX_SNAPLEN = 262144
INNER, OUTER = 0, 1
# Bytes of pcapng a slow reader may leave unread before captures are missed (counted).
STREAM_BACKLOG = 8 * 1024 * 1024
VXLAN_HEADROOM = 22  # VXLAN header + inner Ethernet header
INNER_ETHERTYPES = (b"\x08\x00", b"\x86\xdd")  # the inner Ethernet types: IPv4, IPv6


@dataclass(frozen=True)
class TraceRequest:
    filter: str
    count: int  # 0: until the client goes away
    snaplen: int

    def to_json(self) -> dict[str, Any]:
        return {"filter": self.filter, "count": self.count, "snaplen": self.snaplen}

    @classmethod
    def parse(cls, request: Any) -> TraceRequest:
        """Validate a request from the socket (a JSON object); ValueError says what is bad."""
        if not isinstance(request, dict):
            raise ValueError("a trace request is a JSON object")
        text = request.get("filter", "")
        count = request.get("count", 0)
        snaplen = request.get("snaplen", DEFAULT_SNAPLEN)
        if not isinstance(text, str):
            raise ValueError("filter must be a string")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count {count!r} must be a whole number >= 0")
        if isinstance(snaplen, bool) or not isinstance(snaplen, int):
            raise ValueError(f"snap length {snaplen!r} must be a whole number")
        if not 1 <= snaplen <= MAX_SNAPLEN:
            raise ValueError(f"snap length {snaplen} must be 1 to {MAX_SNAPLEN}")
        trace_filter.parse(text)  # FilterError (a ValueError) names the bad word
        return cls(text, count, snaplen)


class Capture(NamedTuple):
    """One captured packet, already cut to the snap length."""

    interface: int  # INNER or OUTER
    direction: Direction  # tx: away from our pods, rx: towards them
    timestamp_ns: int
    data: bytes
    length: int  # before the snap length
    comment: str | None

    def to_json(self) -> list[Any]:
        data = base64.b64encode(self.data).decode()
        return [self.interface, self.direction, self.timestamp_ns, data, self.length, self.comment]

    @classmethod
    def from_json(cls, value: list[Any]) -> Capture:
        interface, direction, timestamp_ns, data, length, comment = value
        return cls(interface, direction, timestamp_ns, base64.b64decode(data), length, comment)


@dataclass(frozen=True)
class Endpoint:
    """What the tracer needs to know about the dataplane it is attached to."""

    address: str  # our underlay address (outer headers)
    port: int  # our UDP port
    headroom: int  # bytes before the inner packet in a datagram (vxlan: 22)
    address6: str | None = None  # our IPv6 underlay address (vxlan's IPv6 half), or None

    @classmethod
    def of(cls, sockets: list[socket.socket], headroom: int) -> Endpoint:
        """A dataplane's endpoint from its sockets (``sockets()``: the IPv4 one first; vxlan's
        IPv6 half receives on one of its own, whose address its outer headers carry), the
        same in the main process and in each ``--workers`` process."""
        address, port = sockets[0].getsockname()[:2]
        address6 = next((s.getsockname()[0] for s in sockets if s.family == socket.AF_INET6), None)
        return cls(address, port, headroom, address6)


class Tracer:
    """A Tap that selects packets with a filter and hands each one, cut to the snap
    length, to ``emit``."""

    def __init__(
        self,
        request: TraceRequest,
        emit: Callable[[Capture], None],
        endpoint: Endpoint,
        peers: PeerTable | None,
    ) -> None:
        self.select = trace_filter.parse(request.filter)
        self.snaplen = request.snaplen
        self.emit = emit
        self.endpoint = endpoint
        self._local = ip_address(endpoint.address).packed
        self._local6 = ip_address(endpoint.address6).packed if endpoint.address6 else bytes(16)
        self.peers = peers
        self._ips: dict[str, int] = {}

    # -- Tap -----------------------------------------------------------------------------

    def inner(self, direction: Direction, packet: Buffer) -> None:
        record = trace_filter.Record("inner", direction, None)
        trace_filter.inner_fields(record, packet)
        if self.peers is not None:
            self._peer(record, self._inner_peer(direction, packet))
        if self.select(record):
            self._emit(INNER, direction, packet, len(packet), None)

    def outer(self, direction: Direction, datagram: Buffer, peer: tuple[str, int]) -> None:
        record = trace_filter.Record("outer", direction, None)
        self._outer_fields(record, datagram, peer)
        if self.select(record):
            self._emit(OUTER, direction, *self._with_headers(direction, datagram, peer), None)

    def drop(self, reason: str, data: Buffer, peer: tuple[str, int] | None) -> None:
        direction: Direction = "rx" if reason.startswith("rx_") else "tx"
        comment = f"dropped: {reason}"
        if direction == "rx" and peer is not None:
            record = trace_filter.Record("outer", direction, reason)
            self._outer_fields(record, data, peer)
            if self.select(record):
                self._emit(OUTER, direction, *self._with_headers(direction, data, peer), comment)
            return
        record = trace_filter.Record("inner", direction, reason)
        trace_filter.inner_fields(record, data)
        if peer is not None and self.peers is not None:
            self._peer(record, self._sender(peer[0]), peer[0])
        elif self.peers is not None:
            self._peer(record, self._inner_peer("tx", data))
        if self.select(record):
            self._emit(INNER, direction, data, len(data), comment)

    # -- helpers -------------------------------------------------------------------------

    def _ip(self, text: str) -> int:
        """A public address (either family) as the filter's records hold it."""
        value = self._ips.get(text)
        if value is None:
            if len(self._ips) > 4096:  # strangers sending from many addresses
                self._ips.clear()
            value = self._ips[text] = trace_filter.address_key(text)
        return value

    def _inner_peer(self, direction: Direction, packet: Buffer) -> Peer | None:
        """The peer on the far side of an inner packet: the owner of its destination
        (``tx``) or source (``rx``), by the packet's family; None for neither."""
        assert self.peers is not None
        version = packet[0] >> 4 if packet else 0
        if version == 4 and len(packet) >= 20:
            return self.peers.lookup(packet[16:20] if direction == "tx" else packet[12:16])
        if version == 6 and len(packet) >= 40:
            return self.peers.lookup6(packet[24:40] if direction == "tx" else packet[8:24])
        return None

    def _sender(self, ip: str) -> Peer | None:
        """The peer sending from public address ``ip`` (IPv6: its PublicIPv6)."""
        assert self.peers is not None
        return self.peers.by_public_ipv6(ip) if ":" in ip else self.peers.by_public_ip(ip)

    def _peer(self, record: trace_filter.Record, peer: Peer | None, ip: str | None = None) -> None:
        if peer is not None:
            record.peer_ip = self._ip(peer.addr[0])
            v6 = ":" in peer.addr[0]
            record.peer_net = peer.lease.ipv6_subnet if v6 else peer.lease.subnet
        elif ip is not None:
            record.peer_ip = self._ip(ip)

    def _outer_fields(
        self, record: trace_filter.Record, datagram: Buffer, peer: tuple[str, int]
    ) -> None:
        headroom = self.endpoint.headroom
        if not headroom:
            trace_filter.inner_fields(record, datagram)
        elif len(datagram) >= headroom and bytes(datagram[20:22]) in INNER_ETHERTYPES:
            trace_filter.inner_fields(record, datagram[headroom:])
        found = self._sender(peer[0]) if self.peers is not None else None
        self._peer(record, found, peer[0])

    def _with_headers(
        self, direction: Direction, datagram: Buffer, peer: tuple[str, int]
    ) -> tuple[bytes, int]:
        """The datagram behind synthesized IP/UDP headers (IPv6 ones for a datagram of the
        IPv6 socket), cut to the snap length, and its length on the wire."""
        key, port = self._ip(peer[0]), self.endpoint.port
        v6 = bool(key & trace_filter.V6)
        remote = (key ^ trace_filter.V6).to_bytes(16, "big") if v6 else key.to_bytes(4, "big")
        local = self._local6 if v6 else self._local
        src, dst = ((local, port), (remote, peer[1]))[:: 1 if direction == "tx" else -1]
        if v6:
            headers = pcapng.udp6_headers(*src, *dst, datagram)
        else:
            headers = pcapng.udp_headers(*src, *dst, len(datagram))
        kept = headers + bytes(datagram[: max(self.snaplen - len(headers), 0)])
        return kept, len(headers) + len(datagram)

    def _emit(
        self, interface: int, direction: Direction, data: Buffer, length: int, comment: str | None
    ) -> None:
        kept = bytes(data[: self.snaplen])
        self.emit(Capture(interface, direction, time.time_ns(), kept, length, comment))


class _Fanout:
    """Several tracers on one dataplane (two `overlay trace` at once)."""

    def __init__(self, taps: list[Tap]) -> None:
        self.taps = taps

    def inner(self, direction: Direction, packet: Buffer) -> None:
        for tap in self.taps:
            tap.inner(direction, packet)

    def outer(self, direction: Direction, datagram: Buffer, peer: tuple[str, int]) -> None:
        for tap in self.taps:
            tap.outer(direction, datagram, peer)

    def drop(self, reason: str, data: Buffer, peer: tuple[str, int] | None) -> None:
        for tap in self.taps:
            tap.drop(reason, data, peer)


class TapSet:
    """The tracers attached to one dataplane (``set_tap``: its IPv6 half too):
    ``dataplane.tap`` is None without any."""

    def __init__(self, dataplane: Any) -> None:
        self.dataplane = dataplane
        self.taps: list[Tap] = []

    def add(self, tap: Tap) -> None:
        self.taps.append(tap)
        self._apply()

    def remove(self, tap: Tap) -> None:
        if tap in self.taps:
            self.taps.remove(tap)
        self._apply()

    def _apply(self) -> None:
        if not self.taps:
            self.dataplane.set_tap(None)
        elif len(self.taps) == 1:
            self.dataplane.set_tap(self.taps[0])
        else:
            self.dataplane.set_tap(_Fanout(list(self.taps)))


class PcapngStream:
    """The daemon's end of one trace: pcapng blocks to the client, at most ``count``
    packets, captures missed (counted) while the client reads too slowly."""

    def __init__(
        self, writer: asyncio.StreamWriter, request: TraceRequest, tun: str, underlay: str
    ) -> None:
        self.writer = writer
        self.count = request.count
        self.started = time.time_ns()
        self.captured = [0, 0]
        self.missed = [0, 0]
        self.done = asyncio.Event()
        writer.write(
            pcapng.section_header(application="overlay trace", os=os.uname().sysname)
            + pcapng.interface_description(
                snaplen=request.snaplen, name=tun, description="inner packets (the TUN side)"
            )
            + pcapng.interface_description(
                snaplen=request.snaplen,
                name=underlay,
                description="outer datagrams (IPv4/UDP headers synthesized)",
            )
        )

    def emit(self, capture: Capture) -> None:
        if self.done.is_set():
            return
        transport = self.writer.transport
        if transport.is_closing() or transport.get_write_buffer_size() > STREAM_BACKLOG:
            self.missed[capture.interface] += 1
            return
        self.writer.write(
            pcapng.enhanced_packet(
                capture.interface,
                capture.timestamp_ns,
                capture.data,
                original_length=capture.length,
                comment=capture.comment,
                direction="out" if capture.direction == "tx" else "in",
            )
        )
        self.captured[capture.interface] += 1
        if self.count and sum(self.captured) >= self.count:
            self.done.set()

    def close(self) -> None:
        """The statistics blocks (packets kept and missed per interface), then EOF."""
        if self.writer.transport.is_closing():
            return
        now = time.time_ns()
        for interface in (INNER, OUTER):
            self.writer.write(
                pcapng.interface_statistics(
                    interface,
                    now,
                    received=self.captured[interface] + self.missed[interface],
                    dropped=self.missed[interface],
                    start_ns=self.started,
                )
            )


def outer_name(underlay: str, port: int) -> str:
    return f"{underlay}:udp/{port}"


class Captures:
    """Every capture attached to a daemon's dataplanes: its own (``TapSet``) and, with
    ``--workers``, each worker's (which send their captures back to be merged)."""

    def __init__(
        self, dataplane: Any, endpoint: Endpoint, peers: PeerTable, workers: Any = None
    ) -> None:
        self.taps = TapSet(dataplane)
        self.endpoint = endpoint
        self.peers = peers
        self.workers = workers  # overlay.dataplane.worker.Workers, or None
        self._tracers: dict[int, Tracer] = {}
        self._next = 1

    def start(self, request: TraceRequest, emit: Callable[[Capture], None]) -> int:
        handle = self._next
        self._next += 1
        tracer = Tracer(request, emit, self.endpoint, self.peers)
        self._tracers[handle] = tracer
        self.taps.add(tracer)
        if self.workers is not None:
            self.workers.start_trace(handle, request, emit)
        return handle

    def stop(self, handle: int) -> None:
        tracer = self._tracers.pop(handle, None)
        if tracer is not None:
            self.taps.remove(tracer)
        if self.workers is not None:
            self.workers.stop_trace(handle)


def dotted(raw: bytes) -> str:
    """An address's text from its 4 (IPv4) or 16 (IPv6) bytes."""
    return str(ip_address(bytes(raw)))


def outer_parts(data: bytes) -> tuple[str, int, str, int, bytes] | None:
    """(source, source port, destination, destination port, UDP payload) of an outer
    capture behind the IPv4 or IPv6 headers ``Tracer`` synthesizes; None when too short."""
    header = 40 if data[:1] and data[0] >> 4 == 6 else 20
    if len(data) < header + 8:
        return None
    at = 8 if header == 40 else 12
    size = 16 if header == 40 else 4
    src, dst = dotted(data[at : at + size]), dotted(data[at + size : at + 2 * size])
    udp = data[header : header + 8]
    sport, dport = int.from_bytes(udp[0:2], "big"), int.from_bytes(udp[2:4], "big")
    return src, sport, dst, dport, data[header + 8 :]


def vxlan_inner(payload: bytes) -> bytes | None:
    """The inner packet of a VXLAN payload (I flag, Ethernet type IPv4 or IPv6), else
    None."""
    if len(payload) >= VXLAN_HEADROOM + 20 and payload[0] & 0x08:
        if payload[20:22] in INNER_ETHERTYPES:
            return payload[VXLAN_HEADROOM:]
    return None


ICMP_KINDS = {0: "echo reply", 3: "unreachable", 8: "echo request", 11: "time exceeded"}
ICMP6_KINDS = {
    1: "destination unreachable",
    2: "packet too big",
    128: "echo request",
    129: "echo reply",
    135: "neighbor solicitation",
    136: "neighbor advertisement",
}


def describe(packet: bytes) -> str:
    """One packet as tcpdump's line would say it (addresses, ports, protocol)."""
    record = trace_filter.Record("inner", "tx", None)
    trace_filter.inner_fields(record, packet)
    if record.version == 6:
        family, src, dst = "IP6", dotted(packet[8:24]), dotted(packet[24:40])
        icmp, kinds = (58, "ICMP6"), ICMP6_KINDS
    elif record.version == 4:
        family, src, dst = "IP", dotted(packet[12:16]), dotted(packet[16:20])
        icmp, kinds = (1, "ICMP"), ICMP_KINDS
    else:
        return f"not IP ({len(packet)} bytes)"
    names = {6: "TCP", 17: "UDP", icmp[0]: icmp[1]}
    proto = record.proto
    name = names.get(proto, f"proto {proto}") if proto is not None else "unknown protocol"
    if record.sport is not None:
        return f"{family} {src}.{record.sport} > {dst}.{record.dport}: {name}"
    if proto == icmp[0]:
        kind = _icmp_type(packet, record.version)
        if kind is not None:
            return f"{family} {src} > {dst}: {name} {kinds.get(kind, f'type {kind}')}"
    return f"{family} {src} > {dst}: {name}"


def _icmp_type(packet: bytes, version: int) -> int | None:
    """The ICMP (ICMPv6) message type of the packet, None when it is not in the capture."""
    if version == 4:
        at = (packet[0] & 0x0F) * 4
    else:
        walked = ipv6_codec.upper_layer(packet, 0, len(packet))
        if isinstance(walked, str):
            return None
        at = walked[1]
    return packet[at] if len(packet) > at else None
