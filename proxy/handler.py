"""The app-facing request handler: route → credential → inject → forward → scrub → stream back."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .audit import Audit
from .callers import UNKNOWN, Caller, CallerCache
from .errors import (
    DestinationNotAllowed,
    InvalidPath,
    PathEscapesRoute,
    PayloadTooLarge,
    ProblemError,
    RequestRefused,
    RequestTimeout,
    RouteNotFound,
    TransferCodingNotImplemented,
)
from .forwarder import Scrubber, request_headers, response_headers, upstream_errors
from .injectors import Outbound
from .log import access_log, server_log
from .metrics import Metrics
from .routing import normalize_path, request_host
from .runtime import RouteRuntime, Runtime
from .usage import Usage

_PROBLEM_PREFIX = "urn:credproxy:problem:"
_MAX_CONTENT_LENGTH = 2**63 - 1  # beyond, signed 64-bit parsers upstream overflow


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
        usage: Usage,
        body_idle_s: float = 30.0,
    ) -> None:
        self.runtime = runtime  # replaced whole on reload (SIGHUP)
        self._session = session
        self._metrics = metrics
        self._audit = audit
        self._callers = callers
        self._usage = usage
        self._body_idle_s = body_idle_s

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        route_name = "-"
        upstream_status = 0
        caller = UNKNOWN
        try:
            transport = request.transport
            if transport is not None:
                caller = self._callers.get(request.protocol, transport)
            runtime = self.runtime  # one config for the whole request, even across a reload
            route, forwarded_path = self._route(runtime, request)
            route_name = route.name
            route.policy.check(caller, request.method, forwarded_path)
            response = await self._proxy(request, route, forwarded_path, caller)
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
        except Exception:  # a bug, not the app's fault: still a problem+json, never a trace
            server_log.exception("%s %s: unexpected error", request.method, route_name)
            response, outcome = problem_response(ProblemError()), "internal_error"
        duration_s = time.perf_counter() - started
        self._metrics.count_request(route_name, response.status, outcome, duration_s)
        if access_log.isEnabledFor(logging.INFO):  # nothing formatted when access is off
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

    def _route(self, runtime: Runtime, request: web.BaseRequest) -> tuple[RouteRuntime, str]:
        # HTTP_PROXY users send absolute-form targets; raw_path is the request-target as sent.
        forward_proxy = "://" in request.raw_path and not request.raw_path.startswith("/")
        if forward_proxy:
            try:  # raw_host: as sent, never IDNA-decoded (route hosts are ASCII)
                host: str | None = (URL(request.raw_path).raw_host or "").lower()
            except ValueError:
                raise DestinationNotAllowed("undecodable absolute-form target") from None
        else:  # No browser omits Host; a local HTTP/1.0 client may.
            host = request_host(request.headers.get("Host", "localhost"))
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
        self, request: web.BaseRequest, route: RouteRuntime, forwarded_path: str, caller: Caller
    ) -> web.StreamResponse:
        query = request.rel_url.raw_query_string
        injector = route.injector
        body, replayable = await _request_body(request, route, self._body_idle_s)
        outbound = Outbound(
            method=request.method,
            url=route.target.url_for(forwarded_path + ("?" + query if query else "")),
            htu=route.target.htu_for(forwarded_path),
            headers=_framed(request_headers(request.headers, route.strip), request),
            body=body if isinstance(body, bytes) else None,
            has_body=body is not None,
        )
        token = await route.source.get()
        where = f"route {route.name} upstream {route.target.base}"
        prefetched: bytes | None = None
        for attempt in (1, 2):
            outbound.nonce = route.nonce
            injector.apply(outbound, token)
            started = time.perf_counter()
            with upstream_errors(where):
                upstream = await self._session.request(
                    request.method,
                    outbound.url,
                    headers=outbound.headers,
                    data=injector.encode(outbound, body),
                    allow_redirects=False,
                    timeout=route.timeout,
                    ssl=route.tls.current(),
                )
            self._metrics.observe_upstream(route.name, time.perf_counter() - started)
            if nonce := upstream.headers.get("DPoP-Nonce"):
                route.nonce = nonce
            if attempt == 2 or not replayable:
                break
            retry = _retry_reason(upstream)
            if retry is None and injector.clock_sensitive and upstream.status == 403:
                with upstream_errors(where):
                    prefetched = await _small_body(upstream)
                if prefetched is not None and injector.corrects_clock(
                    403, prefetched, upstream.headers.get("Date")
                ):
                    retry, prefetched = "clock_skew", None
            if retry is None:
                break
            upstream.release()
            self._metrics.credential_retries.labels(route.name, retry).inc()
            if retry == "invalid_token":
                route.source.invalidate(token)
                token = await route.source.get()
        key = route.source.key
        self._usage.record(
            route=route.name,
            issuer=key.issuer,
            label=key.label,
            fingerprint=token.fingerprint,
            caller=caller,
            method=request.method,
            path=forwarded_path,
        )
        return await self._stream_back(request, upstream, outbound.secret, where, prefetched)

    async def _stream_back(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        secret: str,
        where: str,
        prefetched: bytes | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=response_headers(upstream.headers, secret),
        )
        try:
            await response.prepare(request)
            scrubber = Scrubber(secret)
            if prefetched is not None:
                await response.write(scrubber.feed(prefetched))
            else:
                chunks = upstream.content.iter_any()
                while True:
                    with upstream_errors(
                        where
                    ):  # the upstream's read only: a write error is the app's
                        chunk = await anext(chunks, b"")
                    if not chunk:
                        break
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


def _framed(headers: CIMultiDict[str], request: web.BaseRequest) -> CIMultiDict[str]:
    """The app's Content-Length re-serialised from the parsed value: the proxy's own framing."""
    if "Content-Length" in headers and request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    return headers


async def _request_body(
    request: web.BaseRequest, route: RouteRuntime, idle_s: float
) -> tuple[bytes | aiohttp.StreamReader | None, bool]:
    """The body to send and whether it can be sent twice. Streams unless the injector must hash
    it (bounded: 413 beyond) or it is small enough to keep for one replay."""
    codings = ",".join(request.headers.getall("Transfer-Encoding", ())).lower()
    if codings and [c.strip() for c in codings.split(",") if c.strip() != "identity"] != [
        "chunked"
    ]:
        raise TransferCodingNotImplemented(f"Transfer-Encoding {codings[:60]!r}")
    if not request.body_exists:
        return None, True
    length = request.content_length
    if length is not None and length > _MAX_CONTENT_LENGTH:
        raise PayloadTooLarge(f"Content-Length {length}")
    bound = route.injector.body_max_bytes
    if route.injector.needs_body and length is not None and length > bound:
        raise PayloadTooLarge(f"body of {length} bytes, route limit {bound}")
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if route.injector.needs_body:
        return await _read_body(request, bound, idle_s), True
    if length is not None and length <= route.config.retry_body_max_bytes:
        return await _read_body(request, length, idle_s), True
    return request.content, False


async def _read_body(request: web.BaseRequest, bound: int, idle_s: float) -> bytes:
    """The whole body, at most ``bound`` bytes (413 beyond), each read within ``idle_s`` (408)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await request.content.readany()
        except TimeoutError:
            raise RequestTimeout(f"no request body byte for {idle_s:g}s") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > bound:
            raise PayloadTooLarge(f"body over the route limit of {bound} bytes")
        chunks.append(chunk)


async def _small_body(upstream: aiohttp.ClientResponse) -> bytes | None:
    """An error body worth inspecting: small and of known length; None leaves it streaming."""
    if upstream.content_length is None or upstream.content_length > 65536:
        return None
    return await upstream.read()


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
