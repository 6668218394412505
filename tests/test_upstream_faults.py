"""A misbehaving upstream (issue 9): resets mid-body both ways, garbage and oversized heads,
1xx interim answers, keep-alive connections closed under the pool. The app gets a prompt
502/504 problem (or, once headers are out, a cut connection), and credproxy keeps serving."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import struct
import threading

import aiohttp
import pytest

from tests.counterparts import LEDGER, PREAMBLE


class FaultyUpstream:
    """Fault injector on a raw socket: what it answers depends on the request path."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name="faulty-upstream")
        self._ready = threading.Event()

    def __enter__(self) -> FaultyUpstream:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, sock=self._sock))
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                if not await self._answer(path, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(
        self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False ends the connection."""
        if path == "/ok":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return True
        if path == "/ok-then-close-idle":  # keep-alive promised, then closed while idle
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.1)
            return False
        if path == "/reset-mid-response":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 65536)
            await writer.drain()
            await asyncio.sleep(0.1)
            _reset(writer)
            return False
        if path == "/big":  # 16 MiB, written as fast as the reader takes it
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 16777216\r\n\r\n")
            for _ in range(256):
                writer.write(b"z" * 65536)
                await writer.drain()
            return True
        if path == "/reset-mid-request":
            await reader.readexactly(65536)  # part of the streamed body, then a reset
            _reset(writer)
            return False
        if path == "/garbage":
            writer.write(b"SURPRISE\r\n\r\n")
        elif path == "/huge-head":
            writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        elif path == "/early-hints":
            writer.write(
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
            )
            await writer.drain()
            return True
        await writer.drain()
        return False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _config(upstream: FaultyUpstream, tmp_path) -> str:
    key = tmp_path / "api-key"
    key.write_text("upstream-fault-key-0123456789\n")
    LEDGER.secret("upstream-fault-key-0123456789")
    return f"""\
{PREAMBLE}issuers:
  key: {{type: static, secret_file: {key}}}
routes:
  - name: faulty
    path_prefix: /
    strip_prefix: false
    upstream: {upstream.origin}
    timeouts: {{connect_s: 2, idle_s: 3, total_s: 10}}
    credential: {{issuer: key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
"""


@pytest.fixture
def faulty_upstream():
    with FaultyUpstream() as upstream:
        yield upstream


async def _still_serving(client: aiohttp.ClientSession, proc) -> None:
    async with client.get(proc.url + "/ok") as response:
        assert response.status == 200 and await response.read() == b"ok"


@pytest.mark.parametrize(
    ("path", "code"),
    [("/garbage", "upstream_protocol_error"), ("/huge-head", "upstream_protocol_error")],
)
async def test_unreadable_upstream_answers_are_502_problems(
    faulty_upstream, credproxy, client, tmp_path, path, code
):
    """A response that is not HTTP, or whose head exceeds the parser's bounds, is a 502
    problem with the route named; the next request works."""
    proc = credproxy(_config(faulty_upstream, tmp_path))
    async with client.get(proc.url + path) as response:
        problem = await response.json()
        assert response.status == 502 and problem["code"] == code
        assert problem["route"] == "faulty"
    await _still_serving(client, proc)


async def test_reset_mid_response_cuts_the_app_connection(
    faulty_upstream, credproxy, client, tmp_path
):
    """Headers already sent, the upstream resets: the app's response is cut short (never a
    silently truncated 'complete' body), the log says so, and credproxy keeps serving."""
    proc = credproxy(_config(faulty_upstream, tmp_path))
    async with client.get(proc.url + "/reset-mid-response") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert "response cut mid-body" in proc.log()
    await _still_serving(client, proc)


async def test_reset_while_the_request_body_streams_is_a_502(
    faulty_upstream, credproxy, client, tmp_path
):
    """The upstream resets while credproxy streams a 4 MiB body to it: the app gets a 502
    problem, not a hang."""
    proc = credproxy(_config(faulty_upstream, tmp_path))

    async def body():
        for _ in range(64):
            yield b"y" * 65536
            await asyncio.sleep(0)

    async with client.post(proc.url + "/reset-mid-request", data=body()) as response:
        problem = await response.json()
        assert response.status == 502 and problem["code"].startswith("upstream_")
    await _still_serving(client, proc)


def test_an_app_that_sends_its_whole_body_before_reading_gets_the_502_every_time(
    faulty_upstream, credproxy, tmp_path
):
    """An app written like ``http.client`` (the whole 2 MiB body, then the answer) while the
    upstream resets after 64 KiB of it: every attempt gets the whole 502 problem+json. A
    small send buffer keeps body bytes unread at credproxy when it answers; closing over them
    would reset the connection and the app would see ECONNRESET, not the 502."""
    proc = credproxy(_config(faulty_upstream, tmp_path))
    port = int(proc.url.rsplit(":", 1)[1])
    body = b"y" * (2 * 1024 * 1024)
    for attempt in range(10):
        app = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a hang guard
        app.connect()
        app.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        try:
            app.request("POST", "/reset-mid-request", body=body)
            response = app.getresponse()
            problem = json.loads(response.read())
        finally:
            app.close()
        assert (attempt, response.status) == (attempt, 502)
        assert response.getheader("Content-Type") == "application/problem+json"
        assert problem["code"].startswith("upstream_") and problem["route"] == "faulty"


async def test_interim_1xx_answers_are_skipped_for_the_final_one(
    faulty_upstream, credproxy, client, tmp_path
):
    """103 Early Hints and an unsolicited 100 before the 200: the app gets the final answer."""
    proc = credproxy(_config(faulty_upstream, tmp_path))
    async with client.get(proc.url + "/early-hints") as response:
        assert response.status == 200 and await response.read() == b"final"


async def test_keep_alive_connections_closed_by_the_upstream_do_not_fail_requests(
    faulty_upstream, credproxy, client, tmp_path
):
    """The upstream closes each pooled connection shortly after answering: later requests
    find a fresh connection rather than a dead one (each is answered 200)."""
    proc = credproxy(_config(faulty_upstream, tmp_path))
    for _ in range(5):
        async with client.get(proc.url + "/ok-then-close-idle") as response:
            assert response.status == 200 and await response.read() == b"ok"
        await asyncio.sleep(0.3)
    assert faulty_upstream.connections >= 5


async def test_app_leaving_mid_response_is_not_blamed_on_the_upstream(
    faulty_upstream, credproxy, tmp_path
):
    """The app closes while a large response streams: the log says the app left (info), not
    that the upstream cut the response, and credproxy keeps serving."""
    proc = credproxy(_config(faulty_upstream, tmp_path))
    async with aiohttp.ClientSession() as app:
        async with app.get(proc.url + "/big") as response:
            await response.content.readexactly(65536)
            response.close()  # the app goes away mid-body
    async with aiohttp.ClientSession() as client:
        for _ in range(50):
            if "the app closed the connection mid-response" in proc.log():
                break
            await asyncio.sleep(0.1)
        assert "the app closed the connection mid-response" in proc.log()
        assert "response cut mid-body" not in proc.log()
        await _still_serving(client, proc)


@pytest.mark.parametrize(
    "message",
    [
        "Bad status line:\n  Invalid status code:\n\n  b'HTTP/1.1 2x0 SECRET'\n      ^",
        "Bad status line 'HTTP/1.1 2x0 SECRET'",  # aiohttp's pure-Python parser
        'Invalid HTTP header: "X-SECRET"',
    ],
)
def test_parser_errors_are_described_without_the_bytes_they_quote(message):
    """What the upstream sent (an echoed token among it) never enters an error's text."""
    from aiohttp.http_exceptions import BadHttpMessage

    from proxy.wire import described as _described

    described = _described(BadHttpMessage(message))
    assert "SECRET" not in described and described.startswith(("Bad status line", "Invalid"))
