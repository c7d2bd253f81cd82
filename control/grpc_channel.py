"""gRPC over one HTTP/2 connection, with the pure-Python ``h2`` state machine on asyncio
streams: what the etcd registry needs of gRPC and no more.

Unary calls and bidirectional streams, each with a deadline (sent as ``grpc-timeout`` and
kept locally); gRPC's status from the trailers (or a trailers-only answer, an HTTP
status, a reset stream) as a GrpcError; TLS by the ssl module with ALPN "h2"; an HTTP/2
PING every 5 s while a stream is open, and the connection given up when one is not
answered within 3 s (a SIGSTOPped etcd ends the watch within ~8 s; etcd's gRPC server
answers faster pings with GOAWAY, and pings without a stream count against us); receive
windows of 16 MiB so big listings are not held back a frame at a time. A GOAWAY lets the
streams it keeps finish and opens none; anything that is not HTTP/2 fails the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections import deque
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from control.etcd_messages import MalformedMessage, MessageTooLarge, frame, unframe
from control.kv import RegistryError

PING_INTERVAL = 5.0
PING_TIMEOUT = 3.0
WINDOW = 16 * 1024 * 1024
READ_SIZE = 256 * 1024

# gRPC's status codes (grpc/status.proto), by number.
CODES = (
    "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS "
    "PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE "
    "UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS UNAUTHENTICATED"
).split()
CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE = 1, 4, 8, 13, 14
# What an HTTP status without grpc-status means (gRPC's http-grpc-status-mapping.md).
HTTP_CODES = {400: INTERNAL, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
# What a reset stream means (gRPC's PROTOCOL-HTTP2.md); any other code: INTERNAL.
RESET_CODES = {
    h2.errors.ErrorCodes.REFUSED_STREAM: UNAVAILABLE,
    h2.errors.ErrorCodes.CANCEL: CANCELLED,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED,
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: 7,
}


class GrpcError(RegistryError):
    """A call ended with a gRPC status other than OK (or the connection under it broke)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        name = CODES[code] if 0 <= code < len(CODES) else f"code {code}"
        super().__init__(f"{name}: {message}")


class Stream:
    """One gRPC call: messages in, messages out, a status at the end."""

    def __init__(self, channel: Channel, stream_id: int, limit: int) -> None:
        self.channel = channel
        self.id = stream_id
        self.limit = limit
        self.buffer = bytearray()
        self.messages: deque[bytes] = deque()
        self.changed = asyncio.Event()
        self.error: RegistryError | None = None
        self.done = False  # ended with status OK

    def _wake(self) -> None:
        self.changed.set()

    async def recv(self) -> bytes | None:
        """The next message; None once the call ended with status OK."""
        while True:
            if self.messages:
                return self.messages.popleft()
            if self.error is not None:
                raise self.error
            if self.done:
                return None
            self.changed.clear()
            await self.changed.wait()

    async def send(self, message: bytes, *, end: bool = False) -> None:
        await self.channel._send_data(self, frame(message), end)

    def cancel(self) -> None:
        """Reset the stream (a deadline hit, a watch closed); the connection stays."""
        self.channel._reset(self)


class Channel:
    """One HTTP/2 connection to one etcd endpoint; connect() makes it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        authority: str,
        scheme: str,
        max_receive: int,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.authority = authority
        self.scheme = scheme
        self.max_receive = max_receive
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.streams: dict[int, Stream] = {}
        self.error: RegistryError | None = None  # why the connection is gone
        self.draining = False  # GOAWAY received: no new streams
        self.settled = asyncio.Event()  # the server's SETTINGS arrived
        self.window = asyncio.Event()  # a send window grew
        self.pong = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        timeout: float,
        max_receive: int,
    ) -> Channel:
        """Connect, shake hands (TLS, then HTTP/2's preface and SETTINGS), all within
        ``timeout``; OSError, ssl.SSLError or GrpcError when that fails."""
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls, server_hostname=host if tls else None, limit=READ_SIZE
            )
        channel = cls(
            reader,
            writer,
            authority=authority,
            scheme="https" if tls else "http",
            max_receive=max_receive,
        )
        try:
            if tls is not None:
                ssl_object = writer.get_extra_info("ssl_object")
                if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
                    raise GrpcError(UNAVAILABLE, "the server did not agree to HTTP/2 (ALPN h2)")
            channel._start()
            async with asyncio.timeout(timeout):
                await channel.settled.wait()
        except TimeoutError:
            channel.close()
            raise GrpcError(UNAVAILABLE, "no HTTP/2 SETTINGS from the server in time") from None
        except BaseException:
            channel.close()
            raise
        if channel.error is not None:
            raise channel.error
        return channel

    def _start(self) -> None:
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(WINDOW)
        self._flush()
        self._tasks = [
            asyncio.create_task(self._read(), name="grpc-read"),
            asyncio.create_task(self._keepalive(), name="grpc-keepalive"),
        ]

    @property
    def usable(self) -> bool:
        return self.error is None and not self.draining

    # -- calls ------------------------------------------------------------------------------

    def open_stream(
        self, method: str, metadata: tuple[tuple[str, str], ...], timeout: float | None
    ) -> Stream:
        """Start a call to ``method`` (``/package.Service/Method``)."""
        if self.error is not None:
            raise self.error
        if self.draining:
            raise GrpcError(UNAVAILABLE, "the connection is closing (GOAWAY)")
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", self.scheme),
            (":path", method),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", f"{max(1, int(timeout * 1000))}m"))
        headers.extend(metadata)
        stream = Stream(self, stream_id, self.max_receive)
        self.streams[stream_id] = stream
        try:
            self.conn.send_headers(stream_id, headers)
        except h2.exceptions.H2Error as e:
            self.streams.pop(stream_id, None)
            raise GrpcError(UNAVAILABLE, f"cannot start a call ({type(e).__name__})") from None
        self._flush()
        return stream

    async def unary(
        self,
        method: str,
        request: bytes,
        timeout: float,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        """One request, one answer, within ``timeout`` seconds."""
        stream = self.open_stream(method, metadata, timeout)
        try:
            async with asyncio.timeout(timeout):
                await stream.send(request, end=True)
                answer = await stream.recv()
                if answer is None:
                    raise GrpcError(INTERNAL, f"no answer to {method}")
                while await stream.recv() is not None:  # until the status
                    pass
        except TimeoutError:
            stream.cancel()
            raise GrpcError(
                DEADLINE_EXCEEDED, f"no answer within {timeout:g} s (deadline exceeded)"
            ) from None
        except BaseException:
            stream.cancel()
            raise
        finally:
            self.streams.pop(stream.id, None)
        return answer

    # -- sending ----------------------------------------------------------------------------

    async def _send_data(self, stream: Stream, data: bytes, end: bool) -> None:
        """Send within HTTP/2's flow control: as much as the windows allow, then wait for
        the server to open them."""
        view = memoryview(data)
        while True:
            if stream.error is not None:
                raise stream.error
            try:
                size = min(
                    len(view),
                    self.conn.local_flow_control_window(stream.id),
                    self.conn.max_outbound_frame_size,
                )
                last = size == len(view)
                if size > 0 or not view:
                    self.conn.send_data(stream.id, bytes(view[:size]), end_stream=end and last)
            except h2.exceptions.H2Error as e:  # reset or closed under us
                raise stream.error or GrpcError(
                    UNAVAILABLE, f"the stream closed while sending ({type(e).__name__})"
                ) from None
            if size > 0 or not view:
                self._flush()
                view = view[size:]
                if last:
                    return
                continue
            self.window.clear()
            waiter = asyncio.create_task(self.window.wait())
            stream_wait = asyncio.create_task(stream.changed.wait())
            try:
                await asyncio.wait([waiter, stream_wait], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stream_wait.cancel()

    def _reset(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        if self.error is None:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.reset_stream(stream.id, h2.errors.ErrorCodes.CANCEL)
                self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    # -- receiving --------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    if self.scheme == "https" and not self.settled.is_set():
                        raise GrpcError(
                            UNAVAILABLE,
                            "TLS handshake failed: the server closed the connection before "
                            "HTTP/2 began (a client certificate missing or refused?)",
                        )
                    raise GrpcError(UNAVAILABLE, "etcd closed the connection")
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.H2Error as e:
                    raise GrpcError(
                        UNAVAILABLE, f"etcd's answer is not HTTP/2 ({type(e).__name__})"
                    ) from None
                for event in events:
                    self._handle(event)
                self._flush()
        except RegistryError as e:
            self._fail(e)
        except ssl.SSLError as e:
            # With TLS 1.3 the server checks our certificate after the client's side of
            # the handshake is done: its refusal is read here, as an alert.
            what = "TLS failed" if self.settled.is_set() else "TLS handshake failed"
            self._fail(GrpcError(UNAVAILABLE, f"{what}: {e.reason or _os_text(e)}"))
        except (OSError, EOFError) as e:
            self._fail(GrpcError(UNAVAILABLE, f"connection lost: {_os_text(e)}"))
        except Exception as e:  # noqa: BLE001 - whatever it was, no call may hang on it
            self._fail(GrpcError(INTERNAL, f"connection failed: {type(e).__name__}: {e}"))

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settled.set()
            self.window.set()
        elif isinstance(event, h2.events.WindowUpdated):
            self.window.set()
        elif isinstance(event, h2.events.PingAckReceived):
            self.pong.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(event)
        elif isinstance(event, (h2.events.StreamReset, h2.events.StreamEnded)):
            self._stream_closed(event)
        elif isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            self._headers(event)

    def _data(self, event: h2.events.DataReceived) -> None:
        assert event.stream_id is not None and event.data is not None
        self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.error is not None:
            return
        stream.buffer += event.data
        try:
            while (message := unframe(stream.buffer, stream.limit)) is not None:
                stream.messages.append(message)
        except MessageTooLarge as e:
            self._end(stream, GrpcError(RESOURCE_EXHAUSTED, str(e)))
            self._reset(stream)
        except MalformedMessage as e:
            self._end(stream, GrpcError(INTERNAL, str(e)))
            self._reset(stream)
        stream._wake()

    def _headers(self, event: h2.events.ResponseReceived | h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if stream is None:
            return
        headers = {
            bytes(k).decode("ascii", "replace"): bytes(v).decode("utf-8", "replace")
            for k, v in event.headers or ()
        }
        status = headers.get(":status")
        if status is not None and status != "200":
            code = HTTP_CODES.get(int(status) if status.isdigit() else 0, 2)
            self._end(stream, GrpcError(code, f"HTTP status {status}"))
        elif "grpc-status" in headers:
            raw = headers["grpc-status"]
            code = int(raw) if raw.isdigit() else 2
            message = unquote(headers.get("grpc-message", ""))
            self._end(stream, None if code == 0 else GrpcError(code, message or CODES[2]))
        elif status is not None and not headers.get("content-type", "").startswith(
            "application/grpc"
        ):
            self._end(stream, GrpcError(2, "the answer is not gRPC (content-type)"))

    def _stream_closed(self, event: h2.events.StreamReset | h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if stream is None or stream.done or stream.error is not None:
            return
        if isinstance(event, h2.events.StreamReset):
            code = RESET_CODES.get(event.error_code, INTERNAL)  # type: ignore[call-overload]
            self._end(stream, GrpcError(code, f"stream reset by etcd ({event.error_code})"))
        else:
            self._end(stream, GrpcError(INTERNAL, "the stream ended without a gRPC status"))

    def _end(self, stream: Stream, error: RegistryError | None) -> None:
        if stream.done or stream.error is not None:
            return
        if error is None:
            if stream.buffer:
                error = GrpcError(INTERNAL, "the stream ended inside a message")
            else:
                stream.done = True
        stream.error = error
        stream._wake()

    def _goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.draining = True
        last = event.last_stream_id or 0
        why = f"etcd closed the connection (GOAWAY {event.error_code})"
        if event.additional_data:
            why += f": {event.additional_data.decode('utf-8', 'replace')[:200]}"
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last:
                self._end(stream, GrpcError(UNAVAILABLE, why))

    def _fail(self, error: RegistryError) -> None:
        """The connection is gone: every call on it ends with ``error``."""
        if self.error is None:
            self.error = error
        for stream in list(self.streams.values()):
            self._end(stream, self.error)
        self.window.set()
        self.settled.set()
        self._close_transport()

    async def _keepalive(self) -> None:
        while self.error is None:
            await asyncio.sleep(PING_INTERVAL)
            if self.error is not None or not self.streams:
                continue  # etcd counts pings without a stream as abuse
            self.pong.clear()
            try:
                self.conn.ping(os.urandom(8))
            except h2.exceptions.H2Error:
                return
            self._flush()
            try:
                async with asyncio.timeout(PING_TIMEOUT):
                    await self.pong.wait()
            except TimeoutError:
                self._fail(
                    GrpcError(UNAVAILABLE, f"keepalive ping not answered within {PING_TIMEOUT:g} s")
                )

    # -- closing ----------------------------------------------------------------------------

    def _close_transport(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    def close(self) -> None:
        """Close at once: calls still on it end with a GrpcError (CANCELLED)."""
        if self.error is None:
            with contextlib.suppress(Exception):
                self.conn.close_connection()
                self._flush()
        self._fail(GrpcError(CANCELLED, "the connection was closed"))
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


def _os_text(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
