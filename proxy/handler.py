"""The app-facing request handler: route → credential → inject → forward → scrub → stream back."""

from __future__ import annotations

import json
import time

import aiohttp
from aiohttp import web

from .audit import Audit
from .callers import UNKNOWN, CallerCache
from .errors import (
    DestinationNotAllowed,
    InvalidPath,
    PathEscapesRoute,
    ProblemError,
    RequestRefused,
    RouteNotFound,
)
from .forwarder import Scrubber, request_headers, response_headers, upstream_errors
from .log import access_log, server_log
from .metrics import Metrics
from .routing import normalize_path, request_host
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

    def __init__(
        self,
        runtime: Runtime,
        session: aiohttp.ClientSession,
        *,
        metrics: Metrics,
        audit: Audit,
        callers: CallerCache,
    ) -> None:
        self._runtime = runtime
        self._session = session
        self._metrics = metrics
        self._audit = audit
        self._callers = callers

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        route_name = "-"
        upstream_status = 0
        caller = UNKNOWN
        try:
            transport = request.transport
            if transport is not None:
                caller = self._callers.get(request.protocol, transport.get_extra_info("socket"))
            route, forwarded_path = self._route(request)
            route_name = route.name
            route.policy.check(caller, request.method, forwarded_path)
            response = await self._proxy(request, route, forwarded_path)
            upstream_status = response.status
            outcome = "proxied"
        except ProblemError as exc:
            exc.route = exc.route or (route_name if route_name != "-" else None)
            response = problem_response(exc)
            outcome = exc.code
            if isinstance(exc, RequestRefused):
                self._metrics.denied.labels(exc.code).inc()
                self._audit.emit(
                    "request.denied",
                    reason=exc.code,
                    route=exc.route,
                    method=request.method[:16],
                    path=request.rel_url.raw_path[:256],
                    caller=caller.attributes(),
                )
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
        target = request.message.url
        forward_proxy = target.absolute  # HTTP_PROXY users send absolute-form targets
        # No browser omits Host; a local HTTP/1.0 client may.
        host_header = request.headers.get("Host", "localhost")
        host = (target.host or "").lower() if forward_proxy else request_host(host_header)
        runtime = self._runtime
        runtime.guard.check(request.method, host, request.headers, forward_proxy=forward_proxy)
        raw_path = request.rel_url.raw_path
        if not raw_path.startswith("/"):
            raise InvalidPath("not an origin-form path")
        dotted, path = normalize_path(raw_path)
        match = runtime.table.match(host, path, host_routes_only=forward_proxy)
        if dotted != path:
            named = runtime.table.match(host, dotted, host_routes_only=forward_proxy)
            if named is not None and (match is None or named[0] != match[0]):
                raise PathEscapesRoute(f"{dotted!r} leaves its route as {path!r}")
        if match is None:
            if forward_proxy:
                raise DestinationNotAllowed(f"no route names host {host!r}")
            raise RouteNotFound(f"no route for host {host!r}")
        index, forwarded_path = match
        return runtime.routes[index], forwarded_path

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
