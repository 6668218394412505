"""Streams through credproxy (issue 18, defects 1 and 5): server-sent events reach the app as
the upstream sends them, through every injector, read by real clients (curl, httpx); a stream
cut by the route's total timeout is logged and counted as cut, and a route may let streams
outlive total_s."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from tests.counterparts import IdP, config, wait_until

EVENTS = 5


class EventSource:
    """An SSE upstream on loopback. ``/events`` sends its head, waits until the app has it
    (``head_seen``), then sends event i only once the app has event i-1 (``seen``): a proxy
    that held the head or an event back would stall it."""

    def __init__(self) -> None:
        self.head_seen = asyncio.Event()
        self.seen: list[asyncio.Event] = [asyncio.Event() for _ in range(EVENTS)]
        self.first_byte_at: float | None = None
        self.runner: web.AppRunner | None = None
        self.origin = ""

    async def start(self) -> EventSource:
        app = web.Application()
        app.router.add_get("/events", self._events)
        app.router.add_get("/ticks", self._ticks)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.origin = f"http://127.0.0.1:{port}"
        return self

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.wait_for(self.head_seen.wait(), timeout=10)
        for i in range(EVENTS):
            if i:
                await asyncio.wait_for(self.seen[i - 1].wait(), timeout=10)
            await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
        await response.write_eof()
        return response

    async def _ticks(self, request: web.Request) -> web.StreamResponse:
        """Six events 0.4 s apart: longer than a 1 s total_s, never silent for 1 s."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(6):
            await response.write(f"data: tick {i}\n\n".encode())
            await asyncio.sleep(0.4)
        await response.write_eof()
        return response

    def reset(self) -> None:
        self.head_seen = asyncio.Event()
        self.seen = [asyncio.Event() for _ in range(EVENTS)]

    async def aclose(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def events() -> AsyncIterator[EventSource]:
    source = await EventSource().start()
    yield source
    await source.aclose()


def _routes(idp: IdP, origin: str, audience: str, workdir: Path) -> str:
    key = workdir / "api-key"
    key.write_text("stream-static-key-0123456789")
    aws_keys = workdir / "aws-keys.json"
    aws_keys.write_text(json.dumps({"access_key_id": "AKIDSTREAM", "secret_access_key": "s" * 40}))
    routes = [
        ("bearer", "test-idp", f'audience: "{audience}", inject: bearer'),
        ("dpop", "test-idp", f'audience: "{audience}", inject: dpop'),
        ("jwt", "self", "inject: bearer"),
        ("static", "key", "inject: header, header: X-Api-Key"),
        ("sigv4", "aws", "inject: sigv4, service: s3, region: us-east-1"),
    ]
    extra_route = "".join(
        f"  - name: {name}\n    path_prefix: /{name}/\n    upstream: {origin}\n"
        f"    credential: {{issuer: {issuer}, {credential}}}\n"
        f"    allow: [{{callers: [test-suite]}}]\n"
        for name, issuer, credential in routes
    )
    extra_issuer = (
        f"  key: {{type: static, secret_file: {key}}}\n"
        "  self: {type: self_signed_jwt, iss: app, sub: app}\n"
        f"  aws: {{type: aws, static_credentials_file: {aws_keys}, region: us-east-1}}\n"
    )
    return config(
        idp=idp, upstream=origin, audience=audience,
        extra_route=extra_route, extra_issuer=extra_issuer,
    )  # fmt: skip


INJECTORS = ["bearer", "dpop", "jwt", "static", "sigv4"]


async def test_every_event_reaches_httpx_before_the_next_is_sent(
    idp, upstream, events, credproxy, tmp_path
):
    """Through every injector, httpx gets the head at once and each event before the upstream
    sends the next (the upstream waits for it): nothing is held back."""
    proc = credproxy(_routes(idp, events.origin, upstream.audience, tmp_path))
    firsts = {}
    async with httpx.AsyncClient(timeout=15) as client:
        for name in INJECTORS:
            events.reset()
            started = time.perf_counter()
            async with client.stream("GET", f"{proc.url}/{name}/events") as response:
                assert response.status_code == 200, name
                assert response.headers["content-type"] == "text/event-stream"
                events.head_seen.set()
                got: list[str] = []
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        if not got:
                            firsts[name] = (time.perf_counter() - started) * 1000
                        got.append(line)
                        events.seen[len(got) - 1].set()
            assert got == [f"data: event {i}" for i in range(EVENTS)], name
        events.reset()
        events.head_seen.set()
        for i in range(EVENTS):
            events.seen[i].set()
        started = time.perf_counter()
        async with client.stream("GET", f"{events.origin}/events") as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    firsts["direct"] = (time.perf_counter() - started) * 1000
                    break
    print("first event, ms (direct vs each route):", {k: round(v, 1) for k, v in firsts.items()})


async def test_curl_reads_each_event_as_it_is_sent(idp, upstream, events, credproxy, tmp_path):
    """curl -N through credproxy prints each event before the upstream sends the next (curl
    may write the head only with the body: httpx's test above guards the head)."""
    proc = credproxy(_routes(idp, events.origin, upstream.audience, tmp_path))
    for name in INJECTORS:
        events.reset()
        events.head_seen.set()
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-N", "--max-time", "20", f"{proc.url}/{name}/events",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert curl.stdout is not None
        got: list[str] = []
        while line := await curl.stdout.readline():
            if line.startswith(b"data: "):
                got.append(line.strip().decode())
                events.seen[len(got) - 1].set()
        assert await curl.wait() == 0, name
        assert got == [f"data: event {i}" for i in range(EVENTS)], name


async def test_a_stream_cut_by_total_s_is_counted_as_cut_unless_the_route_lets_it_run(
    idp, upstream, events, credproxy, tmp_path, client
):
    """A 2.4 s stream on a route with total_s 1 is cut, and the access log and the request
    counter say upstream_timeout (not a success); with streams_outlive_total it runs to its
    end, bounded by idle_s alone."""
    text = (
        _routes(idp, events.origin, upstream.audience, tmp_path)
        .replace(
            "  - name: static\n",
            "  - name: static\n    timeouts: {idle_s: 1, total_s: 1}\n",
        )
        .replace(
            "  - name: sigv4\n",
            "  - name: sigv4\n    timeouts: {idle_s: 1, total_s: 1, streams_outlive_total: true}\n",
        )
    )
    proc = credproxy(text.replace("log: {format: json}", "log: {format: json, access: true}"))
    cut = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "--max-time", "20", f"{proc.url}/static/ticks",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await cut.communicate()
    assert await cut.wait() == 18  # curl: transfer closed with outstanding read data
    assert 0 < out.count(b"data: tick") < 6
    whole = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "--max-time", "20", f"{proc.url}/sigv4/ticks",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await whole.communicate()
    assert whole.returncode == 0 and out.count(b"data: tick") == 6
    expected = (  # written by the access log's thread, just after the answers
        "route=static status=200 upstream=200 outcome=upstream_timeout",
        "route=sigv4 status=200 upstream=200 outcome=proxied",
    )
    wait_until(lambda: all(line in proc.log() for line in expected), what="the access lines")
    async with client.get(proc.admin_url + "/metrics") as response:
        metrics = await response.text()
    assert 'route="static"' in metrics and 'outcome="upstream_timeout"' in metrics
