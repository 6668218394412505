"""An HTTP/2 stream from the app as the handler sees a request (``H2Request``), and the gRPC
statuses of credproxy's own answers on gRPC calls.

Each stream of an app's HTTP/2 connection (``h2_session``) becomes an ``H2Request``: the
``AppRequest`` surface the handler uses, so a stream goes through the whole pipeline (the
connection's caller, guard, route by ``:authority`` and ``:path``, policy, credential, injector)
as an HTTP/1.1 request does, concurrently with the connection's other streams. Its answer goes
out as HEADERS, DATA within the stream's flow-control window, and trailers; a refusal on a gRPC
call is a trailers-only answer with ``grpc-status`` (``grpc_status``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import quote

from aiohttp import StreamReader
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError

from ..outbound.h2_flow import StreamFlow
from ..wire import RawRequestMessage
from .request import AppGone, AppRequest

if TYPE_CHECKING:
    from .h2_session import H2Session

# Connection-specific fields (RFC 9113 §8.2.2) are not sent on HTTP/2: hygiene already drops
# them from proxied answers; these are the ones credproxy's own framing could add.
_NOT_ON_H2 = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
# gRPC status codes (grpc/doc/statuscodes.md) for credproxy's own answers, by problem code;
# anything else by HTTP status as gRPC maps it (doc/http-grpc-status-mapping.md).
GRPC_STATUS_BY_CODE = {
    "caller_not_allowed": 7,  # PERMISSION_DENIED
    "path_not_allowed": 7,
    "host_not_allowed": 7,
    "browser_request_refused": 7,
    "destination_not_allowed": 7,
    "caller_not_identified": 16,  # UNAUTHENTICATED
    "credential_unavailable": 14,  # UNAVAILABLE
    "too_many_connections": 14,
    "upstream_timeout": 4,  # DEADLINE_EXCEEDED
    "route_not_found": 12,  # UNIMPLEMENTED
    "payload_too_large": 8,  # RESOURCE_EXHAUSTED
    "internal_error": 13,  # INTERNAL
}
_GRPC_STATUS_BY_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def grpc_status(code: str, status: int) -> int:
    """The gRPC status for a problem answer of ``code`` and HTTP ``status``."""
    return GRPC_STATUS_BY_CODE.get(code) or _GRPC_STATUS_BY_HTTP.get(status, 2)  # 2: UNKNOWN


class H2Request(AppRequest):
    """One stream as the handler sees a request; its answer goes out as HEADERS, DATA (within
    the stream's flow-control window) and, for gRPC, trailers."""

    __slots__ = (
        "stream_id", "_session", "_pending", "_drained", "_headers_out", "_ended", "_done", "gone",
        "remote_closed", "grpc_status", "task", "flow", "trailers",
    )  # fmt: skip

    def __init__(
        self,
        session: H2Session,
        stream_id: int,
        message: RawRequestMessage,
        body: StreamReader,
    ) -> None:
        super().__init__(session.connection, message, body)
        self.stream_id = stream_id
        self._session = session
        self._pending: deque[memoryview] = deque()  # answer bytes awaiting window
        self._drained = asyncio.Event()
        self._drained.set()
        self._headers_out: list[tuple[bytes, bytes]] | None = None  # held back: see start
        self._ended: list[tuple[bytes, bytes]] | None = None  # trailers, once end was asked
        self._done = False  # END_STREAM sent: nothing more goes out on this stream
        self.gone = False  # reset by the app, or the connection closed
        self.remote_closed = False  # the app's side of the stream ended (END_STREAM)
        self.grpc_status: str | None = None  # as sent in the trailers, for the access log
        self.task: asyncio.Task[None] | None = None
        self.flow: StreamFlow | None = None  # its body's acknowledgements, if it has one
        self.trailers: tuple[tuple[bytes, bytes], ...] = ()  # the app's, after its body

    @property
    def version(self) -> tuple[int, int]:
        return (2, 0)

    @property
    def is_grpc(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/grpc")

    def trailer_fields(self) -> tuple[tuple[bytes, bytes], ...]:
        return self.trailers

    @property
    def writing_paused(self) -> bool:
        return bool(self._pending) or self.connection.writing_paused

    def send_continue(self) -> None:
        self._session.send_headers(self.stream_id, [(b":status", b"100")], end=False)

    def start(self, status: int, reason: str, header_lines: bytes, *, has_length: bool) -> None:
        self.status = status
        headers = [(b":status", b"%d" % status)]
        for line in header_lines.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name and name not in _NOT_ON_H2:
                headers.append((name, value.strip()))
                if name == b"grpc-status":  # a trailers-only answer
                    self._record_grpc_status(value)
        self._headers_out = headers

    def _record_grpc_status(self, value: bytes) -> None:
        status = value.strip()  # from the upstream: bounded before it is a metric label
        self.grpc_status = status.decode() if status.isdigit() and int(status) <= 16 else "other"

    def _send_head(self) -> None:
        if self._headers_out is not None:
            if self.gone:
                raise AppGone("the app reset the stream")
            headers, self._headers_out = self._headers_out, None
            bodyless = self.method == "HEAD" or self.status in (204, 304)
            self._session.send_headers(self.stream_id, headers, end=bodyless)
            if bodyless:
                self._ended, self._done = [], True

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.gone:
            raise AppGone("the app reset the stream")
        self._send_head()
        if data and self._ended is None:
            self._pending.append(memoryview(data))
            self._session.pump(self)

    async def drain(self) -> None:
        while self._pending and not self.gone:
            self._drained.clear()
            await self._drained.wait()
        if self.gone:
            raise AppGone("the app reset the stream")
        await self.connection.drain()

    def flush_head(self) -> None:
        self._send_head()
        self._session.flush()

    def end(self, trailers: bytes = b"") -> None:
        if self._headers_out is not None and not trailers and not self.gone:
            headers, self._headers_out = self._headers_out, None  # no body: one HEADERS frame
            self._ended, self._done = [], True
            self._session.send_headers(self.stream_id, headers, end=True)
            return
        self._send_head()
        if self._ended is not None or self.gone:
            return
        fields = []
        for line in trailers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name and name not in _NOT_ON_H2:
                fields.append((name, value.strip()))
                if name == b"grpc-status":
                    self._record_grpc_status(value)
        self._ended = fields
        self._session.pump(self)

    def send_grpc_status(self, status: int, message: str) -> None:
        """A trailers-only gRPC answer (HEADERS with END_STREAM): credproxy's own refusal."""
        self.status = 200
        self.grpc_status = str(status)
        self._headers_out = None
        self._ended, self._done = [], True
        self._session.send_headers(
            self.stream_id,
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", self.grpc_status.encode()),
                (b"grpc-message", quote(message, safe=" ").encode()),
            ],
            end=True,
        )

    def abort(self) -> None:
        """The answer cannot be completed: the stream is reset, the connection's others go on."""
        self._session.reset(self, ErrorCodes.INTERNAL_ERROR)

    # The session's side of the answer: what is pending goes out within the window.
    def pump(self, conn: H2Connection) -> None:
        try:
            self._pump(conn)
        except (StreamClosedError, ProtocolError):  # the app reset it meanwhile
            self.finished()

    def _pump(self, conn: H2Connection) -> None:
        pending = self._pending
        stream_id = self.stream_id
        while pending:
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if window <= 0:
                return
            chunk = pending[0]
            if len(chunk) <= window:
                conn.send_data(stream_id, chunk.tobytes())
                pending.popleft()
            else:
                conn.send_data(stream_id, chunk[:window].tobytes())
                pending[0] = chunk[window:]
        self._drained.set()
        trailers = self._ended
        if trailers is not None and not self._done:
            self._done = True
            if trailers:
                conn.send_headers(stream_id, trailers, end_stream=True)
            else:
                conn.end_stream(stream_id)

    def finished(self) -> None:
        """The stream is gone (reset, or its connection lost): writers and readers wake."""
        self.gone = True
        self._pending.clear()
        self._drained.set()
        body = self.body
        if not body.is_eof():
            body.set_exception(AppGone("the app reset the stream"))
