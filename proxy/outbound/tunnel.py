"""Two connections joined byte for byte after a protocol switch (a WebSocket's ``101``).

Each side's bytes are written to the other as they arrive, on the transports' own callbacks (no
task, no copy, no queue); reading one side pauses while the other's write buffer is over its
high-water mark. When one side ends, the other is closed once what it was sent is flushed
(a half-close is passed on where the transport allows). Silence (no byte either way) for
``idle_s``, or a session longer than ``total_s``, cuts both. Nothing here reads the bytes:
frames are neither parsed nor scrubbed.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

_REPORT_S = 5.0  # how often a long session's byte counts are reported (live metrics)

Lost = Callable[[BaseException | None], None]
Report = Callable[[int, int], None]  # bytes (app → upstream, upstream → app) since the last call


class _End(asyncio.Protocol):
    """One side's protocol once spliced: what it receives goes to the other side."""

    __slots__ = ("_tunnel", "transport", "peer", "received", "eof", "lost", "_on_lost")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport, on_lost: Lost | None) -> None:
        self._tunnel = tunnel
        self.transport = transport
        self.peer: _End = self
        self.received = 0  # bytes read from this side (and written to the other)
        self.eof = False
        self.lost = False
        self._on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self._tunnel.active_at = self._tunnel.loop.time()
        self.peer.transport.write(data)

    def pause_writing(self) -> None:  # this side is slow to read: stop reading the other
        _pause(self.peer.transport)

    def resume_writing(self) -> None:
        self._tunnel.active_at = self._tunnel.loop.time()
        _resume(self.peer.transport)

    def eof_received(self) -> bool:
        """Half-close passed on where the other transport can (TCP), else the other is closed;
        both are closed once both have ended."""
        self.eof = True
        self._tunnel.end("app_closed" if self is self._tunnel.app else "upstream_closed")
        peer = self.peer.transport
        if peer.can_write_eof() and not peer.is_closing():
            peer.write_eof()
            if self.peer.eof:
                self.transport.close()
                peer.close()
            return True
        peer.close()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self._tunnel.end("app_closed" if self is self._tunnel.app else "upstream_closed")
        self.peer.transport.close()  # after what it was sent is flushed
        self._tunnel.lost()
        if self._on_lost is not None:
            self._on_lost(exc)


def _pause(transport: asyncio.Transport) -> None:
    try:
        transport.pause_reading()
    except (AttributeError, NotImplementedError, RuntimeError):  # closing, or no flow control
        pass


def _resume(transport: asyncio.Transport) -> None:
    try:
        transport.resume_reading()
    except (AttributeError, NotImplementedError, RuntimeError):
        pass


class Tunnel:
    """The app's connection and the upstream's, spliced. ``start`` takes both transports over;
    ``run`` returns how the session ended once both are closed: ``app_closed``,
    ``upstream_closed``, ``idle_timeout`` or ``total_timeout``."""

    def __init__(
        self,
        app: asyncio.Transport,
        upstream: asyncio.Transport,
        *,
        on_app_lost: Lost | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.app = _End(self, app, on_app_lost)
        self.upstream = _End(self, upstream, None)
        self.app.peer, self.upstream.peer = self.upstream, self.app
        self.active_at = self.loop.time()
        self.ended = ""
        self._closed: asyncio.Future[None] = self.loop.create_future()
        self._reported = (0, 0)

    @property
    def up_bytes(self) -> int:
        """App → upstream."""
        return self.app.received

    @property
    def down_bytes(self) -> int:
        """Upstream → app."""
        return self.upstream.received

    def start(self, to_app: bytes) -> None:
        """Take both transports over, send ``to_app`` (the 101 and the upstream's first bytes)
        to the app, and let bytes flow. Synchronous: no byte can arrive in between."""
        self.app.transport.set_protocol(self.app)
        self.upstream.transport.set_protocol(self.upstream)
        self.app.transport.write(to_app)
        _resume(self.app.transport)
        _resume(self.upstream.transport)

    def end(self, reason: str) -> None:
        """The first reason given is how the session ended."""
        if not self.ended:
            self.ended = reason

    def lost(self) -> None:
        if self.app.lost and self.upstream.lost and not self._closed.done():
            self._closed.set_result(None)

    def cut(self, reason: str) -> None:
        """Both connections reset now: a limit, or the request was cancelled (shutdown)."""
        self.end(reason)
        self.app.transport.abort()
        self.upstream.transport.abort()

    async def run(self, idle_s: float, total_s: float | None, report: Report) -> str:
        """Until both sides are closed, cutting them at the limits; ``report`` gets the byte
        counts as they grow (every few seconds, and at the end)."""
        deadline = self.loop.time() + total_s if total_s is not None else math.inf
        try:
            while not self._closed.done():
                now = self.loop.time()
                if now >= deadline:
                    self.cut("total_timeout")
                elif now >= self.active_at + idle_s:
                    self.cut("idle_timeout")
                else:
                    wake = min(deadline, self.active_at + idle_s, now + _REPORT_S)
                    await asyncio.wait([self._closed], timeout=wake - now)
                    self._report(report)
                    continue
                await asyncio.wait([self._closed], timeout=1.0)  # aborted: lost soon
        except asyncio.CancelledError:
            self.cut("cancelled")
            raise
        finally:
            self._report(report)
        return self.ended or "closed"

    def _report(self, report: Report) -> None:
        up, down = self.up_bytes, self.down_bytes
        last_up, last_down = self._reported
        if up != last_up or down != last_down:
            self._reported = (up, down)
            report(up - last_up, down - last_down)
