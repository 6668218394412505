"""The upstream side's HTTP/2: one multiplexed connection per origin (h2 by TLS ALPN, or h2c
with prior knowledge), streams sent and read concurrently, trailers kept for the app.

A connection that ends (closed, or ``GOAWAY``) is replaced by the next exchange. A stream the
upstream did not process (above a ``GOAWAY``'s last stream id, or reset ``REFUSED_STREAM``) is
sent again on a new connection when its body can be: bytes, or a stream whose first bytes sent
are still held (``_REPLAY_BYTES``). Errors leave as the ``UpstreamError`` family, naming the
route and upstream, as in ``upstream``.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Protocol, cast

from aiohttp import StreamReader
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame
from multidict import CIMultiDict, CIMultiDictProxy

from ..errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)
from ..log import server_log
from ..tasks import spawn
from ..wire import HttpVersion11, RawResponseMessage
from .upstream import _DEFAULT_TLS, Answer, Body, Origin, Timeouts, reason_phrase

_STREAM_WINDOW = 1024 * 1024  # answer bytes one stream may send before the app reads them
_CONNECTION_WINDOW = 16 * 1024 * 1024
_READ_LIMIT = 2**16
_REPLAY_BYTES = 1024 * 1024  # of a streamed body, held to send again on a refused stream
_SWEEP_S = 0.1
# Connection-specific fields (RFC 9113 §8.2.2) and what the pseudo-headers say instead.
_NOT_ON_H2 = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "te"}
)


class _GracefulH2Connection(H2Connection):
    """``h2`` closes its state machine on any GOAWAY, refusing every later frame; RFC 9113
    §6.8 lets the streams up to its last stream id finish. After a graceful one (NO_ERROR) the
    connection stays open to them; no new stream is opened on it (``usable``)."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == ErrorCodes.NO_ERROR:
            self.state_machine.state = ConnectionState.CLIENT_OPEN
        return frames, events


class NoH2(UpstreamProtocolError):
    """ALPN chose another protocol than h2; on an ``auto`` route, HTTP/1.1 takes the request."""


class _Refused(UpstreamProtocolError):
    """The upstream did not process the stream: safe to send again."""


class Acknowledging(Protocol):
    def acknowledge(self, stream_id: int, size: int) -> None: ...


class StreamFlow:
    """What a body ``StreamReader`` pauses and resumes (an answer's here, a request's on the
    app side): whether the stream's received bytes are acknowledged (WINDOW_UPDATE) as they
    arrive, or held until the reader takes them."""

    __slots__ = ("_connection", "_stream_id", "_reading_paused", "_unacknowledged", "connected")

    def __init__(self, connection: Acknowledging, stream_id: int) -> None:
        self._connection = connection
        self._stream_id = stream_id
        self._reading_paused = False
        self._unacknowledged = 0
        self.connected = True

    def received(self, size: int) -> None:
        if self._reading_paused:
            self._unacknowledged += size
        elif size:
            self._connection.acknowledge(self._stream_id, size)

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            self._reading_paused = False
            size, self._unacknowledged = self._unacknowledged, 0
            if size:
                self._connection.acknowledge(self._stream_id, size)


class _Stream:
    __slots__ = (
        "id", "answer", "body", "flow", "trailers", "where", "deadline", "idle_s", "last_active",
        "window", "streams_outlive", "sender", "held", "held_bytes", "ended",
    )  # fmt: skip

    def __init__(
        self,
        connection: _H2Connection,
        stream_id: int,
        where: str,
        deadline: float,
        timeouts: Timeouts,
    ) -> None:
        loop = connection.loop
        self.id = stream_id
        self.answer: asyncio.Future[RawResponseMessage] = loop.create_future()
        self.flow = StreamFlow(connection, stream_id)
        self.body = StreamReader(self.flow, _READ_LIMIT, loop=loop)  # type: ignore[arg-type]
        self.trailers: tuple[tuple[bytes, bytes], ...] = ()
        self.where = where
        self.deadline = deadline
        self.idle_s = timeouts.idle_s
        self.streams_outlive = timeouts.streams_outlive_total
        self.last_active = loop.time()
        self.window = asyncio.Event()  # set when the send window may have opened
        self.sender: asyncio.Task[None] | None = None
        self.held: list[bytes] | None = []  # streamed body bytes sent, while replayable
        self.held_bytes = 0
        self.ended = False  # the answer was read to its end, or the stream failed

    def fail(self, error: UpstreamError) -> None:
        self.ended = True
        self.window.set()
        if not self.answer.done():
            self.answer.set_exception(error)
        elif not self.body.is_eof():
            self.body.set_exception(error)


class H2Answer(Answer):
    """An answer on an HTTP/2 stream; ``release`` resets the stream if it was not read to its
    end (the connection and its other streams go on)."""

    __slots__ = ("_stream", "_owner")

    def __init__(self, message: RawResponseMessage, stream: _Stream, owner: _H2Connection) -> None:
        self.message = message
        self.body = stream.body
        self._stream = stream
        self._owner = owner

    @property
    def trailers(self) -> tuple[tuple[bytes, bytes], ...]:
        return self._stream.trailers

    def release(self) -> None:
        self._owner.release(self._stream)


class _H2Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int, int]) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.conn = _GracefulH2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        self.streams: dict[int, _Stream] = {}
        self.usable = True  # no GOAWAY, not closed: new streams may open here
        self.slot = asyncio.Event()  # set when a stream closes (max concurrent streams)
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self.flush()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def writable(self) -> None:
        await self._writable.wait()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def has_room(self) -> bool:
        return self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams

    def open(
        self,
        headers: list[tuple[bytes, bytes]],
        end: bool,
        where: str,
        deadline: float,
        timeouts: Timeouts,
    ) -> _Stream:
        stream_id = self.conn.get_next_available_stream_id()
        stream = _Stream(self, stream_id, where, deadline, timeouts)
        self.streams[stream_id] = stream
        self.conn.send_headers(stream_id, headers, end_stream=end)
        self.flush()
        return stream

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            self._fail_all(UpstreamProtocolError(f"HTTP/2 protocol error: {type(exc).__name__}"))
            self.flush()
            self._close()
            return
        now = self.loop.time()
        for event in events:
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if stream is not None:
                stream.last_active = now
            if isinstance(event, ResponseReceived) and stream is not None:
                self._answered(stream, event.headers or [])
            elif isinstance(event, DataReceived):
                size = event.flow_controlled_length or 0
                if stream is None or stream.ended:
                    if size:
                        self.acknowledge(event.stream_id, size)
                    continue
                if event.data:
                    stream.body.feed_data(bytes(event.data))
                stream.flow.received(size)
            elif isinstance(event, TrailersReceived) and stream is not None:
                stream.trailers = tuple((bytes(n), bytes(v)) for n, v in event.headers or ())
            elif isinstance(event, StreamEnded) and stream is not None:
                stream.ended = True
                if not stream.answer.done():
                    stream.answer.set_exception(
                        UpstreamProtocolError(f"{stream.where}: stream ended without an answer")
                    )
                stream.body.feed_eof()
                self._forget(stream.id)
            elif isinstance(event, StreamReset) and stream is not None:
                refused = event.error_code == ErrorCodes.REFUSED_STREAM
                kind = _Refused if refused and not stream.answer.done() else UpstreamProtocolError
                stream.fail(
                    kind(f"{stream.where}: stream reset by the upstream ({event.error_code!s})")
                )
                self._forget(stream.id)
            elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
                targets = [stream] if stream is not None else list(self.streams.values())
                for target in targets:
                    target.window.set()
                if isinstance(event, RemoteSettingsChanged):
                    self.slot.set()
            elif isinstance(event, ConnectionTerminated):
                self.usable = False
                last = event.last_stream_id if event.last_stream_id is not None else 2**31
                for stream_id, unprocessed in list(self.streams.items()):
                    if stream_id > last:  # never processed: safe to send again elsewhere
                        unprocessed.fail(_Refused(f"{unprocessed.where}: GOAWAY before it"))
                        self._forget(stream_id)
                self.slot.set()
        self.flush()
        if not self.usable and not self.streams:
            self._close()

    def _answered(self, stream: _Stream, raw: list[tuple[bytes, bytes]]) -> None:
        status = 0
        fields: list[tuple[bytes, bytes]] = []
        for name, value in raw:
            if name == b":status":
                status = int(value)
            elif not name.startswith(b":"):
                fields.append((bytes(name), bytes(value)))
        headers = CIMultiDict(
            (n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in fields
        )
        if stream.streams_outlive and headers.get("content-type", "").startswith(
            ("text/event-stream", "application/grpc")
        ):
            stream.deadline = math.inf  # idle_s alone bounds a stream
        message = RawResponseMessage(
            HttpVersion11, status, reason_phrase(status), CIMultiDictProxy(headers),
            tuple(fields), False, None, False, False,
        )  # fmt: skip
        if not stream.answer.done():
            stream.answer.set_result(message)

    def acknowledge(self, stream_id: int, size: int) -> None:
        try:
            self.conn.acknowledge_received_data(size, stream_id)
        except (StreamClosedError, ProtocolError):
            pass
        self.flush()

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.slot.set()

    def release(self, stream: _Stream) -> None:
        """Done with the answer: a stream not read to its end is reset."""
        if stream.sender is not None:
            stream.sender.cancel()
        if not stream.ended or not stream.body.is_eof():
            stream.ended = True
            try:
                self.conn.reset_stream(stream.id, ErrorCodes.CANCEL)
            except (StreamClosedError, ProtocolError):
                pass
            self._forget(stream.id)
            self.flush()
        if not self.usable and not self.streams:
            self._close()

    def check_timeouts(self, now: float) -> None:
        for stream in list(self.streams.values()):
            if now >= stream.deadline:
                error = f"{stream.where}: no complete answer in time (total_s)"
            elif not stream.flow._reading_paused and now - stream.last_active >= stream.idle_s:
                error = f"{stream.where}: silent for {stream.idle_s:g}s (idle_s)"
            else:
                continue
            stream.fail(UpstreamTimeout(error))
            self.release(stream)

    def _fail_all(self, error: UpstreamError) -> None:
        self.usable = False
        for stream in list(self.streams.values()):
            stream.fail(type(error)(f"{stream.where}: {error}"))
        self.streams.clear()
        self.slot.set()

    def _close(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._writable.set()
        self._fail_all(UpstreamProtocolError("connection closed"))


class H2Upstreams:
    """One HTTP/2 connection per origin and TLS context, opened on demand and replaced when it
    ends; exchanges wait for a stream slot when the upstream's limit is reached."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, int, int], _H2Connection] = {}
        self._connecting: dict[tuple[str, int, int], asyncio.Future[_H2Connection]] = {}
        self._sweep: asyncio.Task[None] | None = None
        self._live: set[_H2Connection] = set()  # replaced ones included, until they close
        self._http1: set[tuple[str, int, int]] = set()  # origins whose ALPN did not choose h2
        self.opened = 0  # connections opened so far: what tests and metrics read

    async def _sweep_every(self, interval_s: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            now = loop.time()
            for connection in list(self._live):
                if connection.transport is None and not connection.streams:
                    self._live.discard(connection)
                else:
                    connection.check_timeouts(now)

    def may_speak_h2(self, origin: Origin, tls: ssl.SSLContext | bool) -> bool:
        """False once this origin's ALPN chose HTTP/1.1 (an ``auto`` route asks first)."""
        return (origin.host, origin.port, id(_context(origin, tls))) not in self._http1

    async def exchange(
        self,
        origin: Origin,
        tls: ssl.SSLContext | bool,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: Body,
        *,
        timeouts: Timeouts,
        where: str,
        fallback: bool = False,
        trailers: Callable[[], list[tuple[bytes, bytes]]] | None = None,
    ) -> H2Answer:
        """Send one request on a stream and await its answer's head; the body (if it streams)
        goes on sending while the answer is read (bidirectional streams)."""
        loop = asyncio.get_running_loop()
        if self._sweep is None:
            self._sweep = spawn(self._sweep_every(_SWEEP_S), name="h2-upstream-timeouts")
        deadline = loop.time() + timeouts.total_s
        context = _context(origin, tls)
        fields = _request_fields(method, target, origin, headers, body)
        replay: list[bytes] = []
        rest: Body = body
        while True:
            connection = await self._connection(loop, origin, context, timeouts, where, fallback)
            try:
                async with asyncio.timeout_at(deadline):
                    while not connection.has_room() and connection.usable:
                        connection.slot.clear()
                        await connection.slot.wait()
            except TimeoutError:
                raise UpstreamTimeout(f"{where}: no free stream in time (total_s)") from None
            if not connection.usable:
                continue
            now_body = _joined(replay, rest) if replay else rest
            try:
                stream = connection.open(fields, now_body is None, where, deadline, timeouts)
            except ProtocolError as exc:
                raise UpstreamProtocolError(f"{where}: cannot open a stream: {exc}") from None
            if now_body is not None:
                stream.sender = spawn(
                    _send_body(connection, stream, now_body, trailers),
                    name=f"h2-upstream-body-{stream.id}",
                )
            try:
                message = await stream.answer
            except _Refused as exc:
                server_log.info("%s; sending it again", exc)
                held = stream.held
                if stream.sender is not None:
                    stream.sender.cancel()
                    try:
                        await stream.sender
                    except (asyncio.CancelledError, Exception):  # noqa: S110 - cancelled on purpose
                        pass
                if isinstance(body, bytes) or body is None:
                    continue
                if held is None or not isinstance(body, StreamReader):
                    raise  # more was sent than is held, or an encoder's state is spent
                replay, rest = held, body
                continue
            except BaseException:
                connection.release(stream)
                raise
            return H2Answer(message, stream, connection)

    async def _connection(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: Origin,
        context: ssl.SSLContext | None,
        timeouts: Timeouts,
        where: str,
        fallback: bool = False,
    ) -> _H2Connection:
        key = (origin.host, origin.port, id(context))
        connection = self._connections.get(key)
        if connection is not None and connection.usable and connection.transport is not None:
            return connection
        pending = self._connecting.get(key)
        if pending is None:  # one connect per origin however many exchanges wait for it
            pending = loop.create_future()
            self._connecting[key] = pending
            try:
                connection = await self._connect(loop, key, origin, context, timeouts, where)
            except BaseException as exc:
                if isinstance(exc, NoH2) and fallback:
                    self._http1.add(key)
                pending.set_exception(exc)
                pending.exception()  # retrieved: waiters re-raise it
                raise
            finally:
                del self._connecting[key]
            self._connections[key] = connection
            self._live.add(connection)
            self.opened += 1
            pending.set_result(connection)
            return connection
        return await asyncio.shield(pending)

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        key: tuple[str, int, int],
        origin: Origin,
        context: ssl.SSLContext | None,
        timeouts: Timeouts,
        where: str,
    ) -> _H2Connection:
        try:
            async with asyncio.timeout(timeouts.connect_s):
                transport, connection = await loop.create_connection(
                    lambda: _H2Connection(loop, key),
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(f"{where}: no connection in {timeouts.connect_s:g}s") from None
        except ssl.SSLError as exc:
            raise UpstreamTLSError(f"{where}: TLS failed: {exc}") from None
        except OSError as exc:
            raise UpstreamConnectError(f"{where}: cannot connect: {exc}") from None
        if context is not None:
            chosen = transport.get_extra_info("ssl_object").selected_alpn_protocol()
            if chosen != "h2":
                transport.close()
                raise NoH2(
                    f"{where}: the upstream did not choose HTTP/2 by ALPN ({chosen or 'none'}); "
                    "say upstream_protocol: http1.1 for it"
                )
        return connection

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        for connection in self._live:
            connection._close()
        self._connections.clear()
        self._live.clear()


def _context(origin: Origin, tls: ssl.SSLContext | bool) -> ssl.SSLContext | None:
    return (tls if isinstance(tls, ssl.SSLContext) else _DEFAULT_TLS) if origin.tls else None


def _request_fields(
    method: str, target: str, origin: Origin, headers: CIMultiDict[str], body: Body
) -> list[tuple[bytes, bytes]]:
    fields = [
        (b":method", method.encode("ascii")),
        (b":scheme", b"https" if origin.tls else b"http"),
        (b":authority", origin.host_header.encode("ascii")),
        (b":path", target.encode("utf-8", "surrogateescape")),
    ]
    for name, value in headers.items():
        lower = name.lower()
        if lower in _NOT_ON_H2 or (lower == "content-length" and isinstance(body, bytes)):
            continue
        if "\r" in value or "\n" in value or "\0" in value:  # would forge fields
            raise ValueError("a header value contains a line break")
        fields.append((lower.encode("latin-1"), value.encode("utf-8", "surrogateescape")))
    if isinstance(body, bytes):
        fields.append((b"content-length", b"%d" % len(body)))
    fields.append((b"te", b"trailers"))  # credproxy relays trailers (gRPC needs them)
    return fields


async def _joined(first: list[bytes], rest: Body) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    if isinstance(rest, bytes):
        yield rest
    elif rest is not None:
        chunks = rest.iter_any() if isinstance(rest, StreamReader) else rest
        async for chunk in chunks:
            yield chunk


async def _send_body(
    connection: _H2Connection,
    stream: _Stream,
    body: Body,
    trailers: Callable[[], list[tuple[bytes, bytes]]] | None = None,
) -> None:
    """The request body within the stream's and connection's send windows; held for a replay
    while small. Errors reading the app's body reset the stream (the app's answer tells)."""
    conn = connection.conn
    chunks: AsyncIterable[bytes]
    if isinstance(body, bytes):
        stream.held = None
        chunks = _joined([body], None)
    elif isinstance(body, StreamReader):
        chunks = body.iter_any()
    else:
        assert body is not None
        chunks = body
    try:
        async for chunk in chunks:
            if stream.held is not None:
                stream.held.append(chunk)
                stream.held_bytes += len(chunk)
                if stream.held_bytes > _REPLAY_BYTES:
                    stream.held = None
            view = memoryview(chunk)
            while view:
                if stream.ended or connection.transport is None:
                    return
                window = min(
                    conn.local_flow_control_window(stream.id), conn.max_outbound_frame_size
                )
                if window <= 0:
                    stream.window.clear()
                    await stream.window.wait()
                    continue
                conn.send_data(stream.id, view[:window].tobytes())
                view = view[window:]
                connection.flush()
                stream.last_active = connection.loop.time()
                await connection.writable()
        if not stream.ended:
            fields = trailers() if trailers is not None else []  # the app's, once its body ended
            if fields:
                conn.send_headers(stream.id, fields, end_stream=True)
            else:
                conn.end_stream(stream.id)
            connection.flush()
    except (StreamClosedError, ProtocolError):
        return  # the upstream ended or reset the stream: its answer (or error) tells
    except Exception:  # the app's body failed (gone, too slow, malformed): the app is told
        if not stream.ended:
            try:
                conn.reset_stream(stream.id, ErrorCodes.CANCEL)
            except (StreamClosedError, ProtocolError):
                pass
            connection.flush()
