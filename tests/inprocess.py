"""The request path assembled in the test's own event loop, without a process, an IdP or a port
for the app: a config parsed from YAML, ``lifecycle.assembly.build``, a real ``Handler`` behind a
real ``AppListener`` reached over a socketpair, and a tiny aiohttp upstream on loopback that
records what it received. Unit tests of the hot-path modules build on it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.audit.trail import Audit
from proxy.audit.usage import Usage
from proxy.config.loader import parse
from proxy.inbound.handler import Handler
from proxy.inbound.listener import AppListener, Limits
from proxy.inbound.runtime import Runtime
from proxy.lifecycle.assembly import build
from proxy.metrics import Metrics
from proxy.outbound.upstream import Upstreams

UID = os.getuid()  # a socketpair's peer is this process: SO_PEERCRED names our own uid


@dataclass
class Received:
    """One request as the upstream's aiohttp server parsed it."""

    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """A loopback aiohttp server answering with ``answer`` (default: 200 ``ok``); every request
    is recorded before its body is read, so a request whose body never comes is still seen."""

    url: str
    seen: list[Received] = field(default_factory=list)
    answer: Callable[[web.Request, Received], Awaitable[web.StreamResponse]] | None = None


@asynccontextmanager
async def upstream_server() -> AsyncIterator[Upstream]:
    upstream = Upstream(url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        received = Received(request.method, request.path_qs, dict(request.headers), b"")
        upstream.seen.append(received)
        received.body = await request.read()
        if upstream.answer is not None:
            return await upstream.answer(request, received)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    upstream.url = f"http://127.0.0.1:{port}"
    try:
        yield upstream
    finally:
        await runner.cleanup()


def config_text(upstream_url: str, secret_file: Path, *, route_extra: str = "") -> str:
    """One static-secret route ``/api/`` (bearer) to ``upstream_url``, open to this uid."""
    return f"""
listen: 127.0.0.1:0
issuers:
  key: {{type: static, secret_file: {secret_file}}}
callers:
  me: {{uid: {UID}}}
routes:
  - name: api
    path_prefix: /api/
    upstream: {upstream_url}
    credential: {{issuer: key, inject: bearer}}
    allow: [{{callers: [me]}}]
{route_extra}
"""


@dataclass
class Sidecar:
    """The in-process request path: ``connect()`` opens an app connection to it."""

    runtime: Runtime
    handler: Handler
    listener: AppListener
    metrics: Metrics
    audit: Audit
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await connect(self.listener, self._writers)


async def connect(
    listener: AppListener, opened: list[asyncio.StreamWriter] | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An app connection over a socketpair, accepted by ``listener`` as a server would."""
    ours, theirs = socket.socketpair()
    await asyncio.get_running_loop().connect_accepted_socket(listener, ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    if opened is not None:
        opened.append(writer)
    return reader, writer


@asynccontextmanager
async def sidecar(config: str, tmp_path: Path) -> AsyncIterator[Sidecar]:
    """``config`` (YAML) assembled and served as ``lifecycle.server`` does, minus the sockets."""
    parsed = parse(config)
    metrics = Metrics()
    audit = Audit(str(tmp_path / "audit.jsonl"))
    upstreams = Upstreams()
    async with aiohttp.ClientSession() as session:
        runtime = build(parsed, session=session, metrics=metrics, audit=audit)
        handler = Handler(
            runtime,
            upstreams,
            metrics=metrics,
            audit=audit,
            usage=Usage(audit, mode="off", interval_s=60.0),
            body_idle_s=5.0,
        )
        limits = parsed.app_limits
        listener = AppListener(
            handler,
            handler.admit,
            keepalive_s=30.0,
            limits=Limits(
                limits.max_head_bytes, limits.max_connections, limits.max_connections_per_uid
            ),
        )
        side = Sidecar(runtime, handler, listener, metrics, audit)
        try:
            yield side
        finally:
            for writer in side._writers:
                writer.close()
            await listener.drain(0.0)
            upstreams.close()
            await runtime.aclose()
            audit.aclose()


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; a repeated name keeps its last value
    body: bytes


async def read_response(reader: asyncio.StreamReader, *, method: str = "GET") -> Response:
    """One HTTP/1.1 answer, framed by Content-Length or chunked (what credproxy writes)."""
    async with asyncio.timeout(10):  # a hang guard, not an assertion
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if method == "HEAD" or status in (204, 304):
            pass
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await reader.read()
    return Response(status, headers, body)


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the peer closed: EOF (or a reset) with nothing more to read."""
    async with asyncio.timeout(10):  # a hang guard, not an assertion
        try:
            return await reader.read() == b""
        except ConnectionError:
            return True
