"""One HTTP/1.1 app connection, read by aiohttp's own request parser.

A raw protocol instead of aiohttp's web server (the hot path's other large cost): the same
strict parser and limits, requests answered one at a time in order (pipelining), keep-alive
with an idle timeout (swept by ``inbound.listener``), and a request the parser refuses answered
400 before the connection closes. A connection that opens with the HTTP/2 preface is handed to
``inbound.h2_session`` instead (h2c with prior knowledge).

The connection is bound to its caller when it is accepted, before a byte of it is read
(``callers.from_socket``); the admission check and the connection limits (``app_limits``, in
total and per uid) may refuse it there, with one problem answer and a close. A close after an answer the app may still be sending to (a
refusal, an answer given before its request's body was read) lingers, within bounds, so the app
reads the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING

from aiohttp import StreamReader

from ..access.callers import UNKNOWN, from_socket
from ..errors import HeadTooLarge, MalformedRequest, ProblemError, TooManyConnections
from ..log import server_log
from ..wire import (
    BaseProtocol,
    HttpProcessingError,
    HttpRequestParser,
    RawRequestMessage,
    described,
)
from .request import AppGone, AppRequest, whole_body_lines

if TYPE_CHECKING:
    from .h2_session import H2Session
    from .listener import AppListener

_READ_LIMIT = 2**16  # buffered body bytes before the app is paused
_MAX_QUEUED = 8  # pipelined requests parsed ahead before the app is paused
_REASONS = {status.value: status.phrase for status in HTTPStatus}
# Lingering close (``AppConnection._linger``): after a refusal, or an answer given before the
# request's body was read, the app still sending gets this long to read its answer, while at most
# this many of its bytes are read and dropped; at most this many connections linger at once.
# Past any bound the connection is reset, as it would have been without lingering.
_LINGER_S = 2.0  # enforced by the idle sweep: up to 0.25 s later
_LINGER_MAX_BYTES = 4 * 2**20
_MAX_LINGERING = 64
_H2_REQUEST_LINE = b"PRI * HTTP/2.0\r\n"  # the preface's start: h2 checks the rest


def _head_size(message: RawRequestMessage) -> int:
    """The size of a parsed head as sent (request line, fields, line ends), near enough."""
    size = len(message.method) + len(message.path) + 14
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4
    return size


class AppConnection(BaseProtocol):
    """One app connection: parse, queue, answer in order, keep alive while idle."""

    __slots__ = (
        "_listener", "_queue", "_task", "_idle", "_reading", "_refusal", "_head_bytes", "_head_tail", "caller",
        "closing", "idle_since", "_fresh", "_h2", "_discard_bytes",
    )  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: AppListener) -> None:
        super().__init__(
            loop,
            HttpRequestParser(
                self, loop, _READ_LIMIT, max_line_size=8190, max_field_size=8190,
                max_headers=128, payload_exception=MalformedRequest, auto_decompress=False,
            ),
        )  # fmt: skip
        self._listener = listener
        self._queue: deque[tuple[RawRequestMessage, StreamReader]] = deque()
        self._task: asyncio.Task[None] | None = None  # answers the queue (``_serve``)
        self._idle: asyncio.Future[None] | None = None  # that task's wake-up, between requests
        self.idle_since: float | None = None  # no request in progress since; see ``AppListener``
        self._reading: StreamReader | None = None  # the body being received
        self._refusal: ProblemError | None = None  # to answer once the queue is done
        self._head_bytes = 0  # of a head not yet complete
        self._head_tail = b""  # its last bytes: "\r\n\r\n" may straddle two reads
        self.caller = UNKNOWN  # bound at accept, before any byte is read
        self.closing = False  # answer what is in flight, then close
        self._fresh = True  # no byte read yet: an HTTP/2 preface may come
        self._h2: H2Session | None = None  # serving HTTP/2 instead of the parser
        self._discard_bytes = _LINGER_MAX_BYTES  # still to drop once nothing more is parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        listener = self._listener
        limits = listener.limits
        over_limit: ProblemError | None = None
        if len(listener.connections) >= limits.max_connections:
            over_limit = TooManyConnections(f"{limits.max_connections} app connections open")
        else:
            self.caller = from_socket(transport.get_extra_info("socket"))
            if listener.per_uid[self.caller.uid] >= limits.max_connections_per_uid:
                over_limit = TooManyConnections(
                    f"{limits.max_connections_per_uid} app connections open from uid "
                    f"{self.caller.uid}"
                )
        refusal = listener.admit(self.caller, over_limit)
        if refusal is not None:
            self._parser = None
            self._send_refusal(refusal)
            return
        listener.connections.add(self)
        listener.per_uid[self.caller.uid] += 1
        self.idle_since = self._loop.time()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        listener = self._listener
        listener.lingering.pop(self, None)
        if self in listener.connections:
            listener.connections.discard(self)
            uid = self.caller.uid
            listener.per_uid[uid] -= 1
            if listener.per_uid[uid] <= 0:
                del listener.per_uid[uid]
        self._parser = None
        if self._h2 is not None:
            self._h2.connection_lost()
        if self._reading is not None and not self._reading.is_eof():
            self._reading.set_exception(AppGone("the app closed the connection mid-body"))
        self._wake()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._refusal is not None:
            if self._h2 is not None:
                self._h2.data_received(data)
                return
            # After a refusal, an early answer or an upgrade request nothing more is parsed:
            # dropped, up to a bound (see ``_linger``).
            self._discard_bytes -= len(data)
            if self._discard_bytes < 0:
                self.abort()
            return
        if self._fresh:  # once per connection: HTTP/2 with prior knowledge?
            if data[:1] == b"P" and _H2_REQUEST_LINE.startswith(data[:16]):
                self._parser = None
                self._start_h2(data)
                return
            self._fresh = False
        limit = self._listener.limits.max_head_bytes
        reading = self._reading
        # Heads within one read no longer than the limit (what follows the first one in this
        # read included) cannot exceed it: the usual case costs no counting.
        small = self._head_bytes + len(data) <= limit
        if reading is None or reading.is_eof():
            if small:
                self._head_bytes += len(data)
                self._head_tail = data[-3:]
            elif self._over_head_limit(data):
                self._refuse(HeadTooLarge(f"request head over {limit} bytes"))
                return
        try:
            messages, upgraded, _ = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._refuse(MalformedRequest(described(exc)))
            return
        oversized = (
            None
            if small
            else next((i for i, (m, _) in enumerate(messages) if _head_size(m) > limit), None)
        )
        if oversized is not None:  # a head after the first of a pipelined read
            messages, upgraded = messages[:oversized], False
        if messages:
            self._head_bytes, self._head_tail = 0, b""
            self.idle_since = None
            self._queue.extend(messages)
            payload = messages[-1][1]
            self._reading = None if payload.is_eof() else payload
            if len(self._queue) > _MAX_QUEUED:
                self._pause_reading_for_buffer()
            if self._task is None:
                self._task = self._loop.create_task(self._serve())
            else:
                self._wake()
        if oversized is not None:  # the requests before it are answered first
            self._reading = None
            self._refuse(HeadTooLarge(f"request head over {limit} bytes"))
        if upgraded:  # never tunnelled: the request is answered as a plain one, then close
            self._parser = None
            self.closing = True

    def _start_h2(self, data: bytes) -> None:
        """The app speaks HTTP/2 (its first bytes are, or begin, the preface): ``h2`` takes the
        connection. A preface that goes wrong after its first bytes is h2's to refuse."""
        from .h2_session import H2Session  # here: inbound.h2_session imports this one

        listener = self._listener
        self._fresh = False
        self._h2 = H2Session(
            self,
            listener.handler,
            max_streams=listener.limits.max_concurrent_streams,
            max_header_list_bytes=listener.limits.max_head_bytes,
            linger_s=listener.keepalive_s,
        )
        self._h2.data_received(data)

    def _over_head_limit(self, data: bytes) -> bool:
        """Count ``data`` (received between requests) up to the end of the head it continues:
        whether the head has grown past ``max_head_bytes``. Heads after the first in one read
        are measured once parsed (``_head_size``)."""
        seen = self._head_tail + data if self._head_tail else data
        end = seen.find(b"\r\n\r\n")
        self._head_bytes += len(data) if end < 0 else end + 4 - len(self._head_tail)
        self._head_tail = seen[-3:]
        return self._head_bytes > self._listener.limits.max_head_bytes

    def _refuse(self, error: ProblemError) -> None:
        """``error``'s text never quotes the request's bytes: they may hold a secret."""
        self._parser = None
        reading = self._reading
        if reading is not None and not reading.is_eof():
            # The body being read breaks its framing: its request gets the 400 itself.
            reading.set_exception(error)
            self.closing = True
        elif not self.busy:
            self._send_refusal(error)
        else:
            self._refusal = error  # after the requests before it

    def _send_refusal(self, error: ProblemError) -> None:
        server_log.warning("app connection closed: %s: %s", error.code.replace("_", " "), error)
        headers, body = error.problem()
        lines = whole_body_lines(headers, body)
        reason = _REASONS.get(error.status, "").encode()
        self.write(
            b"HTTP/1.1 %d %b\r\n%bConnection: close\r\n\r\n%b" % (error.status, reason, lines, body)
        )
        self._linger()

    def _linger(self) -> None:
        """Close after an answer the app may not have read yet: after a refusal, or before its
        request's body was read. Closing with its bytes unread would reset the connection, and
        an app still sending sees the reset, not the answer. So: FIN now, read and drop what
        still arrives (``_LINGER_MAX_BYTES`` at most), close when the app does or after
        ``_LINGER_S``; beyond ``_MAX_LINGERING`` connections at once, a reset now."""
        transport = self.transport
        lingering = self._listener.lingering
        if (
            transport is None
            or transport.is_closing()
            or len(lingering) >= _MAX_LINGERING
            or not transport.can_write_eof()
        ):
            self.close()
            return
        self._parser = None  # what arrives from now on is dropped: ``data_received``
        transport.write_eof()
        lingering[self] = self._loop.time() + _LINGER_S
        if self._reading_paused or self._buffer_paused:  # held back for a body no one reads
            self._reading_paused = self._buffer_paused = False
            self._resume_transport_reading()

    async def _serve(self) -> None:
        """Answer the queued requests in order, then wait for the next one: one task for the
        connection's life, since creating a task costs more than waking one."""
        try:
            while self.transport is not None:
                if not self._queue:
                    if self._refusal is not None:
                        self._send_refusal(self._refusal)
                        return
                    self.idle_since = self._loop.time()
                    self._idle = self._loop.create_future()
                    await self._idle  # ``_wake``: a request queued, or the connection gone
                    continue
                message, payload = self._queue.popleft()
                if self._buffer_paused and len(self._queue) <= _MAX_QUEUED // 2:
                    self._resume_reading_for_buffer()
                request = AppRequest(self, message, payload)
                if self.closing:
                    request.keep_alive = False
                try:
                    await self._listener.handler(request)
                except Exception:  # the handler answers every error itself: this is a bug
                    server_log.exception("%s %s: unexpected error", message.method, message.path)
                    request.keep_alive = False
                read = payload.is_eof()  # the request's body, to its end
                if not (request.keep_alive and read) or self.closing:
                    if read:
                        self.close()
                    else:  # answered before its body was read: the app may still be sending
                        self._linger()
                    return
        finally:
            self._task = self._idle = None

    def _wake(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)

    @property
    def busy(self) -> bool:
        """A request is in progress (HTTP/2: a stream is open)."""
        return (self._task is not None and self._idle is None) or (
            self._h2 is not None and self._h2.busy
        )

    def stop_accepting(self) -> None:
        """Drain: answer what is in flight, then close (HTTP/2: a GOAWAY first)."""
        self.closing = True
        if self._h2 is not None:
            self._h2.goaway()
        elif not self.busy:
            self.close()

    def write(self, data: bytes) -> None:
        if self.transport is None:
            raise AppGone("the app closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.writing_paused:
            try:
                await self._drain_helper()
            except ConnectionError:
                raise AppGone("the app closed the connection") from None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
