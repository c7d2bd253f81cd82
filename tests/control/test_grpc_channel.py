"""control/grpc_channel.py and EtcdRegistry against servers that misbehave on purpose: an
HTTP/2 server made with h2 on a real loopback socket that resets streams, sends GOAWAY,
answers with garbage, never answers, stops answering pings, or refuses the TLS
handshake. Each must end the call as one RegistryError line within its deadline, never
a hang, a crash or a cancelled task; what real etcd does is tested in
test_etcd_registry.py and test_etcd_hardening.py."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import h2.config
import h2.connection
import h2.events
import pytest

from control import etcd_messages as m
from control import grpc_channel
from control.etcd_endpoints import TlsFiles, parse_endpoints
from control.etcd_registry import BACKOFF_MIN, EtcdRegistry
from control.grpc_channel import Channel, GrpcError
from control.kv import Entry, RegistryError
from tests.helpers.pki import make_pki

# What the server does with one call: (connection, stream id, path, request) -> None.
Behaviour = Callable[["Fake", int, str, bytes], Awaitable[None]]


class Fake:
    """One server connection: h2 on an asyncio stream, calls handed to ``behaviour``."""

    def __init__(self, writer: asyncio.StreamWriter, behaviour: Behaviour) -> None:
        self.writer = writer
        self.behaviour = behaviour
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.answer_pings = True
        self.paths: dict[int, str] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.bodies: dict[int, bytearray] = {}

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def reply(self, stream_id: int, message: bytes, status: int = 0, text: str = "") -> None:
        self.conn.send_headers(
            stream_id, [(":status", "200"), ("content-type", "application/grpc")]
        )
        self.conn.send_data(stream_id, m.frame(message))
        trailers = [("grpc-status", str(status))]
        if text:
            trailers.append(("grpc-message", quote(text)))
        self.conn.send_headers(stream_id, trailers, end_stream=True)
        self.flush()

    def handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.headers[event.stream_id] = dict(event.headers)
            self.paths[event.stream_id] = self.headers[event.stream_id][":path"]
            self.bodies[event.stream_id] = bytearray()
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.bodies[event.stream_id] += event.data
            message = m.unframe(self.bodies[event.stream_id], 1 << 30)
            if message is not None:
                path = self.paths[event.stream_id]
                asyncio.get_running_loop().create_task(
                    self.behaviour(self, event.stream_id, path, message)
                )


@contextlib.asynccontextmanager
async def fake_server(
    behaviour: Behaviour, tls: ssl.SSLContext | None = None, raw: bytes | None = None
) -> AsyncIterator[tuple[int, list[Fake]]]:
    """(port, its connections) of a server on 127.0.0.1; with ``raw``, one that sends
    those bytes and closes instead of speaking HTTP/2."""
    connections: list[Fake] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if raw is not None:
            writer.write(raw)
            await writer.drain()
            writer.close()
            return
        fake = Fake(writer, behaviour)
        connections.append(fake)
        fake.conn.initiate_connection()
        fake.flush()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(65536):
                if not fake.answer_pings:
                    continue  # frozen: reads, never answers
                for event in fake.conn.receive_data(data):
                    fake.handle(event)
                fake.flush()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, connections
    finally:
        server.close()
        for fake in connections:
            fake.writer.close()


async def range_answer(fake: Fake, stream_id: int, path: str, request: bytes) -> None:
    """A RangeResponse with one key and revision 42 (serialized by hand: field 1 header
    {revision 42}, field 2 KeyValue {key "k", value "v", mod_revision 7})."""
    kv = b"\x0a\x01k\x18\x07\x2a\x01v"
    fake.reply(stream_id, b"\x0a\x02\x18\x2a" + b"\x12" + bytes([len(kv)]) + kv)


async def never(fake: Fake, stream_id: int, path: str, request: bytes) -> None:
    """Accept the call, never answer it."""


def registry(port: int, **kwargs: object) -> EtcdRegistry:
    return EtcdRegistry(parse_endpoints(f"http://127.0.0.1:{port}"), **kwargs)  # type: ignore[arg-type]


def server_tls(pki: dict[str, str], client_ca: str | None = None) -> ssl.SSLContext:
    """A TLS server context with pki's certificate and ALPN h2; with client_ca, a client
    certificate from that CA is required (etcd's --client-cert-auth)."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki["cert"], pki["key"])
    if client_ca is not None:
        tls.load_verify_locations(client_ca)
        tls.verify_mode = ssl.CERT_REQUIRED
    tls.set_alpn_protocols(["h2"])
    return tls


async def get_over_tls(tls: ssl.SSLContext, cafile: str) -> tuple[int, Entry | RegistryError]:
    """One get from a fake server behind tls, trusting cafile: the server's port and the
    entry, or the RegistryError the get raised."""
    async with fake_server(range_answer, tls=tls) as (port, _):
        store = EtcdRegistry(
            parse_endpoints(f"https://127.0.0.1:{port}"), tls=TlsFiles(cafile=cafile)
        )
        try:
            entry = await store.get("k")
            assert entry is not None
            return port, entry
        except RegistryError as e:
            return port, e
        finally:
            await store.close()


async def test_an_answer_is_read_and_the_connection_reused() -> None:
    async with fake_server(range_answer) as (port, connections):
        store = registry(port)
        try:
            entry = await store.get("k")
            assert entry is not None and (entry.value, entry.mod_revision) == (b"v", 7)
            assert (await store.list_prefix("k"))[1] == 42
            assert len(connections) == 1
        finally:
            await store.close()


async def test_grpc_status_and_message_from_the_trailers() -> None:
    """etcd refusing one call (FAILED_PRECONDITION, a percent-encoded message) is that
    call's RegistryError; the connection is kept for the next."""
    calls = 0

    async def refuse_first(fake: Fake, stream_id: int, path: str, request: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            fake.conn.send_headers(
                stream_id,
                [(":status", "200"), ("grpc-status", "9"), ("grpc-message", quote("no way: ä"))],
                end_stream=True,
            )
            fake.flush()
        else:
            await range_answer(fake, stream_id, path, request)

    async with fake_server(refuse_first) as (port, connections):
        store = registry(port)
        try:
            with pytest.raises(RegistryError, match=r"FAILED_PRECONDITION: no way: ä$"):
                await store.get("k")
            assert await store.get("k") is not None
            assert len(connections) == 1
        finally:
            await store.close()


async def test_a_reset_stream_fails_its_call_only() -> None:
    resets = 0

    async def reset_first(fake: Fake, stream_id: int, path: str, request: bytes) -> None:
        nonlocal resets
        if resets == 0:
            resets += 1
            fake.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            fake.flush()
        else:
            await range_answer(fake, stream_id, path, request)

    async with fake_server(reset_first) as (port, _):
        store = registry(port)
        try:
            with pytest.raises(RegistryError, match="UNAVAILABLE: stream reset by etcd"):
                await store.get("k")
            assert await store.get("k") is not None  # a new connection, or the same: it works
        finally:
            await store.close()


async def test_goaway_ends_the_calls_it_drops_and_the_next_call_reconnects() -> None:
    async def goaway(fake: Fake, stream_id: int, path: str, request: bytes) -> None:
        if len(fake.paths) == 1 and fake is fake_list[0]:
            fake.conn.close_connection(last_stream_id=0, additional_data=b"too_many_pings")
            fake.flush()
        else:
            await range_answer(fake, stream_id, path, request)

    async with fake_server(goaway) as (port, fake_list):
        store = registry(port)
        try:
            with pytest.raises(RegistryError, match="GOAWAY.*too_many_pings"):
                await store.get("k")
            assert await store.get("k") is not None
            assert len(fake_list) == 2
        finally:
            await store.close()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Closed at once, the client may see the close or a reset (its preface unread).
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not HTTP/2|closed the connection|connection lost"),
        (b"", "etcd closed the connection|connection lost: Connection reset"),
        (b"\x00" * 9 + b"garbage" * 100, "not HTTP/2"),
    ],
    ids=["http1", "closed", "garbage"],
)
async def test_a_server_that_is_not_http2_is_one_line(raw: bytes, expected: str) -> None:
    async with fake_server(never, raw=raw) as (port, _):
        store = registry(port, timeout=2.0)
        try:
            started = time.monotonic()
            with pytest.raises(RegistryError) as failed:
                await store.get("k")
            assert time.monotonic() - started < 2.5
            assert re.search(expected, str(failed.value)) and "\n" not in str(failed.value)
        finally:
            await store.close()


async def test_a_malformed_answer_is_a_registry_error() -> None:
    async def garbage(fake: Fake, stream_id: int, path: str, request: bytes) -> None:
        fake.reply(stream_id, b"\x12\xff\xff\xff\x0f")  # kvs with a 4 GiB length

    async with fake_server(garbage) as (port, _):
        store = registry(port)
        try:
            with pytest.raises(RegistryError, match="runs past the message"):
                await store.list_prefix("k")
        finally:
            await store.close()


async def test_a_deadline_hit_ends_the_call_and_resets_its_stream() -> None:
    async with fake_server(never) as (port, connections):
        store = registry(port, timeout=0.5)
        try:
            started = time.monotonic()
            with pytest.raises(RegistryError, match="DEADLINE_EXCEEDED"):
                await store.get("k")
            took = time.monotonic() - started
            assert 0.4 < took < 1.5, took
            await asyncio.sleep(0.1)
            (fake,) = connections
            assert fake.paths  # the call was made, with its deadline in grpc-timeout
        finally:
            await store.close()


async def test_the_deadline_and_metadata_are_sent_as_headers() -> None:
    async with fake_server(range_answer) as (port, connections):
        channel = await Channel.connect("127.0.0.1", port, tls=None, timeout=2, max_receive=1000)
        try:
            answer = await channel.unary(
                "/etcdserverpb.KV/Range", m.range_request(b"k"), 2.5, (("token", "t"),)
            )
            assert m.decode_range(answer).revision == 42
        finally:
            channel.close()
            await channel.wait_closed()
    headers = connections[0].headers[1]
    assert headers[":path"] == "/etcdserverpb.KV/Range" and headers["grpc-timeout"] == "2500m"
    assert headers["content-type"] == "application/grpc" and headers["te"] == "trailers"
    assert headers["token"] == "t" and headers[":authority"] == f"127.0.0.1:{port}"


async def test_an_unanswered_ping_fails_an_open_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen etcd (SIGSTOP) keeps the TCP connection open and answers nothing: the
    watch must end by the keepalive (5 s + 3 s in production; shortened here)."""
    monkeypatch.setattr(grpc_channel, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(grpc_channel, "PING_TIMEOUT", 0.3)
    async with fake_server(never) as (port, connections):
        channel = await Channel.connect("127.0.0.1", port, tls=None, timeout=2, max_receive=1000)
        try:
            stream = channel.open_stream("/etcdserverpb.Watch/Watch", (), None)
            await stream.send(m.watch_create_request(b"/", b"0", 1))
            await asyncio.sleep(0.1)
            connections[0].answer_pings = False
            started = time.monotonic()
            with pytest.raises(GrpcError, match="keepalive ping not answered within 0.3 s"):
                await asyncio.wait_for(stream.recv(), 5)
            assert time.monotonic() - started < 1.5
            assert not channel.usable
        finally:
            channel.close()
            await channel.wait_closed()


async def test_pings_are_answered_so_an_idle_stream_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_channel, "PING_INTERVAL", 0.1)
    monkeypatch.setattr(grpc_channel, "PING_TIMEOUT", 0.3)
    async with fake_server(never) as (port, _):
        channel = await Channel.connect("127.0.0.1", port, tls=None, timeout=2, max_receive=1000)
        try:
            stream = channel.open_stream("/etcdserverpb.Watch/Watch", (), None)
            await stream.send(m.watch_create_request(b"/", b"0", 1))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stream.recv(), 1.0)
            assert channel.usable
        finally:
            channel.close()
            await channel.wait_closed()


async def test_a_refused_tls_handshake_is_one_line(tmp_path: Path) -> None:
    """The server's certificate is from another CA than --etcd-cafile."""
    theirs = make_pki(tmp_path / "theirs")
    ours = make_pki(tmp_path / "ours")
    port, failed = await get_over_tls(server_tls(theirs), ours["ca"])
    assert isinstance(failed, RegistryError)
    text = str(failed)
    assert text.startswith(f"etcd https://127.0.0.1:{port}: TLS handshake failed: ")
    assert "CERTIFICATE_VERIFY_FAILED" in text and "check --etcd-cafile" in text
    assert "\n" not in text


async def test_tls_with_the_right_ca_and_alpn_h2(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    _, entry = await get_over_tls(server_tls(pki), pki["ca"])
    assert isinstance(entry, Entry), entry


async def test_a_refused_connection_backs_off_and_fails_fast_meanwhile() -> None:
    async with fake_server(never) as (port, _):
        pass  # the port is free again: connections are refused
    store = registry(port)
    try:
        with pytest.raises(RegistryError, match="cannot connect: Connect"):
            await store.get("k")
        started = time.monotonic()
        with pytest.raises(RegistryError, match=r"next try in 0\.\d s"):
            await store.get("k")
        assert time.monotonic() - started < 0.05
        await asyncio.sleep(BACKOFF_MIN + 0.05)
        with pytest.raises(RegistryError, match="cannot connect"):
            await store.get("k")
    finally:
        await store.close()


async def test_big_messages_cross_the_flow_control_windows() -> None:
    """A 3 MB put (over HTTP/2's 64 KiB initial windows) and a 3 MB answer."""
    got: list[bytes] = []

    async def echo(fake: Fake, stream_id: int, path: str, request: bytes) -> None:
        got.append(request)
        value = b"y" * 3_000_000
        body = b"\x0a\x01k\x2a" + m._varint(len(value)) + value  # KeyValue{key, value}
        answer = b"\x12" + m._varint(len(body)) + body
        fake.conn.send_headers(
            stream_id, [(":status", "200"), ("content-type", "application/grpc")]
        )
        data = m.frame(answer)
        while data:  # within the client's windows (16 MiB), in frames the client allows
            size = min(len(data), fake.conn.max_outbound_frame_size)
            fake.conn.send_data(stream_id, data[:size])
            data = data[size:]
        fake.conn.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        fake.flush()

    async with fake_server(echo) as (port, _):
        store = registry(port)
        try:
            await store.put("k", b"x" * 3_000_000, None)
            assert len(got) == 1 and len(got[0]) > 3_000_000
            entry = await store.get("k")
            assert entry is not None and entry.value == b"y" * 3_000_000
        finally:
            await store.close()


async def test_a_client_certificate_refused_after_the_handshake_is_one_line(tmp_path: Path) -> None:
    """With TLS 1.3 the server checks the client's certificate after the client's side of
    the handshake is done (etcd with --client-cert-auth and a client without one): the
    refusal arrives as an alert at the first read, and is still a handshake failure."""
    pki = make_pki(tmp_path / "pki")
    _, failed = await get_over_tls(server_tls(pki, client_ca=pki["ca"]), pki["ca"])
    assert isinstance(failed, RegistryError)
    text = str(failed)
    # Python's server closes without an alert; etcd (Go) sends one, which names the cause.
    assert "TLS handshake failed" in text and "client certificate" in text, text
    assert "check --etcd-cafile" in text and "\n" not in text
