"""The etcd v3 registry (aetcd over gRPC), behind the same KeyValueStore interface.

A thin adapter: flannel's semantics live in SubnetManager. What this adds is what the
raw client lacks: several endpoints tried in turn, TLS with client certificates, gRPC
keepalive pings so a frozen etcd is noticed within seconds, a deadline on every call, and
errors translated to RegistryError / RevisionCompacted.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# gRPC's C core logs its own lines to stderr (a refused TLS handshake prints several):
# they would break "one error line" and duplicate what RegistryError already says.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import aetcd  # noqa: E402 - after GRPC_VERBOSITY, which the C core reads at import
import grpc  # noqa: E402

from control.kv import Entry, Event, RegistryError, RevisionCompacted  # noqa: E402

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
# of its own with the backoff capped at 5 s reconnects as soon as etcd is back.
RECONNECT = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 5000,
}
CALL_TIMEOUT = 5


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


def parse_endpoints(text: str) -> list[Endpoint]:
    """flanneld's --etcd-endpoints: comma-separated URLs (http:// or https://)."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"etcd endpoint {item!r}: expected http(s)://host:port")
        try:
            port = url.port or 2379
        except ValueError:
            raise ValueError(f"etcd endpoint {item!r}: bad port") from None
        endpoints.append(Endpoint(url.hostname, port, url.scheme == "https"))
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


@dataclass(frozen=True)
class TlsFiles:
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise RegistryError(f"cannot read etcd {what} {path}: {e.strerror}") from None

        if (self.certfile is None) != (self.keyfile is None):
            raise RegistryError("--etcd-certfile and --etcd-keyfile go together")
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.cafile, "CA file"),
            private_key=read(self.keyfile, "key file"),
            certificate_chain=read(self.certfile, "certificate file"),
        )


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd.Client with TLS: aetcd only builds insecure channels, so connect() is redone
    here with a secure channel when credentials are given (the rest mirrors aetcd 1.0)."""

    def __init__(
        self, *args: Any, credentials: grpc.ChannelCredentials | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None:
            await super().connect()
            return
        if self._connected.is_set():
            return
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


class EtcdRegistry:
    """A :class:`control.kv.KeyValueStore` on etcd v3."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        *,
        tls: TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        self.endpoints = endpoints
        self.tls = tls or TlsFiles()
        self.username = username
        self.password = password
        self.timeout = timeout
        self._index = 0
        self._client: _Client | None = None
        self._lock = asyncio.Lock()

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self._index]

    async def _connected(self) -> _Client:
        async with self._lock:
            if self._client is not None:
                return self._client
            endpoint = self.endpoint
            credentials = None
            if endpoint.tls or self.tls.cafile or self.tls.certfile:
                credentials = self.tls.credentials()
            client = _Client(
                host=endpoint.host,
                port=endpoint.port,
                username=self.username,
                password=self.password,
                timeout=self.timeout,
                options={**KEEPALIVE, **RECONNECT},
                credentials=credentials,
            )
            try:
                await client.connect()
            except aetcd.ClientError as e:
                await self._drop(client)
                raise RegistryError(f"etcd {endpoint}: {_describe(e, endpoint)}") from None
            self._client = client
            return client

    async def _drop(self, client: _Client | None) -> None:
        """Forget a broken connection and move on to the next endpoint."""
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - closing a broken channel may fail any way
                pass
        if client is self._client or self._client is None:
            self._client = None
            self._index = (self._index + 1) % len(self.endpoints)

    async def _failed(self, client: _Client, error: Exception) -> RegistryError:
        endpoint = self.endpoint
        if isinstance(error, aetcd.ClientError | grpc.aio.AioRpcError | OSError):
            await self._drop(client)
        return RegistryError(f"etcd {endpoint}: {_describe(error, endpoint)}")

    # -- KeyValueStore -------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        client = await self._connected()
        try:
            kv = await client.get(key.encode())
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            raise await self._failed(client, e) from None
        return None if kv is None else _entry(kv)

    async def list_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        client = await self._connected()
        try:
            result = await client.get_prefix(prefix.encode())
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            raise await self._failed(client, e) from None
        return [_entry(kv) for kv in result], int(result.header.revision)

    async def _lease_id(self, client: _Client, ttl: int | None) -> Any:
        return None if ttl is None else await client.lease(ttl)

    async def create(self, key: str, value: bytes, ttl: int | None) -> bool:
        client = await self._connected()
        try:
            lease = await self._lease_id(client, ttl)
            succeeded, _ = await client.transaction(
                compare=[client.transactions.version(key.encode()) == 0],
                success=[client.transactions.put(key.encode(), value, lease)],
                failure=[],
            )
            if not succeeded and lease is not None:
                await lease.revoke()
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            raise await self._failed(client, e) from None
        return bool(succeeded)

    async def put(self, key: str, value: bytes, ttl: int | None) -> None:
        client = await self._connected()
        try:
            lease = await self._lease_id(client, ttl)
            await client.put(key.encode(), value, lease=lease)
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            raise await self._failed(client, e) from None

    async def delete(self, key: str) -> bool:
        client = await self._connected()
        try:
            result = await client.delete(key.encode())
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            raise await self._failed(client, e) from None
        return result is not None and bool(getattr(result, "deleted", 1))

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        client = await self._connected()
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
                    )
                ]
        except aetcd.RevisionCompactedError as e:
            raise RevisionCompacted(int(e.compacted_revision)) from None
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            raise await self._failed(client, e) from None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001
                pass


def _entry(kv: Any) -> Entry:
    return Entry(
        kv.key.decode("utf-8", "surrogateescape"),
        bytes(kv.value),
        int(kv.mod_revision),
        bool(kv.lease),
    )


def _describe(error: Exception, endpoint: Endpoint) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        text = f"{error.code().name}: {error.details()}"
    else:
        text = (str(error) or type(error).__name__).splitlines()[0]
    if endpoint.tls and ("TSI_" in text or "SSL" in text):
        text += " (TLS handshake failed: check --etcd-cafile, --etcd-certfile, --etcd-keyfile)"
    return text
