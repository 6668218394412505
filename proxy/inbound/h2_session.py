"""HTTP/2 from the app: h2c with prior knowledge, on the same listeners as HTTP/1.1.

An app connection whose first bytes are the HTTP/2 connection preface is handed to an
``H2Session`` (the ``h2`` library's sans-I/O state machine) instead of aiohttp's HTTP/1.1
parser: frames in and out, and a task per stream that runs the handler on the stream's
``H2Request`` (``h2``), concurrently with the connection's other streams.

Bounds: ``SETTINGS_MAX_CONCURRENT_STREAMS`` and ``SETTINGS_MAX_HEADER_LIST_SIZE`` (from
``app_limits``), per-stream flow control both ways (a body the handler does not read is not
acknowledged, an answer the app does not read waits for its window), a cap on streams the app
resets (rapid reset), and the ``h2`` library's own refusals (invalid preface, CONTINUATION
floods, oversized header lists): a protocol error ends that connection with ``GOAWAY`` and
harms no other.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import StreamReader
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..log import server_log
from ..outbound.h2_flow import StreamFlow
from ..tasks import spawn
from ..wire import EmptyStreamReader, HttpVersion11, RawRequestMessage
from .h2 import H2Request
from .request import AppGone, Handler

if TYPE_CHECKING:
    from .connection import AppConnection

_STREAM_WINDOW = 256 * 1024  # request body bytes one stream may send before it is read
_CONNECTION_WINDOW = 16 * 1024 * 1024
_READ_LIMIT = 2**16  # buffered body bytes before a stream stops being acknowledged
_MAX_RESETS = 200  # streams the app may reset within _RESET_WINDOW_S (rapid reset)
_RESET_WINDOW_S = 10.0


class _GracefulH2Connection(H2Connection):
    """``h2`` closes its state machine on any GOAWAY, refusing every later frame; after an
    app's graceful one (NO_ERROR) the streams in flight are still answered (RFC 9113 §6.8)."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == ErrorCodes.NO_ERROR:
            self.state_machine.state = ConnectionState.SERVER_OPEN
        return frames, events


class H2Session:
    """One HTTP/2 app connection: frames in and out through ``h2``, a task per stream."""

    def __init__(
        self,
        connection: AppConnection,
        handler: Handler,
        *,
        max_streams: int,
        max_header_list_bytes: int,
        linger_s: float,
    ) -> None:
        self.connection = connection
        self._handler = handler
        self._linger_s = linger_s  # for the app to take an answer's last bytes
        self._closed = False
        self._flush_due = False
        self._loop = asyncio.get_running_loop()
        # The app's header blocks are checked as they arrive (pseudo-headers, connection
        # fields, names); what credproxy sends back is built from an upstream answer its parser
        # already checked, so h2's outbound checks (a tenth of a gRPC call) are off.
        conn = self._conn = _GracefulH2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=True,
                validate_outbound_headers=False,
            )
        )
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_bytes,
                SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,
            },
        )
        conn.decoder.max_header_list_size = max_header_list_bytes
        conn.initiate_connection()
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self._streams: dict[int, H2Request] = {}
        self._resets = 0
        self._resets_since = self._loop.time()
        self.closing = False  # GOAWAY sent or received: no new streams, close when idle
        self.flush()

    @property
    def busy(self) -> bool:
        return bool(self._streams)

    def flush(self) -> None:
        """Send what h2 has queued at the end of this event-loop pass: the frames of every
        stream served in the pass go out in one write."""
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_due = False
        data = self._conn.data_to_send()
        transport = self.connection.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except ProtocolError as exc:  # h2 has queued the GOAWAY naming the error
            server_log.warning("h2 app connection closed: protocol error: %s", type(exc).__name__)
            try:  # h2 sends the GOAWAY itself for errors in frames, not in the preface
                self._conn.close_connection(ErrorCodes.PROTOCOL_ERROR)
            except ProtocolError:
                pass
            self._close_now()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._request(event)
            elif isinstance(event, DataReceived):
                self._data(event)
            elif isinstance(event, StreamEnded):
                request = self._streams.get(event.stream_id)
                if request is not None:
                    request.remote_closed = True
                    request.body.feed_eof()
            elif isinstance(event, StreamReset):
                self._reset_by_app(event.stream_id)
                if self._closed:
                    return
            elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
                for request in list(self._streams.values()):
                    request.pump(self._conn)
            elif isinstance(event, TrailersReceived):  # before the body's end (StreamEnded)
                request = self._streams.get(event.stream_id)
                if request is not None:
                    request.trailers = tuple(
                        (bytes(name), bytes(value)) for name, value in event.headers or ()
                    )
            elif isinstance(event, ConnectionTerminated):
                self.closing = True
                if not self._streams:
                    self._close_now()
                    return
        self.flush()

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self.closing:
            self._conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        pseudo: dict[bytes, bytes] = {}
        fields: list[tuple[bytes, bytes]] = []
        for name, value in event.headers or ():
            name, value = bytes(name), bytes(value)
            if name.startswith(b":"):
                pseudo[name] = value
            elif name != b"host":  # :authority says it on HTTP/2
                fields.append((name, value))
        authority = pseudo.get(b":authority")
        raw_headers = ((b"host", authority), *fields) if authority is not None else tuple(fields)
        headers = CIMultiDict(
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
            for name, value in raw_headers
        )
        method = pseudo.get(b":method", b"").decode("latin-1")
        target = pseudo.get(b":path", b"").decode("utf-8", "surrogateescape")
        path, _, query = target.partition("?")
        message = RawRequestMessage(
            method, target, HttpVersion11, CIMultiDictProxy(headers), raw_headers, False,
            None, False, False, URL.build(path=path, query_string=query, encoded=True),
        )  # fmt: skip
        ended = event.stream_ended is not None
        body: StreamReader
        flow = None
        if ended:
            body = EmptyStreamReader()
        else:
            flow = StreamFlow(self, stream_id)
            body = StreamReader(flow, _READ_LIMIT, loop=self._loop)  # type: ignore[arg-type]
        request = H2Request(self, stream_id, message, body)
        request.flow = flow
        request.remote_closed = ended
        self._streams[stream_id] = request
        self.connection.idle_since = None
        request.task = spawn(self._serve(request), name=f"h2-stream-{stream_id}")

    def _data(self, event: DataReceived) -> None:
        request = self._streams.get(event.stream_id)
        size = event.flow_controlled_length or 0
        if request is None or request.gone or request.body.is_eof():
            if size:  # nobody reads it: the window is given back at once
                self.acknowledge(event.stream_id, size)
            return
        if event.data:
            request.body.feed_data(bytes(event.data))
        if request.flow is not None:
            request.flow.received(size)

    def acknowledge(self, stream_id: int, size: int) -> None:
        try:
            self._conn.acknowledge_received_data(size, stream_id)
        except (StreamClosedError, ProtocolError):
            self._conn.increment_flow_control_window(size)
        self.flush()

    def _reset_by_app(self, stream_id: int) -> None:
        """The app reset a stream: its handler is cancelled (no upstream work for nobody).
        More than ``_MAX_RESETS`` within ``_RESET_WINDOW_S`` is an attack (CVE-2023-44487)."""
        request = self._streams.pop(stream_id, None)
        if request is None:
            return
        request.finished()
        if request.task is not None:
            request.task.cancel()
        now = self._loop.time()
        if now - self._resets_since > _RESET_WINDOW_S:
            self._resets, self._resets_since = 0, now
        self._resets += 1
        if self._resets > _MAX_RESETS:
            server_log.warning(
                "h2 app connection closed: %d streams reset within %gs (rapid reset)",
                self._resets,
                _RESET_WINDOW_S,
            )
            self._conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            self._close_now()
        else:
            self._idle_check()

    async def _serve(self, request: H2Request) -> None:
        try:
            await self._handler(request)
            if request._pending and not request.gone:  # the answer's tail awaits its window
                async with asyncio.timeout(self._linger_s):
                    await request.drain()
        except (TimeoutError, ConnectionError):
            self.reset(request, ErrorCodes.CANCEL)
        except Exception:  # the handler answers every error itself: this is a bug
            server_log.exception("h2 %s %s: unexpected error", request.method, request.target)
            self.reset(request, ErrorCodes.INTERNAL_ERROR)
        finally:
            if self._streams.get(request.stream_id) is request:
                if request.status == 0 and not request.gone:  # never answered: a bug above
                    self._reset_quietly(request.stream_id, ErrorCodes.INTERNAL_ERROR)
                self._after(request)

    def _after(self, request: H2Request) -> None:
        """The handler is done: once the answer is out, a request body still coming is
        stopped (RST_STREAM NO_ERROR, RFC 9113 §8.1), and the stream forgotten."""
        if not request.gone and not request.remote_closed:
            self._reset_quietly(request.stream_id, ErrorCodes.NO_ERROR)
        self._streams.pop(request.stream_id, None)
        request.finished()
        self.flush()
        self._idle_check()

    def pump(self, request: H2Request) -> None:
        request.pump(self._conn)
        self.flush()

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        try:
            self._conn.send_headers(stream_id, headers, end_stream=end)
        except (StreamClosedError, ProtocolError) as exc:
            raise AppGone("the app reset the stream") from exc
        self.flush()

    def reset(self, request: H2Request, code: ErrorCodes) -> None:
        self._reset_quietly(request.stream_id, code)
        self._streams.pop(request.stream_id, None)
        request.finished()
        self.flush()

    def _reset_quietly(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self._conn.reset_stream(stream_id, code)
        except (StreamClosedError, ProtocolError):
            pass

    def _idle_check(self) -> None:
        if self._streams:
            return
        if self.closing or self.connection.closing:
            self._close_now()
        elif self.connection.transport is not None:
            self.connection.idle_since = self._loop.time()

    def goaway(self) -> None:
        """Stop accepting streams (drain): those in flight finish, then the connection closes."""
        if not self.closing:
            self.closing = True
            # Written beside h2: its close_connection would refuse the frames still to come
            # on the streams in flight (RFC 9113 §6.8 lets them finish).
            goaway = GoAwayFrame(0)
            goaway.last_stream_id = self._conn.highest_inbound_stream_id
            goaway.error_code = ErrorCodes.NO_ERROR
            self.flush_now()
            transport = self.connection.transport
            if transport is not None and not transport.is_closing():
                transport.write(goaway.serialize())
        self._idle_check()

    def _close_now(self) -> None:
        self.flush_now()
        self._closed = True
        for request in list(self._streams.values()):
            request.finished()
            if request.task is not None:
                request.task.cancel()
        self._streams.clear()
        self.connection.close()

    def connection_lost(self) -> None:
        for request in list(self._streams.values()):
            request.finished()
            if request.task is not None:
                request.task.cancel()
        self._streams.clear()
