"""The etcd v3 registry (aetcd over gRPC), behind the same KeyValueStore interface.

A thin adapter: flannel's semantics live in SubnetManager. What this adds is what the
raw client lacks: several endpoints tried in turn, TLS with client certificates, gRPC
keepalive pings so a frozen etcd is noticed within seconds, a deadline on every call, a
receive limit as large as etcd's own client's, one etcd lease per key reused across
renewals and restarts, concurrent callers that cannot cut each other off (see
EtcdRegistry), and errors translated to RegistryError / RevisionCompacted, or
RegistryConfigError for what retrying cannot fix (unreadable or mismatched TLS files,
failed authentication, a response over the receive limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

# gRPC's C core logs its own lines to stderr (a refused TLS handshake prints several):
# they would break "one error line" and duplicate what RegistryError already says.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import aetcd  # noqa: E402 - after GRPC_VERBOSITY, which the C core reads at import
import grpc  # noqa: E402

from control.etcd_endpoints import Endpoint, TlsFiles  # noqa: E402
from control.kv import (  # noqa: E402
    Entry,
    Event,
    RegistryConfigError,
    RegistryError,
    RevisionCompacted,
)

# Ping every 5 s (etcd's default --grpc-keepalive-min-time; faster gets GOAWAY), give up
# after 3 s without an answer: a SIGSTOPped etcd fails the watch in about 8 s.
KEEPALIVE = {
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 3000,
    "grpc.http2.ping_timeout_ms": 3000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
}
# gRPC shares subchannels between channels to the same target and backs off reconnecting
# up to 120 s: after an outage a fresh client would still wait out that backoff. A channel
# of its own with the backoff capped at 5 s reconnects as soon as etcd is back. Not
# grpc.min_reconnect_backoff_ms: gRPC takes it as the shortest connection attempt too,
# and a handshake longer than that (TLS to a remote member, a loaded one) never succeeds.
RECONNECT = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 5000,
}
# gRPC's default receive limit is 4 MiB: a listing of the prefix larger than that (a few
# big values: etcd takes up to --max-request-bytes, 1.5 MiB, per put) would fail every
# time. etcd's own Go client allows math.MaxInt32, and so do we.
MAX_RECEIVE = 2**31 - 1
CALL_TIMEOUT = 5
CLOSE_TIMEOUT = 1.0  # a channel's close waits on nothing remote; bounded all the same


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """gRPC's channel credentials from the files ``tls.read()`` has checked."""
    ca, key, cert = tls.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd.Client with TLS (aetcd only builds insecure channels, so connect() is redone
    here with a secure channel when credentials are given; the rest mirrors aetcd 1.0),
    watches that require a leader, and no reconnecting once retired."""

    def __init__(
        self,
        *args: Any,
        credentials: grpc.ChannelCredentials | None = None,
        endpoint_index: int = 0,
        require_leader: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials
        self.endpoint_index = endpoint_index  # which of the registry's endpoints
        self.require_leader = require_leader
        self.users = 0  # operations using it now
        self.retired = False

    async def connect(self) -> None:
        # aetcd reconnects a closed client on its next call: a retired one must fail.
        if self.retired:
            raise aetcd.ConnectionFailedError("the connection was retired")
        if self._connected.is_set():
            return
        if self._credentials is None:
            await super().connect()
        else:
            await self._connect_tls()
        if self.require_leader:
            # etcd's WithRequireLeader, as flanneld watches: a member cut off from the
            # quorum ends the stream ("no leader") instead of keeping it open and silent.
            metadata = (*(self.metadata or ()), ("hasleader", "true"))
            self._watcher._metadata = metadata

    async def _connect_tls(self) -> None:
        from aetcd import rpc, watcher

        try:
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(
                target, self._credentials, options=self._options.items()
            )
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        except grpc.aio.AioRpcError as e:
            raise aetcd.ConnectionFailedError(e.details()) from None


# Codes with which etcd answered and refused one call: the connection is fine and kept.
# Any other failure (unreachable, timed out, no leader, an expired auth token) moves the
# registry to a new connection, on the next endpoint.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


# What a call or a stream may end with; a CancelledError its own task did not ask for
# means its connection was closed under it.
FAILURES = (aetcd.ClientError, grpc.aio.AioRpcError, OSError, asyncio.CancelledError)


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
        # Built now: a bad TLS file is a one-line error at start, not a retried failure.
        files = bool(self.tls.cafile or self.tls.certfile or self.tls.keyfile)
        self._credentials = (
            channel_credentials(self.tls) if files or any(e.tls for e in endpoints) else None
        )

    async def _open(self, *, require_leader: bool = False) -> _Client:
        """A new connection to the current endpoint, authenticated when configured."""
        if self._closed:
            raise RegistryError("the etcd registry is closed")
        index = self._index
        endpoint = self.endpoints[index]
        client = _Client(
            host=endpoint.bracketed_host,  # gRPC's target is host:port
            port=endpoint.port,
            username=self.username,
            password=self.password,
            timeout=self.timeout,
            options={
                **KEEPALIVE,
                **RECONNECT,
                "grpc.max_receive_message_length": self.max_receive,
            },
            credentials=(
                self._credentials if endpoint.tls or self.tls.cafile or self.tls.certfile else None
            ),
            endpoint_index=index,
            require_leader=require_leader,
        )
        try:
            await client.connect()
        except aetcd.ClientError as e:
            await _quietly(client.close())
            self._move_on(index)
            text = _describe(e, endpoint)
            if self.username is not None and "authentication failed" in text:
                raise RegistryConfigError(
                    f"etcd {endpoint}: authentication failed for user {self.username!r} "
                    "(check --etcd-username and --etcd-password / FLANNELD_ETCD_PASSWORD)"
                ) from None
            raise RegistryError(f"etcd {endpoint}: {text}") from None
        return client

    async def _connected(self) -> _Client:
        async with self._lock:
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
        if isinstance(error, asyncio.CancelledError):  # its connection closed under it
            return RegistryError(f"etcd {endpoint}: the {what} was cut off")
        if _code(error) not in REFUSALS:
            self._retire(client)
        # RESOURCE_EXHAUSTED is also etcd's own "database space exceeded" (its NOSPACE
        # alarm) and "too many requests": only gRPC's receive limit is ours to name.
        limit = "larger than max" in (_details(error) or "")
        if _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED and limit:
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
        except FAILURES as e:
            if isinstance(e, asyncio.CancelledError) and _cancelling():
                raise
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
        return [_entry(kv) for kv in result], int(result.header.revision)

    async def create(self, key: str, value: bytes, ttl: int | None) -> bool:
        async with self._call() as client:
            lease = None
            try:
                lease = None if ttl is None else await client.lease(ttl)
                succeeded, _ = await client.transaction(
                    compare=[client.transactions.version(key.encode()) == 0],
                    success=[client.transactions.put(key.encode(), value, lease)],
                    failure=[],
                )
            except (aetcd.ClientError, grpc.aio.AioRpcError):
                if lease is not None:  # granted, and maybe unused: do not leave it behind
                    await _quietly(lease.revoke())
                raise
            if not succeeded and lease is not None:
                await _quietly(lease.revoke())
        return bool(succeeded)

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
                await client.put(key.encode(), value, lease=kept)
                return
            lease = await client.lease(ttl)
            await client.put(key.encode(), value, lease=lease)
            if old:
                info = await client.get_lease_info(old, keys=True)
                if info.TTL > 0 and not list(info.keys):
                    await client.revoke_lease(old)

    async def _reusable_lease(self, client: _Client, key: str, ttl: int) -> tuple[int | None, int]:
        """(the lease to keep ``key`` on, refreshed, or None; the key's current lease)."""
        kv = await client.get(key.encode())
        old = int(kv.lease) if kv is not None else 0
        if not old:
            return None, 0
        info = await client.get_lease_info(old, keys=True)
        keys = [bytes(k) for k in info.keys]
        if info.TTL <= 0 or info.grantedTTL != ttl or keys != [key.encode()]:
            return None, old
        reply = await client.refresh_lease(old)
        if reply is None or reply.TTL <= 0:  # expired in between
            return None, 0
        return old, old

    async def delete(self, key: str) -> bool:
        async with self._call() as client:
            result = await client.delete(key.encode())
        return result is not None and bool(getattr(result, "deleted", 1))

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        client = await self._open(require_leader=True)  # the stream's own, closed with it
        self._streams.add(client)
        try:
            stream = await client.watch_prefix(prefix.encode(), start_revision=start_revision)
            async for event in stream:
                kv = event.kv
                yield [
                    Event(
                        "put" if event.kind == "PUT" else "delete",
                        kv.key.decode("utf-8", "surrogateescape"),
                        bytes(kv.value) if event.kind == "PUT" else b"",
                        int(kv.mod_revision),
                        bool(kv.lease),
                        int(kv.create_revision) if event.kind == "PUT" else 0,
                    )
                ]
        except aetcd.RevisionCompactedError as e:
            raise RevisionCompacted(int(e.compacted_revision)) from None
        except FAILURES as e:
            if isinstance(e, asyncio.CancelledError) and _cancelling():
                raise
            raise self._failed(client, e, "watch") from None
        finally:
            self._streams.discard(client)
            await _close(client)

    async def close(self) -> None:
        """Close every connection, at once; a watch still running ends as a closed
        stream, and nothing opens a new one afterwards."""
        self._closed = True
        clients = [c for c in (self._client, *self._streams) if c is not None]
        self._client = None
        await asyncio.gather(*(_close(c) for c in clients))


async def _close(client: _Client) -> None:
    client.retired = True
    await _quietly(asyncio.wait_for(client.close(), CLOSE_TIMEOUT))


def _cancelling() -> bool:
    """Whether the running task is being cancelled (by its owner), as opposed to an
    awaited gRPC call ending cancelled because its channel was closed."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _entry(kv: Any) -> Entry:
    return Entry(
        kv.key.decode("utf-8", "surrogateescape"),
        bytes(kv.value),
        int(kv.mod_revision),
        bool(kv.lease),
        int(kv.create_revision),
    )


def _rpc_error(error: BaseException | None) -> grpc.aio.AioRpcError | None:
    """The gRPC error behind ``error`` (aetcd wraps the AioRpcError)."""
    while error is not None:
        if isinstance(error, grpc.aio.AioRpcError):
            return error
        error = error.__cause__
    return None


def _code(error: BaseException) -> grpc.StatusCode | None:
    rpc_error = _rpc_error(error)
    return None if rpc_error is None else rpc_error.code()


def _details(error: BaseException) -> str | None:
    rpc_error = _rpc_error(error)
    return None if rpc_error is None else rpc_error.details()


async def _quietly(call: Any) -> None:
    """Best effort (cleanup after a failure already being reported)."""
    try:
        await call
    except Exception:  # noqa: BLE001 - the original failure is what matters
        pass


def _describe(error: BaseException, endpoint: Endpoint) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        text = f"{error.code().name}: {error.details()}"
    else:
        text = (str(error) or type(error).__name__).splitlines()[0]
    if endpoint.tls and ("TSI_" in text or "SSL" in text):
        text += " (TLS handshake failed: check --etcd-cafile, --etcd-certfile, --etcd-keyfile)"
    return text
