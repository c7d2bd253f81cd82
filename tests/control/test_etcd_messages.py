"""control/etcd_messages.py against the oracle: the protobuf classes generated from etcd's
.proto files (shipped by aetcd; a test extra, never imported by a daemon). Requests we
encode must parse there to the same fields; answers serialized there must decode here to
the same values; random and malformed bytes either decode as protobuf decodes them or
raise MalformedMessage (a RegistryError), never anything else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from control import etcd_messages as m
from control.kv import RegistryError

rpc = pytest.importorskip("aetcd.rpc.rpc_pb2")
kvpb = pytest.importorskip("aetcd.rpc.kv_pb2")
DecodeError = pytest.importorskip("google.protobuf.message").DecodeError

int64 = st.integers(-(2**63), 2**63 - 1)
uint64 = st.integers(0, 2**64 - 1)
blob = st.binary(max_size=64)
text = st.text(max_size=20)
SETTINGS = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])


def header() -> st.SearchStrategy[Any]:
    return st.builds(
        rpc.ResponseHeader, cluster_id=uint64, member_id=uint64, revision=int64, raft_term=uint64
    )


def key_value() -> st.SearchStrategy[Any]:
    return st.builds(
        kvpb.KeyValue,
        key=blob,
        create_revision=int64,
        mod_revision=int64,
        version=int64,
        value=blob,
        lease=int64,
    )


def same_kv(ours: m.KeyValue, theirs: Any) -> None:
    assert (ours.key, ours.value) == (theirs.key, theirs.value)
    assert (ours.create_revision, ours.mod_revision) == (
        theirs.create_revision,
        theirs.mod_revision,
    )
    assert (ours.version, ours.lease) == (theirs.version, theirs.lease)


# -- requests: ours, parsed by protobuf -----------------------------------------------------


@given(key=blob, end=blob)
def test_range_and_delete_requests(key: bytes, end: bytes) -> None:
    request = rpc.RangeRequest.FromString(m.range_request(key, end))
    assert (request.key, request.range_end, request.limit, request.revision) == (key, end, 0, 0)
    delete = rpc.DeleteRangeRequest.FromString(m.delete_request(key, end))
    assert (delete.key, delete.range_end, delete.prev_kv) == (key, end, False)


@given(key=blob, value=st.binary(max_size=4096), lease=int64)
def test_put_request(key: bytes, value: bytes, lease: int) -> None:
    request = rpc.PutRequest.FromString(m.put_request(key, value, lease))
    assert (request.key, request.value, request.lease) == (key, value, lease)


@given(key=blob, value=blob, lease=int64)
def test_create_transaction(key: bytes, value: bytes, lease: int) -> None:
    """Compare{version(key) == 0}, success [put]: the version is written even though it is
    0, as it sits in a oneof (etcd's client writes it too)."""
    txn = rpc.TxnRequest.FromString(m.txn_create_request(key, value, lease))
    (compare,) = txn.compare
    assert compare.result == rpc.Compare.EQUAL and compare.target == rpc.Compare.VERSION
    assert compare.key == key and compare.WhichOneof("target_union") == "version"
    assert compare.version == 0
    (op,) = txn.success
    assert op.WhichOneof("request") == "request_put"
    assert (op.request_put.key, op.request_put.value, op.request_put.lease) == (key, value, lease)
    assert list(txn.failure) == []


@given(ttl=int64, lease=int64, keys=st.booleans())
def test_lease_requests(ttl: int, lease: int, keys: bool) -> None:
    assert rpc.LeaseGrantRequest.FromString(m.lease_grant_request(ttl)).TTL == ttl
    assert rpc.LeaseRevokeRequest.FromString(m.lease_id_request(lease)).ID == lease
    assert rpc.LeaseKeepAliveRequest.FromString(m.lease_id_request(lease)).ID == lease
    request = rpc.LeaseTimeToLiveRequest.FromString(m.lease_ttl_request(lease, keys))
    assert (request.ID, request.keys) == (lease, keys)


@given(name=text, password=text)
def test_authenticate_request(name: str, password: str) -> None:
    request = rpc.AuthenticateRequest.FromString(m.auth_request(name, password))
    assert (request.name, request.password) == (name, password)


@given(key=blob, end=blob, revision=int64, watch_id=int64)
def test_watch_requests(key: bytes, end: bytes, revision: int, watch_id: int) -> None:
    create = rpc.WatchRequest.FromString(m.watch_create_request(key, end, revision))
    assert create.WhichOneof("request_union") == "create_request"
    c = create.create_request
    assert (c.key, c.range_end, c.start_revision) == (key, end, revision)
    assert (c.progress_notify, c.prev_kv, list(c.filters)) == (False, False, [])
    cancel = rpc.WatchRequest.FromString(m.watch_cancel_request(watch_id))
    assert cancel.WhichOneof("request_union") == "cancel_request"
    assert cancel.cancel_request.watch_id == watch_id


@given(prefix=st.binary(max_size=8))
@example(prefix=b"\xff\xff")
@example(prefix=b"/a\xff")
def test_prefix_end_bounds_exactly_the_keys_with_the_prefix(prefix: bytes) -> None:
    end = m.prefix_end(prefix)
    if prefix.strip(b"\xff") == b"":
        assert end == b"\0"  # etcd's "every key from here"
        return
    assert prefix < end and not end.startswith(prefix)
    assert prefix + b"\xff" * 8 < end


# -- answers: protobuf's, decoded by us -----------------------------------------------------


@given(h=header(), kvs=st.lists(key_value(), max_size=4), more=st.booleans(), count=int64)
def test_range_response(h: Any, kvs: list[Any], more: bool, count: int) -> None:
    data = rpc.RangeResponse(header=h, kvs=kvs, more=more, count=count).SerializeToString()
    reply = m.decode_range(data)
    assert reply.revision == h.revision and len(reply.kvs) == len(kvs)
    for ours, theirs in zip(reply.kvs, kvs, strict=True):
        same_kv(ours, theirs)


@given(h=header(), deleted=int64, succeeded=st.booleans())
def test_delete_put_txn_revoke_responses(h: Any, deleted: int, succeeded: bool) -> None:
    reply = m.decode_delete(rpc.DeleteRangeResponse(header=h, deleted=deleted).SerializeToString())
    assert (reply.revision, reply.deleted) == (h.revision, deleted)
    assert m.decode_header_only(rpc.PutResponse(header=h).SerializeToString()).revision == (
        h.revision
    )
    assert m.decode_header_only(rpc.LeaseRevokeResponse(header=h).SerializeToString()).revision == (
        h.revision
    )
    txn = rpc.TxnResponse(header=h, succeeded=succeeded, responses=[rpc.ResponseOp()])
    assert m.decode_txn(txn.SerializeToString()).succeeded == succeeded


@given(h=header(), lease=int64, ttl=int64, granted=int64, keys=st.lists(blob, max_size=3))
def test_lease_responses(h: Any, lease: int, ttl: int, granted: int, keys: list[bytes]) -> None:
    live = rpc.LeaseTimeToLiveResponse(header=h, ID=lease, TTL=ttl, grantedTTL=granted, keys=keys)
    reply = m.decode_lease(live.SerializeToString())
    assert (reply.id, reply.ttl, reply.granted_ttl, list(reply.keys)) == (lease, ttl, granted, keys)
    alive = m.decode_lease(rpc.LeaseKeepAliveResponse(ID=lease, TTL=ttl).SerializeToString())
    assert (alive.id, alive.ttl) == (lease, ttl)


@given(h=header(), lease=int64, ttl=int64, error=text)
def test_lease_grant_response(h: Any, lease: int, ttl: int, error: str) -> None:
    grant = rpc.LeaseGrantResponse(header=h, ID=lease, TTL=ttl, error=error)
    reply = m.decode_lease_grant(grant.SerializeToString())
    assert (reply.revision, reply.id, reply.ttl, reply.error) == (h.revision, lease, ttl, error)


@given(h=header(), token=text)
def test_authenticate_response(h: Any, token: str) -> None:
    data = rpc.AuthenticateResponse(header=h, token=token).SerializeToString()
    assert m.decode_auth(data).token == token


def event() -> st.SearchStrategy[Any]:
    return st.builds(
        kvpb.Event,
        type=st.sampled_from([kvpb.Event.PUT, kvpb.Event.DELETE]),
        kv=key_value(),
        prev_kv=st.one_of(st.none(), key_value()),
    )


@given(
    h=header(),
    watch_id=int64,
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    compact=int64,
    reason=text,
    events=st.lists(event(), max_size=4),
)
def test_watch_response(
    h: Any,
    watch_id: int,
    flags: tuple[bool, bool, bool],
    compact: int,
    reason: str,
    events: list[Any],
) -> None:
    created, canceled, fragment = flags
    data = rpc.WatchResponse(
        header=h,
        watch_id=watch_id,
        created=created,
        canceled=canceled,
        compact_revision=compact,
        cancel_reason=reason,
        fragment=fragment,
        events=events,
    ).SerializeToString()
    reply = m.decode_watch(data)
    assert (reply.revision, reply.watch_id, reply.created, reply.canceled) == (
        h.revision,
        watch_id,
        created,
        canceled,
    )
    assert (reply.compact_revision, reply.cancel_reason) == (compact, reason)
    assert [e.kind for e in reply.events] == [e.type for e in events]
    for ours, theirs in zip(reply.events, events, strict=True):
        same_kv(ours.kv, theirs.kv)


def test_repeated_pieces_of_a_sub_message_merge_as_protobuf_merges_them() -> None:
    first = rpc.RangeResponse(header=rpc.ResponseHeader(revision=7, cluster_id=1))
    second = rpc.RangeResponse(header=rpc.ResponseHeader(raft_term=3))
    data = first.SerializeToString() + second.SerializeToString()
    assert rpc.RangeResponse.FromString(data).header.revision == 7
    assert m.decode_range(data).revision == 7


# -- random and malformed bytes -------------------------------------------------------------


def _same_range(ours: m.Reply, theirs: Any) -> None:
    assert len(ours.kvs) == len(theirs.kvs)
    for a, b in zip(ours.kvs, theirs.kvs, strict=True):
        same_kv(a, b)


def _same_delete(ours: m.Reply, theirs: Any) -> None:
    assert ours.deleted == theirs.deleted


def _same_txn(ours: m.Reply, theirs: Any) -> None:
    assert ours.succeeded == theirs.succeeded


def _same_grant(ours: m.Reply, theirs: Any) -> None:
    assert (ours.id, ours.ttl, ours.error) == (theirs.ID, theirs.TTL, theirs.error)


def _same_auth(ours: m.Reply, theirs: Any) -> None:
    assert ours.token == theirs.token


def _same_ttl(ours: m.Reply, theirs: Any) -> None:
    assert (ours.id, ours.ttl, ours.granted_ttl) == (theirs.ID, theirs.TTL, theirs.grantedTTL)
    assert list(ours.keys) == list(theirs.keys)


def _same_watch(ours: m.WatchReply, theirs: Any) -> None:
    assert (ours.watch_id, ours.created, ours.canceled) == (
        theirs.watch_id,
        theirs.created,
        theirs.canceled,
    )
    assert (ours.compact_revision, ours.cancel_reason) == (
        theirs.compact_revision,
        theirs.cancel_reason,
    )
    assert len(ours.events) == len(theirs.events)
    for a, b in zip(ours.events, theirs.events, strict=True):
        assert (a.kind == 1) == (b.type == 1)
        same_kv(a.kv, b.kv)


DECODERS: list[tuple[Callable[[bytes], Any], Any, Callable[[Any, Any], None]]] = [
    (m.decode_range, rpc.RangeResponse, _same_range),
    (m.decode_delete, rpc.DeleteRangeResponse, _same_delete),
    (m.decode_txn, rpc.TxnResponse, _same_txn),
    (m.decode_lease, rpc.LeaseTimeToLiveResponse, _same_ttl),
    (m.decode_lease_grant, rpc.LeaseGrantResponse, _same_grant),
    (m.decode_auth, rpc.AuthenticateResponse, _same_auth),
    (m.decode_watch, rpc.WatchResponse, _same_watch),
]


def _check_against_oracle(data: bytes) -> None:
    for decode, oracle, same in DECODERS:
        try:
            ours = decode(data)
        except m.MalformedMessage:
            ours = None
        try:
            theirs = oracle.FromString(data)
        except DecodeError:
            theirs = None
        if ours is not None and theirs is not None:
            assert ours.revision == theirs.header.revision
            same(ours, theirs)
        # What protobuf refuses we refuse too; what it reads we may refuse only for an
        # unsupported group (wire types 3 and 4, which no etcd message has).
        if theirs is None:
            assert ours is None, (decode.__name__, data)


@given(data=st.binary(max_size=200))
@SETTINGS
def test_random_bytes_decode_as_protobuf_does_or_are_malformed(data: bytes) -> None:
    _check_against_oracle(data)


@given(
    base=st.builds(
        lambda h, kvs, evs: (
            rpc.RangeResponse(header=h, kvs=kvs).SerializeToString()
            + rpc.WatchResponse(header=h, events=evs).SerializeToString()
        ),
        header(),
        st.lists(key_value(), max_size=3),
        st.lists(event(), max_size=3),
    ),
    cut=st.integers(0, 400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
)
@SETTINGS
def test_truncated_and_corrupted_answers(
    base: bytes, cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(base[: cut % (len(base) + 1)])
    for where, value in flips:
        if data:
            data[where % len(data)] = value
    _check_against_oracle(bytes(data))


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\xff\xff\xff\xff\x0f",  # a length of 4 GiB in a 6-byte message
        b"\x08" + b"\xff" * 10 + b"\x01",  # a varint longer than ten bytes
        b"\x08",  # a truncated varint
        b"\x11\x00\x00",  # a truncated fixed64
        b"\x00\x00",  # field number 0
        b"\x0b",  # a group start (wire type 3)
        b"\x32\x02\xff\xfe",  # a string field (cancel_reason) that is not UTF-8
    ],
)
def test_malformed_bytes_are_one_registry_error(data: bytes) -> None:
    with pytest.raises(RegistryError):
        m.decode_watch(data)


# -- gRPC's framing -------------------------------------------------------------------------


@given(messages=st.lists(st.binary(max_size=300), max_size=5), chunk=st.integers(1, 50))
def test_framing_round_trips_in_any_chunking(messages: list[bytes], chunk: int) -> None:
    wire = b"".join(m.frame(x) for x in messages)
    buffer = bytearray()
    out = []
    for i in range(0, len(wire), chunk):
        buffer += wire[i : i + chunk]
        while (message := m.unframe(buffer, 1000)) is not None:
            out.append(message)
    assert out == messages and not buffer


def test_framing_refuses_compressed_and_oversized_messages() -> None:
    with pytest.raises(m.MalformedMessage, match="compressed"):
        m.unframe(bytearray(b"\x01\x00\x00\x00\x00"), 10)
    with pytest.raises(m.MessageTooLarge, match=r"larger than max \(11 vs. 10\)"):
        m.unframe(bytearray(b"\x00\x00\x00\x00\x0b"), 10)  # refused before it is all here
