"""One multiplexed HTTP/2 connection to an upstream (``UpstreamConnection``, an asyncio protocol
over the ``h2`` state machine) and its streams: frames in become each stream's answer head, body
(flow-controlled, ``h2_flow``) and trailers; a stream reset or a ``GOAWAY`` fails the streams it
concerns, as ``StreamRefused`` when the upstream did not process them (safe to send again);
idle and total timeouts are checked by the pool's sweep (``check_timeouts``).
"""

from __future__ import annotations

import asyncio
import math
from typing import cast

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

from ..errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout
from ..wire import HttpVersion11, RawResponseMessage
from .h2_flow import StreamFlow
from .origin import Timeouts
from .upstream import Answer, reason_phrase

_STREAM_WINDOW = 1024 * 1024  # answer bytes one stream may send before the app reads them
_CONNECTION_WINDOW = 16 * 1024 * 1024
_READ_LIMIT = 2**16


class _GracefulH2Connection(H2Connection):
    """``h2`` closes its state machine on any GOAWAY, refusing every later frame; RFC 9113
    §6.8 lets the streams up to its last stream id finish. After a graceful one (NO_ERROR) the
    connection stays open to them; no new stream is opened on it (``usable``)."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == ErrorCodes.NO_ERROR:
            self.state_machine.state = ConnectionState.CLIENT_OPEN
        return frames, events


class StreamRefused(UpstreamProtocolError):
    """The upstream did not process the stream: safe to send again."""


class UpstreamStream:
    """One request's stream on an upstream connection: its answer's head (a future), body and
    trailers as they arrive, its deadlines, and the request body bytes held for a replay."""

    __slots__ = (
        "id", "answer", "body", "flow", "trailers", "where", "deadline", "idle_s", "last_active",
        "window", "streams_outlive", "sender", "held", "held_bytes", "ended",
    )  # fmt: skip

    def __init__(
        self,
        connection: UpstreamConnection,
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

    def __init__(
        self, message: RawResponseMessage, stream: UpstreamStream, owner: UpstreamConnection
    ) -> None:
        self.message = message
        self.status = message.code
        self.body = stream.body
        self._stream = stream
        self._owner = owner

    @property
    def trailers(self) -> tuple[tuple[bytes, bytes], ...]:
        return self._stream.trailers

    def release(self) -> None:
        self._owner.release(self._stream)


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int, int]) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        # The upstream's blocks are checked as they arrive. Ours are built by _request_fields
        # from a request the app's parser checked: pseudo-headers first, lower-case names,
        # connection fields dropped, line breaks refused; so h2's outbound checks are off.
        self.conn = _GracefulH2Connection(
            H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
        )
        self.conn.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        self.streams: dict[int, UpstreamStream] = {}
        self.usable = True  # no GOAWAY, not closed: new streams may open here
        self.slot = asyncio.Event()  # set when a stream closes (max concurrent streams)
        self._writable = asyncio.Event()
        self._writable.set()
        self._early: list[bytes] | None = []  # bytes that came before start(); None once started

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Nothing is sent yet: the upstream's identity (upstream_spiffe_id) and ALPN are checked
        # first, and only then does start() send the preface.
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def start(self) -> None:
        """Send the connection preface, once the upstream is known to be the right one."""
        early, self._early = self._early, None
        if early is None:
            return
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self.flush()
        if early:  # the upstream's SETTINGS, read before the preface went out
            self.data_received(b"".join(early))

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
    ) -> UpstreamStream:
        stream_id = self.conn.get_next_available_stream_id()
        stream = UpstreamStream(self, stream_id, where, deadline, timeouts)
        self.streams[stream_id] = stream
        self.conn.send_headers(stream_id, headers, end_stream=end)
        self.flush()
        return stream

    def data_received(self, data: bytes) -> None:
        if self._early is not None:
            self._early.append(data)
            return
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
                kind = (
                    StreamRefused if refused and not stream.answer.done() else UpstreamProtocolError
                )
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
                        unprocessed.fail(StreamRefused(f"{unprocessed.where}: GOAWAY before it"))
                        self._forget(stream_id)
                self.slot.set()
        self.flush()
        if not self.usable and not self.streams:
            self._close()

    def _answered(self, stream: UpstreamStream, raw: list[tuple[bytes, bytes]]) -> None:
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

    def release(self, stream: UpstreamStream) -> None:
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
