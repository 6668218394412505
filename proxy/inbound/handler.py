"""The app-facing request handler: route → credential → inject → forward, then the answer
relayed and scrubbed back (``inbound.answer``)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable

from ..access.break_glass import BreakGlass
from ..access.callers import Caller
from ..audit.trail import Audit
from ..audit.usage import Usage
from ..credentials.injectors import Outbound
from ..errors import (
    AnswerFormat,
    CallerNotAllowed,
    CallerNotIdentified,
    DestinationNotAllowed,
    InternalError,
    InvalidPath,
    PathNotAllowed,
    ProblemError,
    RequestRefused,
    RouteNotFound,
    UpstreamCompressedAnswer,
    UpstreamError,
)
from ..log import ACCESS, server_log
from ..metrics import Metrics
from ..outbound.h2_upstream import H2Upstreams, NoH2
from ..outbound.hygiene import mask_echoes, request_headers
from ..outbound.upstream import Answer, Body, Upstreams, request_head
from .answer import REASONS, compressed, retry_reason, small_body, stream_back
from .body import framed, request_body
from .h2 import H2Request, grpc_status
from .request import AppRequest
from .routing import overridden, request_host
from .runtime import RouteRuntime, Runtime
from .websocket import WebSocketUpgrade


def send_problem(request: AppRequest, exc: ProblemError) -> None:
    if isinstance(request, H2Request) and request.is_grpc:  # gRPC clients read grpc-status
        request.send_grpc_status(grpc_status(exc.code, exc.status), exc.public_detail)
        return
    headers, body = exc.answer()
    request.send(exc.status, REASONS.get(exc.status, ""), headers, body)


class Handler:
    """Called by the app listener (``app_server``) for every request, one at a time per
    connection; it always answers, with the upstream's answer or a problem."""

    def __init__(
        self,
        runtime: Runtime,
        upstreams: Upstreams,
        *,
        metrics: Metrics,
        audit: Audit,
        usage: Usage,
        body_idle_s: float = 30.0,
        break_glass: BreakGlass | None = None,
        h2_upstreams: H2Upstreams | None = None,
    ) -> None:
        self.runtime = runtime  # replaced whole on reload (SIGHUP)
        self._upstreams = upstreams
        self._h2_upstreams = h2_upstreams if h2_upstreams is not None else H2Upstreams()
        self._metrics = metrics
        self._audit = audit
        self._usage = usage
        self._body_idle_s = body_idle_s
        self._break_glass = break_glass

    def admit(self, caller: Caller, over_limit: ProblemError | None) -> ProblemError | None:
        """At accept, before a byte is read: refuse a connection over the limits, or whose
        caller the kernel could not identify or no rule under ``callers`` names (no route
        could allow it). A refusal is counted and audited; the listener answers and closes."""
        refusal = over_limit
        if refusal is None and not self.runtime.admission.admits(caller):
            refusal = (
                CallerNotAllowed(f"no rule under callers matches uid {caller.uid}")
                if caller.identified
                else CallerNotIdentified("the peer's socket is closed, unknown or not local")
            )
        if refusal is not None:
            self._metrics.denied.labels(refusal.code).inc()
            self._audit.emit(
                "request.denied", reason=refusal.code, at="accept", caller=caller.attributes()
            )
        return refusal

    async def __call__(self, request: AppRequest) -> None:
        started = time.perf_counter()
        route_name = "-"
        answer_as: AnswerFormat = "problem"
        upgrade: WebSocketUpgrade | None = None
        caller = request.connection.caller
        runtime = self.runtime  # one config for the whole request, even across a reload
        batch = runtime.signing.batch
        batch.requests += 1
        try:
            route, forwarded_path = self._route(runtime, request)
            route_name, answer_as = route.name, route.injector.answer_as
            if route.policy.needs_process:  # a process may have obtained the socket since
                caller.recheck()
            try:
                route.policy.check(caller, request.method, forwarded_path)
            except (CallerNotAllowed, PathNotAllowed):
                if self._break_glass is None or not self._break_glass.permits(
                    route.name, caller, request.method, forwarded_path, runtime.config.callers
                ):
                    raise
            if route.config.allow_method_override:  # what the upstream may serve instead
                for method, path in overridden(request.headers, request.method, forwarded_path):
                    route.policy.check(caller, method, path)
            if request.message.upgrade:  # WebSocket, or refused: never a plain request
                upgrade = WebSocketUpgrade.of(request, batch, started)
            upstream_status, outcome = await self._proxy(
                request, route, forwarded_path, caller, upgrade
            )
            if upgrade is not None:
                outcome = upgrade.outcome
        except ProblemError as exc:
            exc.route = exc.route or (route_name if route_name != "-" else None)
            exc.answer_as = exc.answer_as if answer_as == "problem" else answer_as
            upstream_status, outcome = 0, exc.code
            if isinstance(exc, RequestRefused):
                self._metrics.denied.labels(exc.code).inc()
                self._audit.emit(
                    "request.denied",
                    reason=exc.code,
                    route=exc.route,
                    method=request.method[:16],
                    path=request.url.raw_path[:256],
                    caller=caller.attributes(),
                )
            server_log.warning(
                "%s %s → %d %s: %s", request.method, request.url.raw_path, exc.status, exc.code, exc
            )
            self._answer_problem(request, exc)
        except ConnectionError:  # the app left before its answer began
            server_log.info("%s %s: the app closed the connection", request.method, route_name)
            upstream_status, outcome = 0, "app_closed"
            request.keep_alive = False
        except Exception:  # a bug, not the app's fault: still a problem+json, never a trace
            server_log.exception("%s %s: unexpected error", request.method, route_name)
            upstream_status, outcome = 0, "internal_error"
            self._answer_problem(request, InternalError())
        finally:
            batch.requests -= 1
        duration_s = time.perf_counter() - started
        self._metrics.count_request(
            route_name,
            request.status,
            outcome,
            duration_s if upgrade is None else upgrade.request_s(duration_s),
        )
        grpc = "-"
        if isinstance(request, H2Request):
            grpc = request.grpc_status or "-"
            self._metrics.http2_streams.labels(route_name, grpc).inc()
        if not ACCESS.enabled:
            return
        path = request.url.raw_path
        ms = duration_s * 1000
        if upgrade is not None and upgrade.ended:
            ACCESS.write(
                f"{request.method} {path} route={route_name} status={request.status} "
                f"upstream={upstream_status} ms={ms:.1f} websocket={upgrade.ended} "
                f"up_bytes={upgrade.up_bytes} down_bytes={upgrade.down_bytes}"
            )
        elif isinstance(request, H2Request):
            ACCESS.write(
                f"{request.method} {path} route={route_name} status={request.status} "
                f"upstream={upstream_status} outcome={outcome} ms={ms:.1f} protocol=h2 "
                f"grpc_status={grpc}"
            )
        else:
            ACCESS.write(
                f"{request.method} {path} route={route_name} status={request.status} "
                f"upstream={upstream_status} outcome={outcome} ms={ms:.1f}"
            )

    @staticmethod
    def _answer_problem(request: AppRequest, exc: ProblemError) -> None:
        if request.status:  # the answer had begun: a cut connection is the only signal left
            request.abort()
            return
        try:
            send_problem(request, exc)
        except ConnectionError:
            request.keep_alive = False

    def _route(self, runtime: Runtime, request: AppRequest) -> tuple[RouteRuntime, str]:
        # HTTP_PROXY users send absolute-form targets; target is the request-target as sent.
        target = request.target
        url = request.url
        forward_proxy = "://" in target and not target.startswith("/")
        if forward_proxy:  # raw_host: as sent, never IDNA-decoded (route hosts are ASCII)
            host: str | None = (url.raw_host or "").lower()
            transport = request.connection.transport
            sockname = transport.get_extra_info("sockname") if transport is not None else None
            if runtime.guard.is_listener(url.scheme, host or "", url.port, sockname):
                forward_proxy = False  # an origin-form request written in absolute form
        else:  # No browser omits Host; a local HTTP/1.0 client may.
            host = request_host(request.headers.get("Host", "localhost"))
        runtime.guard.check(request.method, host, request.headers, forward_proxy=forward_proxy)
        raw_path = url.raw_path
        if not raw_path.startswith("/"):
            raise InvalidPath("not an origin-form path")
        try:
            match = runtime.table.route(host, raw_path, host_routes_only=forward_proxy)
        except ProblemError as exc:  # refused on a route: in that route's error format
            if exc.route is not None:
                exc.answer_as = runtime.route_named(exc.route).injector.answer_as
            raise
        if match is None:
            if forward_proxy:
                raise DestinationNotAllowed(f"no route names host {host!r}")
            raise RouteNotFound(f"no route for host {host!r}")
        index, forwarded_path = match
        return runtime.routes[index], forwarded_path

    async def _proxy(
        self,
        request: AppRequest,
        route: RouteRuntime,
        forwarded_path: str,
        caller: Caller,
        upgrade: WebSocketUpgrade | None = None,
    ) -> tuple[int, str]:
        """Forward, stream the answer back (or splice, after a WebSocket's 101); return the
        upstream's status and the outcome."""
        query = request.url.raw_query_string
        injector = route.injector
        body, replayable = await request_body(request, route, self._body_idle_s)
        outbound = Outbound(
            method=request.method,
            origin=route.target.origin,
            path_qs=route.target.path_qs_for(forwarded_path + ("?" + query if query else "")),
            htu=route.target.htu_for(forwarded_path),
            headers=framed(request_headers(request.headers, route.strip), request),
            body=body if isinstance(body, bytes) else None,
            has_body=body is not None,
        )
        if injector.usable_if_echoed:  # an echo must come back where the scrubber can see it
            outbound.headers["Accept-Encoding"] = "identity"
        if upgrade is not None:
            upgrade.prepare(outbound.headers)
        token = await route.source.get()
        tls = route.tls.current()
        certificate = None
        if route.certificate is not None:  # mTLS with a certificate issued into memory
            certificate = await route.certificate.get()
            assert certificate.certificate is not None
            tls = route.tls.presenting(certificate.certificate, certificate.value)
        where = route.where
        prefetched: bytes | None = None
        for attempt in (1, 2):
            outbound.nonce = route.nonce
            await injector.apply(outbound, token)
            sent = injector.encode(outbound, body)
            started = time.perf_counter()
            try:
                answer = await self._exchange(request, route, tls, outbound, sent, upgrade)
            except UpstreamError as exc:
                _mask(exc, outbound.secret)
                raise
            self._metrics.observe_upstream(route.name, time.perf_counter() - started)
            headers = answer.message.headers
            if nonce := headers.get("DPoP-Nonce"):
                route.nonce = nonce
            if attempt == 2 or not replayable:
                break
            retry = retry_reason(answer)
            if retry is None and injector.clock_sensitive and answer.status == 403:
                prefetched = await small_body(answer)
                if prefetched is not None and injector.corrects_clock(
                    403, prefetched, headers.get("Date")
                ):
                    retry, prefetched = "clock_skew", None
            if retry is None:
                break
            answer.release()
            self._metrics.credential_retries.labels(route.name, retry).inc()
            if retry == "invalid_token":
                route.source.invalidate(token)
                token = await route.source.get()
        uses = [(route.source.key, token.fingerprint)]
        if route.certificate is not None and certificate is not None:
            uses.append((route.certificate.key, certificate.fingerprint))
        for key, fingerprint in uses:
            self._usage.record(
                route=route.name,
                issuer=key.issuer,
                label=key.label,
                fingerprint=fingerprint,
                caller=caller,
                method=request.method,
                path=forwarded_path,
            )
        if upgrade is not None and answer.status == 101:
            await upgrade.splice(request, answer, outbound.secret, route, self._metrics)
            return answer.status, upgrade.outcome
        if injector.usable_if_echoed and compressed(answer, request.method):
            answer.release()
            raise UpstreamCompressedAnswer(f"{where}: Content-Encoding despite identity asked")
        outcome = await stream_back(request, answer, outbound.secret, where, prefetched)
        return answer.status, outcome

    def _exchange(
        self,
        request: AppRequest,
        route: RouteRuntime,
        tls: ssl.SSLContext | bool,
        outbound: Outbound,
        sent: Body,
        upgrade: WebSocketUpgrade | None,
    ) -> Awaitable[Answer]:
        """Send the request on the route's upstream protocol: HTTP/1.1 (the default, and
        WebSocket handshakes) straight to the pool, no coroutine of its own on the hot path;
        else HTTP/2 (``h2``, ``h2c``, ``auto`` where ALPN chooses it)."""
        if route.config.upstream_protocol == "http1.1" or upgrade is not None:
            return self._http1(request.method, route, tls, outbound, sent, upgrade is not None)
        return self._h2(request, route, tls, outbound, sent)

    def _http1(
        self,
        method: str,
        route: RouteRuntime,
        tls: ssl.SSLContext | bool,
        outbound: Outbound,
        sent: Body,
        upgrade: bool,
    ) -> Awaitable[Answer]:
        head, chunked = request_head(
            method, outbound.path_qs, route.origin.host_header, outbound.headers, sent
        )
        return self._upstreams.exchange(
            route.origin,
            tls,
            head,
            sent,
            chunked=chunked,
            method=method,
            timeouts=route.timeouts,
            where=route.where,
            upgrade=upgrade,
        )

    async def _h2(
        self,
        request: AppRequest,
        route: RouteRuntime,
        tls: ssl.SSLContext | bool,
        outbound: Outbound,
        sent: Body,
    ) -> Answer:
        method = request.method

        def trailers() -> list[tuple[bytes, bytes]]:  # the app's, minus what the route strips
            drop = route.strip
            return [(n, v) for n, v in request.trailer_fields() if n.decode().lower() not in drop]

        auto = route.config.upstream_protocol == "auto"
        h2 = self._h2_upstreams
        if not auto or h2.may_speak_h2(route.origin, tls):
            try:
                return await h2.exchange(
                    route.origin,
                    tls,
                    method,
                    outbound.path_qs,
                    outbound.headers,
                    sent,
                    timeouts=route.timeouts,
                    where=route.where,
                    fallback=auto,
                    trailers=trailers,
                )
            except NoH2:
                if not auto:
                    raise
                # ALPN chose HTTP/1.1: remembered for the origin, the request goes that way
        return await self._http1(method, route, tls, outbound, sent, False)


def _mask(exc: UpstreamError, secret: str) -> None:
    """Mask any echo of the credential in ``exc``'s text: a second line of defence, as the
    upstream layer never quotes what an upstream sent."""
    if secret:
        exc.args = (mask_echoes(str(exc).encode(), secret).decode(errors="replace"),)
