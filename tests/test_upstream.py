"""outbound/upstream.py: the pooled upstream connections, against raw loopback servers scripted
per test (fault injectors: each says what the upstream does with its connection)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from multidict import CIMultiDict

from proxy.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)
from proxy.outbound.origin import Origin, Timeouts
from proxy.outbound.upstream import Answer, Upstreams, request_head

TIMEOUTS = Timeouts(connect_s=5.0, idle_s=5.0, total_s=10.0)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawServer:
    """A loopback TCP server running ``serve(self, reader, writer)`` on each connection; counts
    the connections it accepted and the request heads it read."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.connections = 0
        self.heads: list[bytes] = []
        self.origin = Origin("127.0.0.1", 0, False, "127.0.0.1")
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.origin = Origin.of(f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}")
        return self

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.serve(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def head(self, reader: asyncio.StreamReader) -> bytes:
        """One request head (requests here carry no body unless the test reads it)."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()


Serve = Callable[[RawServer, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serving() -> AsyncIterator[Callable[[Serve], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(serve: Serve) -> RawServer:
        servers.append(RawServer(serve))
        return await servers[-1].start()

    yield start
    for server in servers:
        server.close()


@pytest.fixture
async def pool() -> AsyncIterator[Upstreams]:
    upstreams = Upstreams()
    yield upstreams
    upstreams.close()


async def keep_alive(server: RawServer, reader, writer) -> None:
    """A well-behaved upstream: answers every request on the connection."""
    while True:
        await server.head(reader)
        writer.write(OK)


async def _exchange(
    pool: Upstreams,
    origin: Origin,
    body: bytes | AsyncIterator[bytes] | None = None,
    *,
    timeouts: Timeouts = TIMEOUTS,
    tls: ssl.SSLContext | bool = False,
) -> Answer:
    headers: CIMultiDict[str] = CIMultiDict()
    head, chunked = request_head("POST", "/x", origin.host_header, headers, body)
    return await pool.exchange(
        origin, tls, head, body, chunked=chunked, method="POST", timeouts=timeouts, where="r"
    )


async def _read_all(answer: Answer) -> bytes:
    try:
        return await answer.body.read()
    finally:
        answer.release()


async def test_a_connection_whose_answer_was_read_to_the_end_is_reused(serving, pool):
    """Sequential exchanges to one origin share one keep-alive connection."""
    server = await serving(keep_alive)
    for _ in range(3):
        assert await _read_all(await _exchange(pool, server.origin)) == b"ok"
    assert server.connections == 1 and len(server.heads) == 3


async def test_an_answer_released_unread_closes_its_connection(serving, pool):
    """A body not read to its end cannot be resynchronised: the next exchange connects anew."""
    rest = asyncio.Event()

    async def in_two_parts(server: RawServer, reader, writer) -> None:
        while True:
            await server.head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
            await rest.wait()
            writer.write(b"ok")

    server = await serving(in_two_parts)
    (await _exchange(pool, server.origin)).release()  # its body still on the way
    rest.set()
    assert await _read_all(await _exchange(pool, server.origin)) == b"okok"
    assert server.connections == 2


async def test_an_upstream_asking_to_close_is_not_reused(serving, pool):
    """``Connection: close`` from the upstream keeps that connection out of the pool."""

    async def closing(server: RawServer, reader, writer) -> None:
        await server.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()  # until the client closes

    server = await serving(closing)
    for _ in range(2):
        assert await _read_all(await _exchange(pool, server.origin)) == b"ok"
    assert server.connections == 2


async def test_a_connection_idle_past_keepalive_s_is_not_reused(serving):
    """A pooled connection older than the pool's ``keepalive_s`` is closed, not used."""
    server = await serving(keep_alive)
    pool = Upstreams(keepalive_s=0.0)  # every pooled connection is already too old
    try:
        for _ in range(2):
            assert await _read_all(await _exchange(pool, server.origin)) == b"ok"
    finally:
        pool.close()
    assert server.connections == 2


async def first_only(server: RawServer, reader, writer) -> None:
    """An upstream that answers a connection's first request, keep-alive implied, then drops
    the connection when the next request arrives: the race of an idle connection closing."""
    await server.head(reader)
    writer.write(OK)
    await server.head(reader)


async def test_a_pooled_connection_the_upstream_dropped_is_replaced_for_a_replayable_body(
    serving, pool
):
    """A reused connection closed before any answer byte costs nothing when the body can be
    sent again: the exchange is retried once on a new connection."""
    server = await serving(first_only)
    assert await _read_all(await _exchange(pool, server.origin, b"hi")) == b"ok"
    assert await _read_all(await _exchange(pool, server.origin, b"hi")) == b"ok"
    assert server.connections == 2 and len(server.heads) == 3


async def test_a_streamed_body_is_not_resent_when_a_pooled_connection_was_dropped(serving, pool):
    """A streamed body is sent at most once: when the reused connection is dropped, the
    exchange fails (UpstreamProtocolError) instead of sending a second, empty body."""

    async def stream() -> AsyncIterator[bytes]:
        yield b"hi"

    server = await serving(first_only)
    assert await _read_all(await _exchange(pool, server.origin)) == b"ok"
    with pytest.raises(UpstreamProtocolError):
        await _exchange(pool, server.origin, stream())
    assert server.connections == 1 and len(server.heads) == 2


async def test_a_refused_connection_is_upstream_connect_error(pool):
    """Nothing listening: UpstreamConnectError, also a ConnectionError, naming the route."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        origin = Origin.of(f"http://127.0.0.1:{unused.getsockname()[1]}")
        with pytest.raises(UpstreamConnectError) as caught:
            await _exchange(pool, origin)
    assert isinstance(caught.value, ConnectionError) and str(caught.value).startswith("r: ")


async def test_a_silent_upstream_is_upstream_timeout_at_idle_s(serving, pool):
    """An upstream that reads the request and never answers ends in UpstreamTimeout (also a
    TimeoutError) from the pool's sweep, and the connection is not pooled."""

    async def silent(server: RawServer, reader, writer) -> None:
        await server.head(reader)
        await reader.read()

    server = await serving(silent)
    quick = Timeouts(connect_s=5.0, idle_s=0.2, total_s=10.0)
    with pytest.raises(UpstreamTimeout, match="idle_s") as caught:
        await _exchange(pool, server.origin, timeouts=quick)
    assert isinstance(caught.value, TimeoutError)


async def test_an_invalid_answer_is_a_protocol_error_that_does_not_quote_it(serving, pool):
    """A status line that is not HTTP is UpstreamProtocolError; its text, which may echo the
    credential, is not quoted in the error."""

    async def garbage(server: RawServer, reader, writer) -> None:
        await server.head(reader)
        writer.write(b"HTTP/1.1 2OO Bearer-leaked-token\r\n\r\n")
        await reader.read()

    server = await serving(garbage)
    with pytest.raises(UpstreamProtocolError) as caught:
        await _exchange(pool, server.origin)
    assert "leaked" not in str(caught.value)


async def test_an_answer_cut_mid_body_fails_the_body_read(serving, pool):
    """A body shorter than its Content-Length when the upstream leaves fails the read with an
    UpstreamError instead of ending it quietly."""

    async def cut(server: RawServer, reader, writer) -> None:
        await server.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    server = await serving(cut)
    answer = await _exchange(pool, server.origin)
    with pytest.raises(UpstreamError):
        await _read_all(answer)


async def test_a_close_before_any_answer_is_a_protocol_error(serving, pool):
    """An upstream that reads the request and closes without answering: UpstreamProtocolError."""

    async def hang_up(server: RawServer, reader, writer) -> None:
        await server.head(reader)

    server = await serving(hang_up)
    with pytest.raises(UpstreamProtocolError, match="closed before an answer"):
        await _exchange(pool, server.origin)


async def test_a_tls_handshake_with_a_plain_http_server_is_upstream_tls_error(serving, pool):
    """A TLS origin answering in plain text fails the handshake: UpstreamTLSError."""

    async def plain(server: RawServer, reader, writer) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await reader.read()

    server = await serving(plain)
    origin = Origin.of(f"https://127.0.0.1:{server.origin.port}")
    with pytest.raises(UpstreamTLSError):
        await _exchange(pool, origin, tls=ssl.create_default_context())
