"""A raw-socket upstream that records the exact bytes credproxy sends it (a fault injector, not a
provider): each connection's byte stream is framed by a deliberately strict HTTP/1.1 parser, and
anything a lenient server could read two ways is recorded as a framing problem.

Every complete request is answered ``200`` with a JSON echo of what arrived (method, target,
headers, body), so an injected credential comes back for credproxy's scrubber to mask. Like a
compliant origin (RFC 9110 §10.1.1), it answers ``Expect: 100-continue`` with ``100 Continue``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.1")
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]{1,16})(;[^\r\n]*)?")
_MAX_HEAD_BYTES = 2 * 1024 * 1024  # above the ~1 MiB head aiohttp lets through


class Ambiguous(ValueError):
    """The bytes are not one unambiguous HTTP/1.1 request."""


@dataclass
class Request:
    """One request as framed on the wire: head fields in order, the body de-chunked."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool
    raw: bytes

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@dataclass
class Connection:
    """One inbound connection: every byte received, the requests framed from them, and what
    could not be framed (a problem) or was cut short (a truncated tail)."""

    raw: bytearray = field(default_factory=bytearray)
    requests: list[Request] = field(default_factory=list)
    problem: str | None = None
    truncated: bytes = b""


def _parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        raise Ambiguous("bare CR or LF in the head")
    line, *lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise Ambiguous(f"request line {line[:80]!r}")
    headers = []
    for raw_field in lines:
        name, colon, value = raw_field.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise Ambiguous(f"field line {raw_field[:80]!r}")  # obs-fold lands here too
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise Ambiguous(f"control character in {name.decode()}")
        headers.append((name.decode(), value.decode("latin-1")))
    return match[1].decode(), match[2].decode("latin-1"), headers


def _framing(headers: list[tuple[str, str]]) -> tuple[bool, int]:
    """(chunked, content length) per RFC 9112 §6, refusing every case that needs a tie-break."""
    lengths = [v for k, v in headers if k.lower() == "content-length"]
    codings = [v for k, v in headers if k.lower() == "transfer-encoding"]
    if lengths and codings:
        raise Ambiguous("both Content-Length and Transfer-Encoding")
    if len(lengths) > 1:
        raise Ambiguous("more than one Content-Length")
    if codings:
        if codings != ["chunked"]:
            raise Ambiguous(f"Transfer-Encoding {codings!r}")
        return True, 0
    if lengths and not re.fullmatch(r"[0-9]{1,15}", lengths[0]):
        raise Ambiguous(f"Content-Length {lengths[0]!r}")
    return False, int(lengths[0]) if lengths else 0


def _dechunk(data: bytes, start: int) -> tuple[bytes, int] | None:
    """The de-chunked body and the offset after it, or None when more bytes are needed."""
    body, at = bytearray(), start
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return None
        match = _CHUNK_SIZE.fullmatch(data[at:end])
        if match is None:
            raise Ambiguous(f"chunk size line {data[at:end][:40]!r}")
        size, at = int(match[1], 16), end + 2
        if size == 0:
            break
        if len(data) < at + size + 2:
            return None
        if data[at + size : at + size + 2] != b"\r\n":
            raise Ambiguous("chunk data not followed by CRLF")
        body += data[at : at + size]
        at += size + 2
    while True:  # trailer section
        end = data.find(b"\r\n", at)
        if end < 0:
            return None
        if end == at:
            return bytes(body), end + 2
        _parse_head(b"GET / HTTP/1.1\r\n" + data[at:end])
        at = end + 2


def parse_one(data: bytes) -> tuple[Request, int] | None:
    """Frame the first request in ``data``: (request, bytes consumed), or None if incomplete."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > _MAX_HEAD_BYTES:
            raise Ambiguous("head too large")
        return None
    method, target, headers = _parse_head(data[:end])
    if len([v for k, v in headers if k.lower() == "host"]) != 1:
        raise Ambiguous("not exactly one Host")
    chunked, length = _framing(headers)
    at = end + 4
    if chunked:
        framed = _dechunk(data, at)
        if framed is None:
            return None
        body, at = framed
    else:
        if len(data) < at + length:
            return None
        body, at = data[at : at + length], at + length
    return Request(method, target, headers, body, chunked, data[:at]), at


class RawUpstream:
    """The recorder on a loopback port, on its own event loop in a thread."""

    def __init__(self, reply: Callable[[Request], bytes] | None = None) -> None:
        """``reply``: the bytes that answer a framed request (default: the JSON echo)."""
        self._reply = reply or _echo
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.origin = f"http://127.0.0.1:{self.port}"
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # notified on every received byte
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    # -- what arrived ----------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return [r for c in self.connections for r in c.requests]

    @property
    def problems(self) -> list[str]:
        """Every framing problem, and every connection that ended inside a request."""
        with self._lock:
            found = [c.problem for c in self.connections if c.problem]
            found += [f"truncated: {c.truncated[:80]!r}" for c in self.connections if c.truncated]
            return found

    @property
    def received(self) -> bytes:
        """Every byte received since the last ``clear()``, connection after connection."""
        with self._lock:
            return b"".join(bytes(c.raw) for c in self.connections)

    @property
    def received_bytes(self) -> int:
        return len(self.received)

    def wait_received(self, data: bytes, limit_s: float = 10.0) -> bool:
        """Block until ``data`` has arrived (True), or give up after ``limit_s`` (False): a
        bound against hanging, not a speed requirement."""
        with self._arrived:
            return self._arrived.wait_for(
                lambda: data in b"".join(bytes(c.raw) for c in self.connections), limit_s
            )

    def clear(self) -> None:
        with self._lock:
            for connection in self.connections:
                connection.raw.clear()
                connection.requests.clear()
                connection.problem, connection.truncated = None, b""

    # -- serving ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection()
        with self._lock:
            self.connections.append(connection)
        self._writers.add(writer)
        buffer, continued = b"", False
        try:
            while data := await reader.read(65536):
                with self._arrived:
                    connection.raw += data
                    self._arrived.notify_all()
                buffer += data
                while buffer:
                    try:
                        framed = parse_one(buffer)
                    except Ambiguous as exc:
                        with self._lock:
                            connection.problem = str(exc)
                        return
                    if framed is None:
                        if not continued and _expects_continue(buffer):
                            continued = True
                            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        break
                    request, used = framed
                    buffer, continued = buffer[used:], False
                    with self._lock:
                        connection.requests.append(request)
                    writer.write(self._reply(request))
                    await writer.drain()
            if buffer:
                with self._lock:
                    connection.truncated = buffer
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def start(self) -> RawUpstream:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, sock=self._sock)
            )
            ready.set()
            self._loop.run_forever()
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            self._loop.run_until_complete(self._server.wait_closed())
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())

        self._thread = threading.Thread(target=run, daemon=True, name="RawUpstream")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        """Close every connection and the listener; idempotent."""
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
        self._sock.close()  # only still open when never started
        if not self._loop.is_closed():
            self._loop.close()


def _expects_continue(buffer: bytes) -> bool:
    """Whether an incomplete request's head is whole and asks for ``100 Continue``."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return False
    fields = buffer[:end].lower().split(b"\r\n")[1:]
    return any(re.fullmatch(rb"expect:[ \t]*100-continue[ \t]*", field) for field in fields)


def _echo(request: Request) -> bytes:
    body = json.dumps({
        "method": request.method,
        "target": request.target,
        "headers": request.headers,
        "body": request.body.decode("latin-1"),
    }).encode()  # fmt: skip
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (b"" if request.method == "HEAD" else body)
