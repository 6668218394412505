"""The upstream side's HTTP/2: one multiplexed connection per origin (h2 by TLS ALPN, or h2c
with prior knowledge), streams sent and read concurrently, trailers kept for the app. This module
is the pool (``H2Upstreams``: connect, reuse, sweep timeouts) and the exchange (a request's head
and body on a stream); the connection and its streams are ``h2_connection``'s.

A connection that ends (closed, or ``GOAWAY``) is replaced by the next exchange. A stream the
upstream did not process (above a ``GOAWAY``'s last stream id, or reset ``REFUSED_STREAM``) is
sent again on a new connection when its body can be: bytes, or a stream whose first bytes sent
are still held (``_REPLAY_BYTES``). Errors leave as the ``UpstreamError`` family, naming the
route and upstream, as in ``upstream``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable

from aiohttp import StreamReader
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError
from multidict import CIMultiDict

from ..errors import (
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ..log import server_log
from ..tasks import spawn
from .h2_connection import H2Answer, StreamRefused, UpstreamConnection, UpstreamStream
from .hygiene import forges_a_line
from .origin import Origin, Timeouts, connect, tls_context
from .upstream import Body

_REPLAY_BYTES = 1024 * 1024  # of a streamed body, held to send again on a refused stream
_SWEEP_S = 0.1
# Connection-specific fields (RFC 9113 §8.2.2) and what the pseudo-headers say instead.
_NOT_ON_H2 = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "te"}
)


class NoH2(UpstreamProtocolError):
    """ALPN chose another protocol than h2; on an ``auto`` route, HTTP/1.1 takes the request."""


class H2Upstreams:
    """One HTTP/2 connection per origin and TLS context, opened on demand and replaced when it
    ends; exchanges wait for a stream slot when the upstream's limit is reached."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, int, int], UpstreamConnection] = {}
        self._connecting: dict[tuple[str, int, int], asyncio.Future[UpstreamConnection]] = {}
        self._sweep: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live: set[UpstreamConnection] = set()  # replaced ones included, until they close
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
        return (origin.host, origin.port, id(tls_context(origin, tls))) not in self._http1

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
        loop = self._loop
        if loop is None:  # the first exchange: the pool serves this loop from now on
            loop = self._loop = asyncio.get_running_loop()  # on 3.11 a getpid() each call
            self._sweep = spawn(self._sweep_every(_SWEEP_S), name="h2-upstream-timeouts")
        deadline = loop.time() + timeouts.total_s
        context = tls_context(origin, tls)
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
            except StreamRefused as exc:
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
    ) -> UpstreamConnection:
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
    ) -> UpstreamConnection:
        def factory() -> UpstreamConnection:
            return UpstreamConnection(loop, key)

        transport, connection = await connect(loop, factory, origin, context, timeouts, where)
        if context is not None:
            chosen = transport.get_extra_info("ssl_object").selected_alpn_protocol()
            if chosen != "h2":
                transport.close()
                raise NoH2(
                    f"{where}: the upstream did not choose HTTP/2 by ALPN ({chosen or 'none'}); "
                    "say upstream_protocol: http1.1 for it"
                )
        connection.start()
        return connection

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        for connection in self._live:
            connection._close()
        self._connections.clear()
        self._live.clear()


def _request_fields(
    method: str, target: str, origin: Origin, headers: CIMultiDict[str], body: Body
) -> list[tuple[bytes, bytes]]:
    fields = [
        (b":method", method.encode("ascii")),
        (b":scheme", b"https" if origin.tls else b"http"),
        (b":authority", origin.host_header.encode("ascii")),
        (b":path", target.encode("utf-8", "surrogateescape")),
    ]
    sent = [method, target, origin.host_header]
    for name, value in headers.items():
        lower = name.lower()
        if lower in _NOT_ON_H2 or (lower == "content-length" and isinstance(body, bytes)):
            continue
        sent += (name, value)
        fields.append((lower.encode("latin-1"), value.encode("utf-8", "surrogateescape")))
    if forges_a_line("".join(sent)):  # an HTTP/1.1 hop behind the upstream would split it
        raise ValueError("a line break (CR, LF or NUL) in the request line or a header")
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
    connection: UpstreamConnection,
    stream: UpstreamStream,
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
