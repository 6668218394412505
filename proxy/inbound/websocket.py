"""WebSocket upgrades (RFC 6455) through the whole pipeline, and every other ``Upgrade`` refused.

The handler checks the handshake here (``WebSocketUpgrade.of``) once caller, route and policy
have passed, forwards it with the route's credential (a DPoP proof's ``htm`` is GET and its
``htu`` the handshake's target URI: RFC 9449 §4.2 names the HTTP target URI, RFC 9110 §7.1,
which is ``http``/``https`` for a ``ws``/``wss`` resource), checks the upstream's ``101``
(``Sec-WebSocket-Accept`` for the app's key) and passes it on; then ``outbound.tunnel`` splices
the two connections. Frames after the handshake are not read: an upstream echoing the
credential inside one is not scrubbed (README, security).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time

from multidict import CIMultiDict

from ..credentials.signing import SignatureBatch
from ..errors import InvalidWebSocketHandshake, UpgradeNotSupported, UpstreamProtocolError
from ..metrics import Metrics
from ..outbound.hygiene import response_head_lines
from ..outbound.tunnel import Tunnel
from ..outbound.upstream import Answer
from .request import AppGone, AppRequest
from .runtime import RouteRuntime

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"


def _tokens(values: list[str]) -> list[str]:
    return [t.strip().lower() for value in values for t in value.split(",") if t.strip()]


def session_limits(route: RouteRuntime) -> tuple[float, float | None]:
    """(idle, total) seconds for a spliced session: the route's ``timeouts``, where
    ``streams_outlive_total`` lifts ``total_s`` as for event streams. The one place these are
    decided (``total`` None: no total limit)."""
    timeouts = route.timeouts
    return timeouts.idle_s, None if timeouts.streams_outlive_total else timeouts.total_s


class WebSocketUpgrade:
    """One app request that asked to switch protocols: checked by ``of``; after ``splice``,
    the session's figures for the access log."""

    __slots__ = ("_accept", "_batch", "_started", "handshake_s", "ended", "up_bytes", "down_bytes")

    def __init__(self, key: str, batch: SignatureBatch, started: float) -> None:
        self._accept = base64.b64encode(
            hashlib.sha1(key.encode() + _ACCEPT_GUID, usedforsecurity=False).digest()
        )
        self._batch = batch
        self._started = started  # the request's, on ``time.perf_counter``
        self.handshake_s: float | None = None  # request to 101, once spliced
        self.ended = ""
        self.up_bytes = self.down_bytes = 0

    @classmethod
    def of(cls, request: AppRequest, batch: SignatureBatch, started: float) -> WebSocketUpgrade:
        """The request's upgrade, if a valid WebSocket opening handshake (RFC 6455 §4.1); any
        other protocol is refused (501), a malformed handshake too (400)."""
        headers = request.headers
        if _tokens(headers.getall("Upgrade", [])) != ["websocket"]:
            raise UpgradeNotSupported(f"Upgrade {','.join(headers.getall('Upgrade', []))[:60]!r}")
        key = headers.getall("Sec-WebSocket-Key", [])
        if (
            request.method != "GET"
            or request.version < (1, 1)
            or "Content-Length" in headers
            or "Transfer-Encoding" in headers
            or headers.getall("Sec-WebSocket-Version", []) != ["13"]
            or len(key) != 1
            or not _is_key(key[0])
        ):
            raise InvalidWebSocketHandshake("not a valid WebSocket opening handshake")
        return cls(key[0].strip(), batch, started)

    @staticmethod
    def prepare(headers: CIMultiDict[str]) -> None:
        """The handshake's hop-by-hop fields, which header hygiene took off the app's request
        (its ``Sec-WebSocket-*`` fields go through as they are)."""
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = "websocket"

    def request_s(self, duration_s: float) -> float:
        """The request's duration as ``credproxy_request_duration_seconds`` counts it: to the
        answer's head, the 101 for a spliced session."""
        return duration_s if self.handshake_s is None else self.handshake_s

    @property
    def outcome(self) -> str:
        """For ``credproxy_requests_total``: ``proxied``, or how a spliced session ended."""
        return "proxied" if self.ended in ("", "app_closed", "upstream_closed") else self.ended

    async def splice(
        self,
        request: AppRequest,
        answer: Answer,
        secret: str,
        route: RouteRuntime,
        metrics: Metrics,
    ) -> None:
        """The upstream switched: check its 101, send it to the app, splice until both close."""
        headers = answer.message.headers
        if headers.get("Sec-WebSocket-Accept", "").encode() != self._accept or _tokens(
            headers.getall("Upgrade", [])
        ) != ["websocket"]:
            answer.release()
            raise UpstreamProtocolError(f"{route.where}: 101 with a wrong Sec-WebSocket-Accept")
        upstream, tail = answer.switched(route.where)
        connection = request.connection
        app = connection.transport
        if app is None or app.is_closing():
            upstream.abort()
            raise AppGone("the app closed the connection before the 101")
        lines, _ = response_head_lines(answer.message.raw_headers, secret)  # hop-by-hop dropped
        request.status = 101
        tunnel = Tunnel(app, upstream, on_app_lost=connection.connection_lost)
        tunnel.start(_SWITCHED + lines + b"\r\n" + tail)
        self.handshake_s = time.perf_counter() - self._started
        name = route.name
        up = metrics.websocket_bytes.labels(name, "up")
        down = metrics.websocket_bytes.labels(name, "down")

        def report(up_bytes: int, down_bytes: int) -> None:
            up.inc(up_bytes)
            down.inc(down_bytes)

        active = metrics.websockets_active.labels(name)
        active.inc()
        self._batch.requests -= 1  # a session is no request in progress for signature batches
        try:
            self.ended = await tunnel.run(*session_limits(route), report)
        finally:
            self._batch.requests += 1
            active.dec()
            self.up_bytes, self.down_bytes = tunnel.up_bytes, tunnel.down_bytes
            self.ended = self.ended or tunnel.ended or "cancelled"
            metrics.websocket_sessions.labels(name, self.ended).inc()
            metrics.websocket_duration.labels(name).observe(
                time.perf_counter() - self._started - self.handshake_s
            )


def _is_key(value: str) -> bool:
    try:
        return len(base64.b64decode(value.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False
