"""The app's HTTP/1.1 request and the way back to it: ``AppRequest``, what the handler sees of an
app connection (``inbound.connection``). HTTP/2 streams (``inbound.h2``) answer through the same
methods; nothing here knows about credentials.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import StreamReader
from multidict import CIMultiDictProxy
from yarl import URL

from ..wire import EmptyStreamReader, RawRequestMessage

if TYPE_CHECKING:
    from .connection import AppConnection

_NO_BODY = frozenset({204, 304})


class AppGone(ConnectionResetError):
    """The app closed its connection while its request was being served."""


class AppRequest:
    """One parsed request and the way back to the app: ``send`` a whole answer, or ``start``,
    ``write`` (and ``drain``) and ``end`` a streamed one."""

    __slots__ = (
        "message", "body", "body_exists", "method", "target", "url", "headers", "keep_alive",
        "status", "connection", "_chunked", "_head",
    )  # fmt: skip

    def __init__(
        self, connection: AppConnection, message: RawRequestMessage, body: StreamReader
    ) -> None:
        self.message = message
        self.body = body
        self.body_exists = not isinstance(body, EmptyStreamReader)
        self.method: str = message.method
        self.target: str = message.path  # as sent: origin-form path and query, or absolute-form
        self.url: URL = message.url
        self.headers: CIMultiDictProxy[str] = message.headers
        self.keep_alive = not message.should_close
        self.status = 0  # of the answer, once started
        self.connection = connection
        self._chunked = False
        self._head = b""  # held back to go out with the first body bytes: one write

    @property
    def version(self) -> tuple[int, int]:
        return tuple(self.message.version)  # type: ignore[return-value]

    @property
    def content_length(self) -> int | None:
        value = self.message.headers.get("Content-Length")
        return int(value) if value is not None else None  # the parser checked its digits

    @property
    def is_grpc(self) -> bool:
        return False  # gRPC needs HTTP/2: see ``inbound.h2``

    def trailer_fields(self) -> tuple[tuple[bytes, bytes], ...]:
        """Fields the app sent after its body, once it has ended: none on HTTP/1.1 (aiohttp's
        parser drops chunked trailers)."""
        return ()

    @property
    def writing_paused(self) -> bool:
        """Whether the answer must wait (``drain``) before more is written."""
        return self.connection.writing_paused

    def send_continue(self) -> None:
        self.connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def start(self, status: int, reason: str, header_lines: bytes, *, has_length: bool) -> None:
        """The answer's head; ``header_lines`` are complete ``Name: value\\r\\n`` lines without
        hop-by-hop fields; the body is framed by their Content-Length when ``has_length``, else
        chunked (HTTP/1.1) or by closing the connection (HTTP/1.0)."""
        self.status = status
        bodyless = self.message.method == "HEAD" or status in _NO_BODY or status < 200
        framing = b""
        if not bodyless and not has_length:
            if self.message.version >= (1, 1):
                self._chunked, framing = True, b"Transfer-Encoding: chunked\r\n"
            else:
                self.keep_alive = False
        if not self.keep_alive:
            framing += b"Connection: close\r\n"
        elif self.message.version < (1, 1):
            framing += b"Connection: keep-alive\r\n"
        version = b"HTTP/1.1" if self.message.version >= (1, 1) else b"HTTP/1.0"
        self._head = b"%s %d %s\r\n%s%s\r\n" % (
            version,
            status,
            reason.encode("latin-1", "replace"),
            header_lines,
            framing,
        )

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            data, self._head = self._head + data, b""
        self.connection.write(data)

    async def drain(self) -> None:
        await self.connection.drain()

    def flush_head(self) -> None:
        """Send the head now, without waiting for body bytes: for streams (SSE), whose first
        event may be long in coming while the app waits for the head."""
        if self._head:
            data, self._head = self._head, b""
            self.connection.write(data)

    def end(self, trailers: bytes = b"") -> None:
        """The answer is complete; ``trailers`` (header lines) go in the last chunk when the
        body is chunked, and are dropped otherwise (HTTP/1.1 has nowhere else for them)."""
        tail = b"0\r\n%b\r\n" % trailers if self._chunked else b""
        if self._head or tail:
            data, self._head = self._head + tail, b""
            self.connection.write(data)

    def send(self, status: int, reason: str, headers: dict[str, str], body: bytes) -> None:
        self.start(status, reason, whole_body_lines(headers, body), has_length=True)
        self.write(body)
        self.end()

    def abort(self) -> None:
        """Headers are out and the body cannot be completed: a cut connection is the signal."""
        self.keep_alive = False
        self.connection.abort()


def whole_body_lines(headers: dict[str, str], body: bytes) -> bytes:
    """Header lines of an answer credproxy writes itself, its Content-Length included."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"{lines}Content-Length: {len(body)}\r\n".encode("latin-1")


Handler = Callable[[AppRequest], Awaitable[None]]
