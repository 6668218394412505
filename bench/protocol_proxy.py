"""The floor under credproxy's hot path: its own HTTP/1.1 machinery with none of its logic.

    .venv/bin/python bench/protocol_proxy.py --port P --upstream http://127.0.0.1:U --key-file F

uvloop, raw asyncio protocols, aiohttp's C parsers on both sides (through ``proxy.wire``, as
credproxy uses them), one task per app connection parked between requests, one keep-alive
upstream connection per app connection, and the answer's body relayed from aiohttp's
StreamReader. It adds one header and nothing else: no caller identification, routing, policy,
header hygiene, echo scrubbing, metrics, audit or timeouts, and requests without a body only
(wrk's GETs). What credproxy spends per request above this row is its own logic; what this row
spends is what compiling credproxy's modules could not remove.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
from pathlib import Path

import uvloop
from aiohttp import StreamReader
from yarl import URL

from proxy.wire import (
    BaseProtocol,
    HttpRequestParser,
    HttpResponseParser,
    RawRequestMessage,
    RawResponseMessage,
)

_LIMIT = 2**16
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade"))
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Upstream(BaseProtocol):
    """One keep-alive connection to the upstream; ``exchange`` sends a head and awaits the
    answer's head and body stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.answer: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self._parser is not None
        messages, _, _ = self._parser.feed_data(data)
        if messages and self.answer is not None and not self.answer.done():
            self.answer.set_result(messages[0])

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._parser is not None:
            self._parser.feed_eof()
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionResetError("upstream closed"))

    def exchange(self, head: bytes) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        self._parser = HttpResponseParser(
            self, self._loop, _LIMIT, response_with_body=True, read_until_eof=True,
            auto_decompress=False,
        )  # fmt: skip
        self.answer = self._loop.create_future()
        assert self.transport is not None
        self.transport.write(head)
        return self.answer


class App(BaseProtocol):
    """One app connection: its requests queued by the parser, served in order by one task."""

    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: URL, header: bytes) -> None:
        super().__init__(loop, HttpRequestParser(self, loop, _LIMIT))
        self._upstream = upstream
        self._header = header
        self._queue: collections.deque[tuple[RawRequestMessage, StreamReader]] = collections.deque()
        self._idle: asyncio.Future[None] | None = None
        self._up: Upstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        assert self._parser is not None and self.transport is not None
        try:
            messages, _, _ = self._parser.feed_data(data)
        except Exception:  # a malformed request: refused, as any proxy would
            self.transport.write(_BAD_REQUEST)
            self.transport.close()
            return
        if messages:
            self._queue.extend(messages)
            self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.transport = None
        self._wake()
        if self._up is not None and self._up.transport is not None:
            self._up.transport.close()

    def _wake(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)

    async def _serve(self) -> None:
        while self.transport is not None:
            if not self._queue:
                self._idle = self._loop.create_future()
                await self._idle
                continue
            message, _ = self._queue.popleft()
            await self._forward(message)

    async def _forward(self, message: RawRequestMessage) -> None:
        up = self._up
        if up is None or up.transport is None:
            host, port = self._upstream.host or "", self._upstream.port or 80
            _, up = await self._loop.create_connection(lambda: Upstream(self._loop), host, port)
            self._up = up
        lines = [b"%s %s HTTP/1.1\r\n" % (message.method.encode(), message.path.encode())]
        lines += [b"%s: %s\r\n" % (n, v) for n, v in message.raw_headers if n.lower() != b"host"]
        lines.append(b"Host: %s\r\n%s\r\n" % (self._upstream.raw_authority.encode(), self._header))
        answer, body = await up.exchange(b"".join(lines))
        head = [b"HTTP/1.1 %d %s\r\n" % (answer.code, answer.reason.encode())]
        head += [
            b"%s: %s\r\n" % (n, v) for n, v in answer.raw_headers if n.lower() not in _HOP_BY_HOP
        ]
        chunked = "Content-Length" not in answer.headers  # chunked, or ended by a close
        head.append(b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"\r\n")
        pending = b"".join(head)  # goes out with the first body bytes: one write, as credproxy
        while chunk := await body.readany():
            if self.transport is None:
                return
            data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
            self.transport.write(pending + data if pending else data)
            pending = b""
            if self.writing_paused:
                await self._drain_helper()
            if body.at_eof():  # as credproxy: no read past the end it knows of
                break
        tail = pending + b"0\r\n\r\n" if chunked else pending
        if tail and self.transport is not None:
            self.transport.write(tail)


async def serve(sock: socket.socket, upstream: URL, header: bytes) -> asyncio.Server:
    """Serve app connections on the listening ``sock``; ``header`` is a whole header line."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: App(loop, upstream, header), sock=sock)


async def _run(port: int, upstream: URL, header: bytes) -> None:
    sock = socket.create_server(("127.0.0.1", port))
    async with await serve(sock, upstream, header) as server:
        await server.serve_forever()  # until SIGTERM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--header", default="X-Api-Key")
    parser.add_argument("--key-file", type=Path, required=True)
    args = parser.parse_args()
    key = args.key_file.read_text().strip()
    header = f"{args.header}: {key}\r\n".encode()
    uvloop.run(_run(args.port, URL(args.upstream), header))


if __name__ == "__main__":
    main()
