"""The app-facing request handler: route → credential → inject → forward → scrub → stream back."""

from __future__ import annotations

import json
import time

import aiohttp
from aiohttp import web

from .errors import (
    ForwardProxyRefused,
    MethodRefused,
    ProblemError,
    RequestRefused,
    RouteNotFound,
)
from .forwarder import Scrubber, request_headers, response_headers, upstream_errors
from .log import access_log, server_log
from .metrics import Metrics
from .routing import request_host
from .runtime import RouteRuntime, Runtime
from .token_cache import Token

_PROBLEM_PREFIX = "urn:credproxy:problem:"


def problem_response(exc: ProblemError) -> web.Response:
    """RFC 9457 body with a stable code and the class's fixed public text, never ``str(exc)``."""
    body: dict[str, object] = {
        "type": _PROBLEM_PREFIX + exc.code,
        "title": exc.code.replace("_", " "),
        "status": exc.status,
        "code": exc.code,
        "detail": exc.public_detail,
    }
    if exc.route:
        body["route"] = exc.route
    headers = {"Cache-Control": "no-store"}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(int(exc.retry_after_s))
    return web.Response(
        status=exc.status,
        body=json.dumps(body).encode(),
        content_type="application/problem+json",
        headers=headers,
    )


class Handler:
    """Called by aiohttp's low-level server for every request on an app listener."""

    def __init__(self, runtime: Runtime, session: aiohttp.ClientSession, metrics: Metrics) -> None:
        self._runtime = runtime
        self._session = session
        self._metrics = metrics

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        route_name = "-"
        upstream_status = 0
        try:
            route, forwarded_path = self._route(request)
            route_name = route.name
            response = await self._proxy(request, route, forwarded_path)
            upstream_status = response.status
            outcome = "proxied"
        except ProblemError as exc:
            exc.route = exc.route or (route_name if route_name != "-" else None)
            response = problem_response(exc)
            outcome = exc.code
            if isinstance(exc, RequestRefused):
                self._metrics.denied.labels(exc.code).inc()
            server_log.warning(
                "%s %s → %d %s: %s",
                request.method,
                request.rel_url.raw_path,
                exc.status,
                exc.code,
                exc,
            )
        duration_s = time.perf_counter() - started
        self._metrics.requests.labels(route_name, str(response.status), outcome).inc()
        self._metrics.request_duration.labels(route_name).observe(duration_s)
        access_log.info(
            "%s %s route=%s status=%d upstream=%d ms=%.1f",
            request.method,
            request.rel_url.raw_path,
            route_name,
            response.status,
            upstream_status,
            duration_s * 1000,
        )
        return response

    def _route(self, request: web.BaseRequest) -> tuple[RouteRuntime, str]:
        if request.method == "CONNECT":
            raise MethodRefused()
        if request.message.url.absolute or not request.rel_url.raw_path.startswith("/"):
            raise ForwardProxyRefused()
        host = request_host(request.headers.get("Host"))
        match = self._runtime.table.match(host, request.rel_url.raw_path)
        if match is None:
            raise RouteNotFound(f"no route for host {host!r}")
        index, forwarded_path = match
        return self._runtime.routes[index], forwarded_path

    async def _proxy(
        self, request: web.BaseRequest, route: RouteRuntime, forwarded_path: str
    ) -> web.StreamResponse:
        query = request.rel_url.raw_query_string
        url = route.target.url_for(forwarded_path + ("?" + query if query else ""))
        htu = route.target.htu_for(forwarded_path)
        headers = request_headers(request.headers, route.strip)
        body: bytes | aiohttp.StreamReader | None = None
        replayable = True
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= route.config.retry_body_max_bytes:
                body = await request.read()
            else:
                body, replayable = request.content, False
        token = await route.source.get()
        where = f"route {route.name} upstream {route.target.base}"
        for attempt in (1, 2):
            route.injector.apply(headers, token, request.method, htu, route.nonce)
            started = time.perf_counter()
            with upstream_errors(where):
                upstream = await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=route.timeout,
                    ssl=route.ssl,
                )
            self._metrics.upstream_duration.labels(route.name).observe(
                time.perf_counter() - started
            )
            if nonce := upstream.headers.get("DPoP-Nonce"):
                route.nonce = nonce
            retry = _retry_reason(upstream) if attempt == 1 and replayable else None
            if retry is None:
                break
            upstream.release()
            self._metrics.credential_retries.labels(route.name, retry).inc()
            if retry == "invalid_token":
                route.source.invalidate(token)
                token = await route.source.get()
        return await self._stream_back(request, upstream, token, where)

    async def _stream_back(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, token: Token, where: str
    ) -> web.StreamResponse:
        secret = token.value.reveal()
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=response_headers(upstream.headers, secret),
        )
        try:
            await response.prepare(request)
            scrubber = Scrubber(secret)
            with upstream_errors(where):
                async for chunk in upstream.content.iter_any():
                    await response.write(scrubber.feed(chunk))
            await response.write(scrubber.flush())
            await response.write_eof()
        except ProblemError as exc:
            # Headers are already sent: the only honest signal left is a cut connection.
            server_log.warning("%s: response cut mid-body: %s", where, exc)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            server_log.info("%s: the app closed the connection mid-response", where)
        finally:
            upstream.release()
        return response


def _retry_reason(upstream: aiohttp.ClientResponse) -> str | None:
    """RFC 6750 / RFC 9449 errors after which one replay with a new token or nonce can succeed."""
    if upstream.status != 401:
        return None
    challenge = ",".join(upstream.headers.getall("WWW-Authenticate", ()))
    if 'error="use_dpop_nonce"' in challenge and "DPoP-Nonce" in upstream.headers:
        return "use_dpop_nonce"
    if 'error="invalid_token"' in challenge:
        return "invalid_token"
    return None
