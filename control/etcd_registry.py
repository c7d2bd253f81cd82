"""The etcd v3 registry, over our own gRPC client, behind the same KeyValueStore interface.

A thin adapter: flannel's semantics live in SubnetManager. What this adds is what the raw
calls lack: several endpoints tried in turn, TLS with client certificates, keepalive pings
so a frozen etcd is noticed within seconds, a deadline on every call, a receive limit as
large as etcd's own client's, one etcd lease per key reused across renewals and restarts,
concurrent callers that cannot cut each other off (see EtcdRegistry), and errors
translated to RegistryError / RevisionCompacted, or RegistryConfigError for what retrying
cannot fix (unreadable or mismatched TLS files, failed authentication, a response over
the receive limit).

The client is control/grpc_channel.py (HTTP/2 by the pure-Python h2) and
control/etcd_messages.py (the messages, encoded by hand): grpcio's C core, its threads and
protobuf were ~14 MiB of an idle daemon (README, "Memory of a daemon").
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

from control import etcd_messages as msg
from control.etcd_endpoints import Endpoint, TlsFiles
from control.grpc_channel import RESOURCE_EXHAUSTED, Channel, GrpcError, Stream
from control.kv import (
    Entry,
    Event,
    RegistryConfigError,
    RegistryError,
    RevisionCompacted,
)

# gRPC's default receive limit is 4 MiB: a listing of the prefix larger than that (a few
# big values: etcd takes up to --max-request-bytes, 1.5 MiB, per put) would fail every
# time. etcd's own Go client allows math.MaxInt32, and so do we.
MAX_RECEIVE = 2**31 - 1
CALL_TIMEOUT = 5
CLOSE_TIMEOUT = 1.0  # a connection's close waits on nothing remote; bounded all the same
# After a failed connection attempt an endpoint is not tried again for this long (doubling
# per failure, reset by a success): concurrent callers fail fast instead of each opening
# a connection to a member that is down.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0

KV, LEASE, WATCH = "/etcdserverpb.KV/", "/etcdserverpb.Lease/", "/etcdserverpb.Watch/Watch"
AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"


def tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """The client's TLS context from the files ``tls.read()`` has checked (one-line
    RegistryConfigError when they are not usable), offering HTTP/2 only."""
    ca, _key, _cert = tls.read()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    else:
        context.load_default_certs()
    if tls.certfile is not None and tls.keyfile is not None:
        context.load_cert_chain(tls.certfile, tls.keyfile)
    context.set_alpn_protocols(["h2"])
    return context


class _Client:
    """One connection to one endpoint, authenticated, with the calls the registry makes."""

    def __init__(self, channel: Channel, endpoint_index: int, timeout: float) -> None:
        self.channel = channel
        self.endpoint_index = endpoint_index  # which of the registry's endpoints
        self.timeout = timeout
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.users = 0  # operations using it now
        self.retired = False

    async def call(self, method: str, request: bytes) -> bytes:
        if self.retired and self.channel.error is not None:
            raise self.channel.error
        return await self.channel.unary(method, request, self.timeout, self.metadata)

    async def get(self, key: bytes) -> msg.KeyValue | None:
        reply = msg.decode_range(await self.call(KV + "Range", msg.range_request(key)))
        return reply.kvs[0] if reply.kvs else None

    async def get_prefix(self, prefix: bytes) -> msg.Reply:
        request = msg.range_request(prefix, msg.prefix_end(prefix))
        return msg.decode_range(await self.call(KV + "Range", request))

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        msg.decode_header_only(await self.call(KV + "Put", msg.put_request(key, value, lease)))

    async def create(self, key: bytes, value: bytes, lease: int) -> bool:
        request = msg.txn_create_request(key, value, lease)
        return msg.decode_txn(await self.call(KV + "Txn", request)).succeeded

    async def delete(self, key: bytes) -> int:
        reply = msg.decode_delete(await self.call(KV + "DeleteRange", msg.delete_request(key)))
        return reply.deleted

    async def grant(self, ttl: int) -> int:
        reply = msg.decode_lease_grant(
            await self.call(LEASE + "LeaseGrant", msg.lease_grant_request(ttl))
        )
        if reply.error:
            raise GrpcError(2, f"lease grant refused: {reply.error}")
        return reply.id

    async def revoke(self, lease: int) -> None:
        msg.decode_header_only(await self.call(LEASE + "LeaseRevoke", msg.lease_id_request(lease)))

    async def time_to_live(self, lease: int) -> msg.Reply:
        request = msg.lease_ttl_request(lease, keys=True)
        return msg.decode_lease(await self.call(LEASE + "LeaseTimeToLive", request))

    async def refresh(self, lease: int) -> msg.Reply | None:
        """One keep-alive on the bidirectional LeaseKeepAlive stream, then closed."""
        stream = self.channel.open_stream(LEASE + "LeaseKeepAlive", self.metadata, self.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                await stream.send(msg.lease_id_request(lease))
                answer = await stream.recv()
        except TimeoutError:
            raise GrpcError(4, f"no keep-alive answer within {self.timeout:g} s") from None
        finally:
            stream.cancel()
        return None if answer is None else msg.decode_lease(answer)


class EtcdRegistry:
    """A :class:`control.kv.KeyValueStore` on etcd v3.

    Its callers are concurrent tasks (in the daemon: the watch, the renewals, the registry
    probe), so no call may hurt another. The unary calls share one connection; one that
    fails moves them all to a new one, and the old one is closed once the last operation
    still on it has ended, by its own deadline (gRPC cancels the calls of a closed channel,
    and a CancelledError would end the task that made the call, not just the call). Each
    watch stream has a connection of its own and requires a leader, so a call that timed
    out does not end a stream that is fine, a broken stream does not cut off the calls,
    and a member cut off from the quorum ends the stream rather than keeping it silent.
    """

    def __init__(
        self,
        endpoints: list[Endpoint],
        *,
        tls: TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = CALL_TIMEOUT,
        max_receive: int = MAX_RECEIVE,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        self.endpoints = endpoints
        self.tls = tls or TlsFiles()
        self.username = username
        self.password = password
        self.timeout = timeout
        self.max_receive = max_receive
        self._index = 0
        self._client: _Client | None = None
        self._lock = asyncio.Lock()
        self._streams: set[_Client] = set()  # the watch streams' connections
        self._closed = False
        self._not_before: dict[int, tuple[float, float, str]] = {}  # index: when, backoff, why
        # Built now: a bad TLS file is a one-line error at start, not a retried failure.
        files = bool(self.tls.cafile or self.tls.certfile or self.tls.keyfile)
        self._tls = tls_context(self.tls) if files or any(e.tls for e in endpoints) else None

    async def _open(self, *, require_leader: bool = False) -> _Client:
        """A new connection to the current endpoint, authenticated when configured; an
        endpoint whose last connection attempt failed waits out its backoff (this call
        fails at once meanwhile, and the next endpoint is tried next)."""
        if self._closed:
            raise RegistryError("the etcd registry is closed")
        index = self._index
        endpoint = self.endpoints[index]
        now = time.monotonic()
        when, backoff, why = self._not_before.get(index, (0.0, 0.0, ""))
        if now < when:
            self._move_on(index)
            raise RegistryError(f"etcd {endpoint}: {why} (next try in {when - now:.1f} s)")
        use_tls = endpoint.tls or bool(self.tls.cafile or self.tls.certfile)
        try:
            channel = await Channel.connect(
                endpoint.host,
                endpoint.port,
                tls=self._tls if use_tls else None,
                timeout=self.timeout,
                max_receive=self.max_receive,
            )
        except (OSError, TimeoutError, RegistryError) as e:
            text = _describe(e, endpoint)
            backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, backoff * 2))
            self._not_before[index] = (time.monotonic() + backoff, backoff, text)
            self._move_on(index)
            raise RegistryError(f"etcd {endpoint}: {text}") from None
        self._not_before.pop(index, None)
        client = _Client(channel, index, self.timeout)
        if require_leader:
            # etcd's WithRequireLeader, as flanneld watches: a member cut off from the
            # quorum ends the stream ("no leader") instead of keeping it open and silent.
            client.metadata += (("hasleader", "true"),)
        if self.username is not None and self.password is not None:
            await self._authenticate(client, endpoint)
        return client

    async def _authenticate(self, client: _Client, endpoint: Endpoint) -> None:
        assert self.username is not None and self.password is not None
        request = msg.auth_request(self.username, self.password)
        try:
            token = msg.decode_auth(await client.call(AUTHENTICATE, request)).token
        except RegistryError as e:
            await _close(client)
            self._move_on(client.endpoint_index)
            text = _describe(e, endpoint)
            if "authentication failed" in text:
                raise RegistryConfigError(
                    f"etcd {endpoint}: authentication failed for user {self.username!r} "
                    "(check --etcd-username and --etcd-password / FLANNELD_ETCD_PASSWORD)"
                ) from None
            raise RegistryError(f"etcd {endpoint}: {text}") from None
        client.metadata += (("token", token),)

    async def _connected(self) -> _Client:
        async with self._lock:
            if self._client is not None and not self._client.channel.usable:
                self._retire(self._client)  # closed under us, or GOAWAY
            if self._client is None:
                self._client = await self._open()
            return self._client

    def _move_on(self, index: int) -> None:
        """The endpoint at ``index`` failed: the next one is tried, once per failure of
        that endpoint however many calls saw it."""
        if self._index == index:
            self._index = (index + 1) % len(self.endpoints)

    def _retire(self, client: _Client) -> None:
        """Stop using a broken connection; it is closed when the last operation on it
        ends (each call has its deadline), never under one."""
        if client is self._client:
            self._client = None
        self._move_on(client.endpoint_index)
        client.retired = True

    def _failed(self, client: _Client, error: BaseException, what: str) -> RegistryError:
        """The RegistryError for a failed ``what`` (a call, a watch) on ``client``, which
        is retired unless etcd answered and refused just this one."""
        endpoint = self.endpoints[client.endpoint_index]
        code = error.code if isinstance(error, GrpcError) else None
        if code not in REFUSALS or client.channel.error is not None:
            self._retire(client)
        # RESOURCE_EXHAUSTED is also etcd's own "database space exceeded" (its NOSPACE
        # alarm) and "too many requests": only our receive limit is ours to name.
        if isinstance(error, GrpcError) and code == RESOURCE_EXHAUSTED:
            if "larger than max" in error.message:
                return RegistryConfigError(
                    f"etcd {endpoint}: a response was larger than this client accepts "
                    f"({self.max_receive} bytes): the values under the prefix are too large; "
                    f"remove the oversized ones ({_describe(error, endpoint)})"
                )
        return RegistryError(f"etcd {endpoint}: {_describe(error, endpoint)}")

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[_Client]:
        """The shared connection, for one operation; its failures as RegistryError."""
        client = await self._connected()
        client.users += 1
        try:
            yield client
        except (RegistryError, OSError) as e:
            raise self._failed(client, e, "call") from None
        finally:
            client.users -= 1
            if client.retired and client.users == 0:
                await _close(client)

    # -- KeyValueStore -------------------------------------------------------------------

    async def check(self) -> None:
        """Nothing to check before the first call: the TLS files were checked when the
        registry was made, and the endpoints answer (or not) at the first call."""

    async def get(self, key: str) -> Entry | None:
        async with self._call() as client:
            kv = await client.get(key.encode())
        return None if kv is None else _entry(kv)

    async def list_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        async with self._call() as client:
            result = await client.get_prefix(prefix.encode())
        return [_entry(kv) for kv in result.kvs], result.revision

    async def create(self, key: str, value: bytes, ttl: int | None) -> bool:
        async with self._call() as client:
            lease = 0
            try:
                lease = 0 if ttl is None else await client.grant(ttl)
                succeeded = await client.create(key.encode(), value, lease)
            except RegistryError:
                if lease:  # granted, and maybe unused: do not leave it behind
                    await _quietly(client.revoke(lease))
                raise
            if not succeeded and lease:
                await _quietly(client.revoke(lease))
        return succeeded

    async def put(self, key: str, value: bytes, ttl: int | None) -> None:
        """Write ``key``; with a TTL, on the etcd lease it already has when that lease is
        its alone and of the same TTL, refreshed (one keep-alive), so renewals and
        restarts create no new lease objects. Otherwise a new lease is granted, and the
        old one is revoked if nothing is attached to it any more."""
        async with self._call() as client:
            if ttl is None:
                await client.put(key.encode(), value)
                return
            kept, old = await self._reusable_lease(client, key, ttl)
            if kept is not None:
                await client.put(key.encode(), value, kept)
                return
            lease = await client.grant(ttl)
            await client.put(key.encode(), value, lease)
            if old:
                info = await client.time_to_live(old)
                if info.ttl > 0 and not info.keys:
                    await client.revoke(old)

    async def _reusable_lease(self, client: _Client, key: str, ttl: int) -> tuple[int | None, int]:
        """(the lease to keep ``key`` on, refreshed, or None; the key's current lease)."""
        kv = await client.get(key.encode())
        old = kv.lease if kv is not None else 0
        if not old:
            return None, 0
        info = await client.time_to_live(old)
        if info.ttl <= 0 or info.granted_ttl != ttl or list(info.keys) != [key.encode()]:
            return None, old
        reply = await client.refresh(old)
        if reply is None or reply.ttl <= 0:  # expired in between
            return None, 0
        return old, old

    async def delete(self, key: str) -> bool:
        async with self._call() as client:
            deleted = await client.delete(key.encode())
        return deleted > 0

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        client = await self._open(require_leader=True)  # the stream's own, closed with it
        self._streams.add(client)
        stream: Stream | None = None
        try:
            stream = await self._create_watch(client, prefix.encode(), start_revision)
            while (answer := await stream.recv()) is not None:
                reply = msg.decode_watch(answer)
                if reply.compact_revision:
                    raise RevisionCompacted(reply.compact_revision)
                if reply.canceled:
                    raise GrpcError(1, f"the watch was canceled: {reply.cancel_reason}")
                if reply.events:  # progress notifications carry none
                    yield [_event(e) for e in reply.events]
        except RevisionCompacted:
            raise
        except (RegistryError, OSError) as e:
            if client.retired and self._closed:
                return  # closed by close(): the stream ends
            raise self._failed(client, e, "watch") from None
        finally:
            if stream is not None:
                stream.cancel()
            self._streams.discard(client)
            await _close(client)

    async def _create_watch(self, client: _Client, prefix: bytes, start_revision: int) -> Stream:
        """A Watch stream over every key under ``prefix``, once etcd has created it."""
        stream = client.channel.open_stream(WATCH, client.metadata, None)
        request = msg.watch_create_request(prefix, msg.prefix_end(prefix), start_revision)
        try:
            async with asyncio.timeout(client.timeout):
                await stream.send(request)
                answer = await stream.recv()
        except TimeoutError:
            stream.cancel()
            raise GrpcError(4, f"the watch was not created within {client.timeout:g} s") from None
        if answer is None:
            raise GrpcError(13, "the watch stream ended before it was created")
        reply = msg.decode_watch(answer)
        if reply.compact_revision:
            raise RevisionCompacted(reply.compact_revision)
        if reply.canceled or not reply.created:
            raise GrpcError(1, f"the watch was not created: {reply.cancel_reason or '?'}")
        return stream

    async def close(self) -> None:
        """Close every connection, at once; a watch still running ends as a closed
        stream, and nothing opens a new one afterwards."""
        self._closed = True
        clients = [c for c in (self._client, *self._streams) if c is not None]
        self._client = None
        await asyncio.gather(*(_close(c) for c in clients))


# Codes with which etcd answered and refused one call: the connection is fine and kept.
# Any other failure (unreachable, timed out, no leader, an expired auth token) moves the
# registry to a new connection, on the next endpoint.
REFUSALS = frozenset({3, 5, 6, 7, 9, 11, 8, 10, 12})  # INVALID_ARGUMENT ... UNIMPLEMENTED


async def _close(client: _Client) -> None:
    client.retired = True
    client.channel.close()
    await _quietly(asyncio.wait_for(client.channel.wait_closed(), CLOSE_TIMEOUT))


def _entry(kv: msg.KeyValue) -> Entry:
    return Entry(
        kv.key.decode("utf-8", "surrogateescape"),
        kv.value,
        kv.mod_revision,
        bool(kv.lease),
        kv.create_revision,
    )


def _event(event: msg.Event) -> Event:
    kv = event.kv
    put = event.kind != 1  # mvccpb.Event.DELETE is 1
    return Event(
        "put" if put else "delete",
        kv.key.decode("utf-8", "surrogateescape"),
        kv.value if put else b"",
        kv.mod_revision,
        bool(kv.lease),
        kv.create_revision if put else 0,
    )


async def _quietly(call: Any) -> None:
    """Best effort (cleanup after a failure already being reported)."""
    try:
        await call
    except Exception:  # noqa: BLE001 - the original failure is what matters
        pass


def _describe(error: BaseException, endpoint: Endpoint) -> str:
    """One line for ``error``: gRPC's status as CODE: message, a socket error by its
    reason, a refused TLS handshake with the flags that set it up."""
    if isinstance(error, ssl.SSLError):
        reason = getattr(error, "reason", None) or str(error)
        text = f"TLS handshake failed: {reason}"
    elif isinstance(error, TimeoutError):
        text = "connection attempt timed out"
    elif isinstance(error, OSError) and error.strerror:
        text = f"cannot connect: {error.strerror}"
    else:
        text = (str(error) or type(error).__name__).splitlines()[0]
    if isinstance(error, ssl.SSLError) or (endpoint.tls and ("SSL" in text or "TLS" in text)):
        text += " (check --etcd-cafile, --etcd-certfile, --etcd-keyfile)"
    return text
