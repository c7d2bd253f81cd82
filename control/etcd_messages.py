"""etcd v3's protobuf messages, the few the registry sends and reads, and gRPC's message
framing: pure functions over bytes.

Written by hand so that a daemon on etcd needs neither grpcio nor protobuf (their C core,
threads and heap were ~14 MiB of an idle daemon). Field numbers are etcd's
(etcdserverpb/rpc.proto, mvccpb/kv.proto, authpb); the tests check every message against
the generated protobuf classes. Decoding follows protobuf's rules where an answer could
differ: unknown fields are skipped, the last of a repeated scalar wins, repeated pieces of
one sub-message merge, a known field with another wire type is skipped. Every length is
checked before use: a truncated or malformed answer is a MalformedMessage (a
RegistryError), never an IndexError or a hang.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from control.kv import RegistryError

VARINT, I64, LEN, I32 = 0, 1, 2, 5
_U64 = 1 << 64


class MalformedMessage(RegistryError):
    """etcd's answer is not a well-formed message of the expected kind."""


# -- the wire format ----------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= _U64 - 1  # negative int64: two's complement in ten bytes, as protobuf
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise MalformedMessage("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & (_U64 - 1), pos
        shift += 7
        if shift >= 70:
            raise MalformedMessage("varint longer than ten bytes")


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(number, wire type, value) of each field in order; values of LEN fields as bytes,
    of the others as unsigned integers."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0 or number >= 1 << 29:
            raise MalformedMessage(f"field number {number} out of range")
        value: int | bytes
        if wire == VARINT:
            value, pos = _read_varint(data, pos)
        elif wire in (I64, I32):
            size = 8 if wire == I64 else 4
            if pos + size > end:
                raise MalformedMessage("truncated fixed-width field")
            value = int.from_bytes(data[pos : pos + size], "little")
            pos += size
        elif wire == LEN:
            size, pos = _read_varint(data, pos)
            if size > end - pos:
                raise MalformedMessage(f"field {number} runs past the message ({size} bytes)")
            value = data[pos : pos + size]
            pos += size
        else:
            raise MalformedMessage(f"unsupported wire type {wire}")
        yield number, wire, value


def _int64(value: int) -> int:
    return value - _U64 if value >= 1 << 63 else value


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _enc_int(number: int, value: int) -> bytes:
    return _tag(number, VARINT) + _varint(value) if value else b""


def _enc_bytes(number: int, value: bytes) -> bytes:
    return _tag(number, LEN) + _varint(len(value)) + value if value else b""


def _enc_msg(number: int, value: bytes) -> bytes:
    """A sub-message, present even when empty (an empty oneof member still counts)."""
    return _tag(number, LEN) + _varint(len(value)) + value


class _Reader:
    """The fields of one message, grouped: scalars (last one wins), sub-messages (merged,
    as protobuf does with repeated pieces of one), repeated values in order."""

    def __init__(self, data: bytes) -> None:
        self.ints: dict[int, int] = {}
        self.blobs: dict[int, list[bytes]] = {}
        for number, wire, value in _fields(data):
            if wire == VARINT:
                assert isinstance(value, int)
                self.ints[number] = value
            elif wire == LEN:
                assert isinstance(value, bytes)
                self.blobs.setdefault(number, []).append(value)

    def int64(self, number: int) -> int:
        return _int64(self.ints.get(number, 0))

    def flag(self, number: int) -> bool:
        return bool(self.ints.get(number, 0))

    def bytes_(self, number: int) -> bytes:
        pieces = self.blobs.get(number)
        return pieces[-1] if pieces else b""

    def text(self, number: int) -> str:
        try:
            return self.bytes_(number).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessage(f"field {number} is not UTF-8") from None

    def merged(self, number: int) -> bytes | None:
        pieces = self.blobs.get(number)
        return None if pieces is None else b"".join(pieces)

    def repeated(self, number: int) -> list[bytes]:
        return self.blobs.get(number, [])


# -- decoded answers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    value: bytes = b""
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    kind: int = 0  # 0 PUT, 1 DELETE (mvccpb.Event.EventType)
    kv: KeyValue = field(default_factory=KeyValue)


@dataclass(frozen=True, slots=True)
class Reply:
    """Any of etcd's answers the registry reads, each field under its proto name."""

    revision: int = 0  # header.revision
    kvs: tuple[KeyValue, ...] = ()  # RangeResponse
    deleted: int = 0  # DeleteRangeResponse
    succeeded: bool = False  # TxnResponse
    id: int = 0  # Lease*Response.ID
    ttl: int = 0  # Lease*Response.TTL
    granted_ttl: int = 0  # LeaseTimeToLiveResponse.grantedTTL
    keys: tuple[bytes, ...] = ()  # LeaseTimeToLiveResponse.keys
    error: str = ""  # LeaseGrantResponse.error
    token: str = ""  # AuthenticateResponse.token


@dataclass(frozen=True, slots=True)
class WatchReply:
    revision: int = 0
    watch_id: int = 0
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    events: tuple[Event, ...] = ()


def decode_kv(data: bytes) -> KeyValue:
    r = _Reader(data)
    return KeyValue(r.bytes_(1), r.int64(2), r.int64(3), r.int64(4), r.bytes_(5), r.int64(6))


def _revision(r: _Reader) -> int:
    header = r.merged(1)
    return 0 if header is None else _Reader(header).int64(3)


def decode_range(data: bytes) -> Reply:
    """RangeResponse."""
    r = _Reader(data)
    return Reply(_revision(r), kvs=tuple(decode_kv(kv) for kv in r.repeated(2)))


def decode_delete(data: bytes) -> Reply:
    """DeleteRangeResponse."""
    r = _Reader(data)
    return Reply(_revision(r), deleted=r.int64(2))


def decode_header_only(data: bytes) -> Reply:
    """PutResponse, LeaseRevokeResponse: what matters is that it is one."""
    return Reply(_revision(_Reader(data)))


def decode_txn(data: bytes) -> Reply:
    """TxnResponse (the responses of its operations are not read)."""
    r = _Reader(data)
    return Reply(_revision(r), succeeded=r.flag(2))


def decode_lease(data: bytes) -> Reply:
    """LeaseKeepAliveResponse, LeaseTimeToLiveResponse (ID 2, TTL 3; grantedTTL 4 and
    keys 5 of the latter)."""
    r = _Reader(data)
    return Reply(
        _revision(r),
        id=r.int64(2),
        ttl=r.int64(3),
        granted_ttl=r.int64(4),
        keys=tuple(r.repeated(5)),
    )


def decode_lease_grant(data: bytes) -> Reply:
    """LeaseGrantResponse (its field 4 is a string: etcd's error)."""
    r = _Reader(data)
    return Reply(_revision(r), id=r.int64(2), ttl=r.int64(3), error=r.text(4))


def decode_auth(data: bytes) -> Reply:
    """AuthenticateResponse."""
    r = _Reader(data)
    return Reply(_revision(r), token=r.text(2))


def decode_event(data: bytes) -> Event:
    r = _Reader(data)
    kv = r.merged(2)
    return Event(r.int64(1), KeyValue() if kv is None else decode_kv(kv))


def decode_watch(data: bytes) -> WatchReply:
    r = _Reader(data)
    return WatchReply(
        _revision(r),
        r.int64(2),
        r.flag(3),
        r.flag(4),
        r.int64(5),
        r.text(6),
        tuple(decode_event(e) for e in r.repeated(11)),
    )


# -- requests -----------------------------------------------------------------------------


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range of every key starting with ``prefix`` (etcd's
    clientv3.GetPrefixRangeEnd): the prefix with its last byte below 0xff incremented."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"  # every key


def range_request(key: bytes, range_end: bytes = b"") -> bytes:
    return _enc_bytes(1, key) + _enc_bytes(2, range_end)


def put_request(key: bytes, value: bytes, lease: int = 0) -> bytes:
    return _enc_bytes(1, key) + _enc_bytes(2, value) + _enc_int(3, lease)


def delete_request(key: bytes, range_end: bytes = b"") -> bytes:
    return _enc_bytes(1, key) + _enc_bytes(2, range_end)


def txn_create_request(key: bytes, value: bytes, lease: int = 0) -> bytes:
    """A TxnRequest that puts ``key`` only if it does not exist (its version is 0):
    Compare{result EQUAL, target VERSION, key, version 0}, success [put]."""
    # version 0 sits in a oneof: written out even though it is the default, as etcd's client.
    compare = _enc_bytes(3, key) + _tag(4, VARINT) + _varint(0)
    put = _enc_msg(2, put_request(key, value, lease))  # RequestOp.request_put
    return _enc_msg(1, compare) + _enc_msg(2, put)


def lease_grant_request(ttl: int) -> bytes:
    return _enc_int(1, ttl)


def lease_id_request(lease: int) -> bytes:
    """LeaseRevokeRequest and LeaseKeepAliveRequest: the ID alone."""
    return _enc_int(1, lease)


def lease_ttl_request(lease: int, keys: bool = True) -> bytes:
    return _enc_int(1, lease) + _enc_int(2, int(keys))


def auth_request(name: str, password: str) -> bytes:
    return _enc_bytes(1, name.encode()) + _enc_bytes(2, password.encode())


def watch_create_request(key: bytes, range_end: bytes, start_revision: int) -> bytes:
    create = _enc_bytes(1, key) + _enc_bytes(2, range_end) + _enc_int(3, start_revision)
    return _enc_msg(1, create)


def watch_cancel_request(watch_id: int) -> bytes:
    return _enc_msg(2, _enc_int(1, watch_id))


# -- gRPC's length-prefixed messages ------------------------------------------------------


def frame(message: bytes) -> bytes:
    """One gRPC message on the stream: uncompressed flag, 4-byte length, the message."""
    return struct.pack(">BI", 0, len(message)) + message


def unframe(buffer: bytearray, limit: int) -> bytes | None:
    """The first whole message in ``buffer`` (removed from it), or None while incomplete.
    A compressed message (none was asked for) or one over ``limit`` is refused."""
    if len(buffer) < 5:
        return None
    flag, size = struct.unpack_from(">BI", buffer)
    if flag != 0:
        raise MalformedMessage(f"a compressed message (flag {flag}) that was not asked for")
    if size > limit:
        raise MessageTooLarge(size, limit)
    if len(buffer) < 5 + size:
        return None
    message = bytes(buffer[5 : 5 + size])
    del buffer[: 5 + size]
    return message


class MessageTooLarge(RegistryError):
    """A message over the receive limit (gRPC's RESOURCE_EXHAUSTED, whose wording it keeps:
    "larger than max")."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"received message larger than max ({size} vs. {limit})")
