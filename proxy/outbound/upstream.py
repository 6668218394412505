"""The upstream side's wire: pooled keep-alive HTTP/1.1 connections, one exchange at a time.

A raw protocol on aiohttp's own response parser (``aiohttp.http``), without the client's
per-request machinery: the hot path's largest cost. A connection goes back to its origin's pool
only when its answer was read to the end and neither side asked to close. Errors leave here as
the ``UpstreamError`` family, naming the route and upstream.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import AsyncIterable
from http import HTTPStatus

from aiohttp import StreamReader
from multidict import CIMultiDict

from ..errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ..tasks import spawn
from ..wire import (
    BaseProtocol,
    HttpProcessingError,
    HttpResponseParser,
    RawResponseMessage,
    described,
)
from .hygiene import forges_a_line
from .origin import Origin, Timeouts, connect, tls_context

Body = bytes | StreamReader | AsyncIterable[bytes] | None
_READ_LIMIT = 2**16  # buffered answer bytes before the upstream is paused
_SWEEP_S = 0.1  # how often timeouts are checked: their precision


class Answer:
    """The upstream's answer: its head, its body stream, and ``release`` when done with it."""

    __slots__ = ("message", "status", "body", "_connection")

    def __init__(
        self, message: RawResponseMessage, body: StreamReader, connection: _Connection
    ) -> None:
        self.message = message
        self.status: int = message.code  # read several times a request: not a property
        self.body = body
        self._connection = connection

    @property
    def trailers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Fields after the body: HTTP/2 only (aiohttp's parser drops chunked trailers)."""
        return ()

    def release(self) -> None:
        """Back to the pool when the body was read to its end; closed otherwise."""
        self._connection.finish(self.body.is_eof() and not self.message.should_close)

    def switched(self, where: str) -> tuple[asyncio.Transport, bytes]:
        """After a ``101`` to an ``upgrade`` exchange: the connection's transport, reading
        paused, and the bytes the upstream sent after the 101's head; the pool forgets it."""
        connection = self._connection
        transport, tail = connection.transport, connection.tail
        assert connection.switched, "no protocol switch to take over"
        if transport is None or transport.is_closing():
            raise UpstreamProtocolError(f"{where}: connection closed right after its 101")
        connection.transport, connection.tail = None, b""
        return transport, tail


_REASONS = {status.value: status.phrase for status in HTTPStatus}


def reason_phrase(status: int) -> str:
    """The standard phrase of ``status``: HTTP/2 has no reason phrase of its own."""
    return _REASONS.get(status, "")


def _is_event_stream(message: RawResponseMessage) -> bool:
    content_type = message.headers.get("Content-Type", "")
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


class _Connection(BaseProtocol):
    __slots__ = (
        "_pool", "_watched", "_answer", "_payload", "_where", "_deadline", "_idle_s",
        "_streams_outlive", "_last_read", "received", "idle_since", "_upgrade", "switched", "tail",
    )  # fmt: skip

    def __init__(
        self, loop: asyncio.AbstractEventLoop, pool: list[_Connection], watched: set[_Connection]
    ) -> None:
        super().__init__(loop)
        self._pool = pool
        self._watched = watched  # exchanges awaiting or reading an answer: see ``Upstreams``
        self._answer: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._where = ""
        self._deadline = 0.0
        self._idle_s = 0.0
        self._streams_outlive = False
        self._last_read = 0.0
        self.received = False  # any byte of this exchange's answer
        self.idle_since = 0.0
        self._upgrade = False  # the request asks for a protocol switch: a 101 may answer it
        self.switched = False  # it did: the parser is gone, the bytes after it are in ``tail``
        self.tail = b""

    def start(
        self,
        method: str,
        where: str,
        deadline: float,
        idle_s: float,
        streams_outlive: bool = False,
        *,
        upgrade: bool = False,
    ) -> None:
        """A new exchange: a parser for its answer (HEAD answers have no body)."""
        self._parser = HttpResponseParser(
            self,
            self._loop,
            _READ_LIMIT,
            max_line_size=8190,
            max_field_size=8190,
            response_with_body=method != "HEAD",
            read_until_eof=True,
            auto_decompress=False,  # bodies pass through byte for byte
        )
        self._answer = self._loop.create_future()
        self._payload = None
        self._where = where
        self._deadline = deadline
        self._idle_s = idle_s
        self._streams_outlive = streams_outlive
        self.received = False
        self._upgrade = upgrade

    def awaiting(self) -> None:
        """The request is sent: from now on the upstream's silence counts (``idle_s``)."""
        self._last_read = self._loop.time()
        self._watched.add(self)

    def check_timeouts(self, now: float) -> None:
        """Called by the pool's sweep a few times a second: no timer per exchange."""
        if now >= self._deadline:
            self._fail(UpstreamTimeout(f"{self._where}: no complete answer in time (total_s)"))
        elif not self._reading_paused and now - self._last_read >= self._idle_s:
            self._fail(UpstreamTimeout(f"{self._where}: silent for {self._idle_s:g}s (idle_s)"))

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if self.switched:  # the other protocol's bytes, until ``Answer.switched`` takes them
                self.tail += data
                return
            self._close()  # bytes nobody asked for: this connection cannot be trusted again
            return
        if data:
            self.received = True
            self._last_read = self._loop.time()
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._fail(UpstreamProtocolError(f"{self._where}: invalid answer: {described(exc)}"))
            return
        for message, payload in messages:
            if message.code == 101 or upgraded:
                if self._upgrade and message.code == 101 and upgraded:
                    self._switch(message, payload, tail)
                    return
                self._fail(UpstreamProtocolError(f"{self._where}: unrequested protocol switch"))
                return
            if message.code < 200:
                continue  # interim answers (100, 103) are not relayed
            answer = self._answer
            if answer is not None and not answer.done():
                if self._streams_outlive and _is_event_stream(message):
                    self._deadline = math.inf  # idle_s alone bounds a stream
                self._payload = payload
                answer.set_result((message, payload))
        if self._payload is not None and self._payload.is_eof():
            self._watched.discard(self)  # the whole answer is here

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self in self._pool:
            self._pool.remove(self)
        parser, self._parser = self._parser, None
        if parser is None:
            return
        try:
            parser.feed_eof()  # ends a body read until EOF; a cut one raises
        except HttpProcessingError as error:
            self._fail(UpstreamProtocolError(f"{self._where}: answer cut: {described(error)}"))
            return
        self._fail(UpstreamProtocolError(f"{self._where}: connection closed before an answer"))

    def _switch(self, message: RawResponseMessage, payload: StreamReader, tail: bytes) -> None:
        """The upstream switched protocols: no more HTTP on this connection, no timeouts here
        (the tunnel keeps its own), reading paused until the tunnel takes the transport."""
        self._parser = None
        self.switched, self.tail = True, tail
        self._watched.discard(self)
        self._pause_transport_reading()
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_result((message, payload))

    def _fail(self, error: UpstreamError) -> None:
        """Whoever waits on this exchange gets ``error``; the connection is not reused."""
        answer, payload = self._answer, self._payload
        if answer is not None and not answer.done():
            answer.set_exception(error)
        elif payload is not None and not payload.is_eof():
            payload.set_exception(error)
        self._close()

    def _close(self) -> None:
        self._watched.discard(self)
        self._parser = None
        if self.transport is not None:
            self.transport.abort()

    async def answer(self) -> tuple[RawResponseMessage, StreamReader]:
        assert self._answer is not None
        return await self._answer

    def finish(self, reusable: bool) -> None:
        self._watched.discard(self)
        self._answer = self._payload = self._parser = None
        if (
            reusable
            and not self._upgrade
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.idle_since = self._loop.time()
            self._pool.append(self)
        else:
            self._close()


class Upstreams:
    """Keep-alive connections per origin and TLS context, opened on demand, reused LIFO."""

    def __init__(self, keepalive_s: float = 30.0) -> None:
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[str, int, int], list[_Connection]] = {}
        self._watched: set[_Connection] = set()
        self._sweep: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _sweep_every(self, interval_s: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            now = loop.time()
            for connection in list(self._watched):
                connection.check_timeouts(now)

    async def exchange(
        self,
        origin: Origin,
        tls: ssl.SSLContext | bool,
        head: bytes,
        body: Body,
        *,
        chunked: bool,
        method: str,
        timeouts: Timeouts,
        where: str,
        upgrade: bool = False,
    ) -> Answer:
        """Send one request (``head`` serialised by ``request_head``) and await its answer's
        head. A pooled connection the upstream closed before answering is replaced once, when
        the body can be sent again. With ``upgrade`` the request asks for a protocol switch:
        it goes on a new connection, never pooled, and a ``101`` answers it (``switched``)."""
        loop = self._loop
        if loop is None:  # the first exchange: the pool serves this loop from now on
            loop = self._loop = asyncio.get_running_loop()  # on 3.11 a getpid() each call
            self._sweep = spawn(self._sweep_every(_SWEEP_S), name="upstream-timeouts")
        deadline = loop.time() + timeouts.total_s
        context = tls_context(origin, tls)
        pool = self._idle.setdefault((origin.host, origin.port, id(context)), [])
        replayable = body is None or isinstance(body, bytes)
        while True:
            connection = None if upgrade else self._pooled(pool, loop.time())
            reused = connection is not None
            if connection is None:
                connection = await self._connect(loop, origin, context, pool, timeouts, where)
            connection.start(
                method,
                where,
                deadline,
                timeouts.idle_s,
                timeouts.streams_outlive_total,
                upgrade=upgrade,
            )
            try:
                await _send(connection, head, body, chunked, deadline, where)
                connection.awaiting()
                message, payload = await connection.answer()
            except UpstreamError:
                if reused and replayable and not connection.received:
                    connection.finish(False)
                    continue  # the upstream had closed it while idle
                connection.finish(False)
                raise
            except BaseException:
                connection.finish(False)
                raise
            return Answer(message, payload, connection)

    def _pooled(self, pool: list[_Connection], now: float) -> _Connection | None:
        while pool:
            connection = pool.pop()
            if now - connection.idle_since < self._keepalive_s and connection.transport:
                return connection
            connection.finish(False)
        return None

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: Origin,
        context: ssl.SSLContext | None,
        pool: list[_Connection],
        timeouts: Timeouts,
        where: str,
    ) -> _Connection:
        def factory() -> _Connection:
            return _Connection(loop, pool, self._watched)

        _, connection = await connect(loop, factory, origin, context, timeouts, where)
        return connection

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        for pool in self._idle.values():
            while pool:
                pool.pop().finish(False)


def request_head(
    method: str, target: str, host: str, headers: CIMultiDict[str], body: Body
) -> tuple[bytes, bool]:
    """The request line and header section in credproxy's own framing, and whether the body is
    chunked: the given body decides Content-Length (bytes), keeps the app's or injector's (a
    stream of known length) or chunks."""
    chunked = False
    if isinstance(body, bytes):
        headers["Content-Length"] = str(len(body))
    elif body is not None and "Content-Length" not in headers:
        headers["Transfer-Encoding"] = "chunked"
        chunked = True
    fields = [f"{name}: {value}" for name, value in headers.items()]
    if forges_a_line("".join((method, target, host, *fields))):  # before the separators
        raise ValueError("a line break (CR, LF or NUL) in the request line or a header")
    fields.append("\r\n")
    text = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n" + "\r\n".join(fields)
    return text.encode("utf-8", "surrogateescape"), chunked


async def _send(
    connection: _Connection, head: bytes, body: Body, chunked: bool, deadline: float, where: str
) -> None:
    transport = connection.transport
    if transport is None:
        raise UpstreamProtocolError(f"{where}: connection closed before the request was sent")
    if body is None or isinstance(body, bytes):
        transport.write(head + body if body else head)
        return
    transport.write(head)
    chunks = body.iter_any() if isinstance(body, StreamReader) else body
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in chunks:  # errors reading the app's body are the app's
                if transport.is_closing():
                    return  # the upstream answered early or left: its answer (or none) tells
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if connection.writing_paused:
                    try:
                        await connection._drain_helper()
                    except ConnectionError as exc:
                        raise UpstreamProtocolError(f"{where}: lost while sending: {exc}") from None
    except TimeoutError:
        raise UpstreamTimeout(f"{where}: request body still sending at total_s") from None
    if chunked:
        transport.write(b"0\r\n\r\n")
