"""What the telemetry (``admin:``) and control listeners share: aiohttp's HTTP/1.1 parser with a
bound on each request head and on keep-alive idle (a sweep, as on the app listener), a Host
allow-list against DNS rebinding, the caller identified by the kernel when a connection is
accepted, bounded bodies, and every refusal answered as problem+json, audited and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from aiohttp import web

from ..access.break_glass import BreakGlass
from ..access.callers import UNKNOWN, Caller, from_socket
from ..audit.trail import Audit
from ..audit.usage import Usage
from ..config.model import Config
from ..errors import (
    HostNotAllowed,
    InvalidControlRequest,
    MethodNotAllowed,
    NotFound,
    ProblemError,
    RequestTimeout,
    TooManyConnections,
)
from ..inbound.routing import request_host
from ..inbound.runtime import Runtime
from ..log import server_log
from ..metrics import Metrics
from ..tasks import spawn
from ..wire import RequestHandler
from .unix_socket import bind_unix

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ..spiffe.workload_api import WorkloadAPI

Endpoint = Callable[[web.BaseRequest, Caller], Awaitable[web.StreamResponse]]
Check = Callable[[web.BaseRequest, Caller], None]
Admit = Callable[[Caller], ProblemError | None]
_SWEEP_INTERVAL_S = 0.25
# Per listener: telemetry is scraped by one or two clients, control used by an operator; both
# are counted in the descriptors the app listener leaves free (``app_listen.connection_limits``).
MAX_CONNECTIONS = 32
MAX_CONNECTIONS_PER_UID = 8
_LINGER_S = 2.0
_MAX_LINGERING = 16
ADMIN_DESCRIPTORS = MAX_CONNECTIONS + _MAX_LINGERING  # at most, per listener


class Sidecar(Protocol):
    """What the admin and control endpoints read from the running server."""

    @property
    def runtime(self) -> Runtime: ...
    @property
    def config(self) -> Config: ...
    @property
    def draining(self) -> bool: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def audit(self) -> Audit: ...
    @property
    def usage(self) -> Usage: ...
    @property
    def break_glass(self) -> BreakGlass: ...
    @property
    def workers(self) -> int: ...
    @property
    def workload_api(self) -> WorkloadAPI | None: ...
    def sample_gauges(self) -> None: ...


def problem_response(exc: ProblemError) -> web.Response:
    headers, body = exc.problem()
    return web.Response(status=exc.status, body=body, headers=headers)


def host_is_local(host_header: str | None, local_names: frozenset[str]) -> bool:
    """IP literals, ``localhost`` and configured ``local_names``: a DNS-rebinding page has a
    DNS name of its own, never one of these. No Host (HTTP/1.0) counts as localhost."""
    if host_header is None:
        return True
    host = request_host(host_header)
    if host is None:
        return False
    if host == "localhost" or host in local_names:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Connection(RequestHandler):
    """aiohttp's connection protocol, plus the caller (looked up when the connection is
    accepted, before any byte is read) and the time by which its next head must be complete.
    Over the listener's connection limits, or refused by its ``admit`` check, the connection
    gets one problem answer and is closed before anything is read."""

    caller: Caller
    deadline: float | None
    counted: bool
    refused: bool

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._manager
        assert isinstance(server, AdminServer)
        self.caller = from_socket(transport.get_extra_info("socket"))
        self.deadline = self._loop.time() + self.keepalive_timeout
        self.counted = False
        refusal = server.admit_connection(self.caller)
        self.refused = refusal is not None
        if refusal is None:
            self.counted = True
            super().connection_made(transport)
            return
        # aiohttp never sees this connection: one answer, then close (see ``linger``)
        headers, body = refusal.problem()
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        cast(asyncio.WriteTransport, transport).write(
            f"HTTP/1.1 {refusal.status} {refusal.code}\r\n{lines}Content-Length: "
            f"{len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
            + body
        )
        server.linger(transport)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            super().data_received(data)

    def eof_received(self) -> None:
        if not self.refused:
            super().eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.refused:
            return
        if self.counted:
            self.counted = False
            server = self._manager
            assert isinstance(server, AdminServer)
            server.release_connection(self.caller)
        super().connection_lost(exc)


class AdminServer(web.Server):
    """One listener's HTTP server: ``endpoints`` by path and method, behind the Host check and
    ``check`` (the control plane's caller check), with heads bounded by ``head_timeout_s``."""

    def __init__(
        self,
        name: str,
        endpoints: Mapping[str, Mapping[str, Endpoint]],
        *,
        local_names: Iterable[str],
        head_timeout_s: float,
        audit: Audit,
        metrics: Metrics,
        check: Check | None = None,
        admit: Admit | None = None,
    ) -> None:
        """``check``: per request, may raise a problem; ``admit``: at accept, before a byte is
        read (the control plane refuses callers ``control.allow`` does not name there)."""
        super().__init__(self._serve)
        self.name = name
        self._endpoints = endpoints
        self._local_names = frozenset(n.lower() for n in local_names)
        self._head_timeout_s = head_timeout_s
        self._audit = audit
        self._metrics = metrics
        self._check = check
        self._admit = admit
        self._open = 0
        self._lingering = 0
        self._per_uid: Counter[int | None] = Counter()
        self._sweep: asyncio.Task[None] | None = None
        self._servers: list[asyncio.Server] = []

    def __call__(self) -> _Connection:
        if self._sweep is None:
            self._sweep = spawn(
                self._close_late_every(_SWEEP_INTERVAL_S), name=f"{self.name}-sweep"
            )
        return _Connection(
            self,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self._head_timeout_s,  # aiohttp's own idle close, same bound
            access_log=None,  # type: ignore[arg-type]
            max_line_size=4096,  # a head of at most 32 × 4 KiB per connection
            max_field_size=4096,
            max_headers=32,
        )

    def admit_connection(self, caller: Caller) -> ProblemError | None:
        """Count a new connection in, or the refusal to answer it with (counted, audited)."""
        refusal: ProblemError | None = None
        if self._open >= MAX_CONNECTIONS:
            refusal = TooManyConnections(f"{self.name}: {MAX_CONNECTIONS} connections open")
        elif self._per_uid[caller.uid] >= MAX_CONNECTIONS_PER_UID:
            refusal = TooManyConnections(
                f"{self.name}: {MAX_CONNECTIONS_PER_UID} connections open from uid {caller.uid}"
            )
        elif self._admit is not None:
            refusal = self._admit(caller)
        if refusal is not None:
            self._metrics.denied.labels(refusal.code).inc()
            self._audit.emit(
                "request.denied",
                reason=refusal.code,
                listener=self.name,
                at="accept",
                caller=caller.attributes(),
            )
            server_log.warning("%s connection closed at accept: %s", self.name, refusal)
            return refusal
        self._open += 1
        self._per_uid[caller.uid] += 1
        return None

    def linger(self, transport: asyncio.BaseTransport) -> None:
        """After a refusal at accept: FIN now, close in ``_LINGER_S`` (or when the client does),
        so the client reads the answer rather than a reset; at most ``_MAX_LINGERING`` at once."""
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's are not registered as such
        if self._lingering >= _MAX_LINGERING or not writer.can_write_eof():
            transport.close()
            return
        writer.write_eof()
        self._lingering += 1

        def close() -> None:
            self._lingering -= 1
            transport.close()

        asyncio.get_running_loop().call_later(_LINGER_S, close)

    def release_connection(self, caller: Caller) -> None:
        self._open -= 1
        self._per_uid[caller.uid] -= 1
        if self._per_uid[caller.uid] <= 0:
            del self._per_uid[caller.uid]

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen on ``host:port``; returns the port bound."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self, host, port, reuse_address=True)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def listen_unix(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_unix_server(self, sock=sock))

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        self.pre_shutdown()
        await self.shutdown(1.0)
        if self._sweep is not None:
            self._sweep.cancel()
            await asyncio.gather(self._sweep, return_exceptions=True)

    async def _close_late_every(self, interval_s: float) -> None:
        """Connections whose head is not complete by its deadline (half-sent, trickled, or an
        idle keep-alive) are closed: aiohttp's parser alone would wait an hour."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            now = loop.time()
            for connection in self.connections:
                deadline = getattr(connection, "deadline", None)
                if deadline is not None and deadline <= now:
                    connection.force_close()

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = request.protocol
        caller = getattr(connection, "caller", UNKNOWN)
        if isinstance(connection, _Connection):
            connection.deadline = None  # the head is in; the body has its own bound
        try:
            if not host_is_local(request.headers.get("Host"), self._local_names):
                raise HostNotAllowed(f"Host {request.headers.get('Host', '')[:100]!r}")
            if self._check is not None:
                self._check(request, caller)
            methods = self._endpoints.get(request.path)
            if methods is None:
                raise NotFound(request.path[:100])
            endpoint = methods.get(request.method)
            if endpoint is None:
                raise MethodNotAllowed(request.method[:16])
            return await endpoint(request, caller)
        except ProblemError as exc:
            return self._refused(request, caller, exc)
        finally:
            if isinstance(connection, _Connection):
                connection.deadline = asyncio.get_running_loop().time() + self._head_timeout_s

    def _refused(self, request: web.BaseRequest, caller: Caller, exc: ProblemError) -> web.Response:
        if exc.status == 403:
            self._metrics.denied.labels(exc.code).inc()
            self._audit.emit(
                "request.denied",
                reason=exc.code,
                listener=self.name,
                method=request.method[:16],
                path=request.raw_path[:256],
                caller=caller.attributes(),
            )
            server_log.warning(
                "%s listener: %s %s refused (%s): %s; caller %s",
                self.name,
                request.method[:16],
                request.path[:100],
                exc.code,
                exc,
                caller.attributes(),
            )
        return problem_response(exc)


async def read_body(request: web.BaseRequest, *, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, at most ``max_bytes``, within ``timeout_s``."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise InvalidControlRequest(f"body of {request.content_length} bytes; at most {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidControlRequest(f"body over {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"body not complete within {timeout_s:g}s") from None
    return b"".join(chunks)


def unix_socket(path: str, mode: int, *, where: str) -> socket.socket:
    """A listening Unix socket created with ``mode`` (``unix_socket.bind_unix``: through the
    umask, in a directory no other user can write to); the directory is made (0700) if missing."""
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = bind_unix(path, mode, where=where)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def remove_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})
