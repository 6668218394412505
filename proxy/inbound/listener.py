"""The app listener: what every app connection shares, and the way connections are made.

``AppListener`` is the protocol factory the server listens with: the handler, the admission
check and ``app_limits``, the open connections (in total and per uid), those lingering after a
last answer, and the sweep that closes idle and overdue ones. Each connection is an
``inbound.connection.AppConnection`` (HTTP/1.1, or HTTP/2 through ``inbound.h2_session``); its
requests reach the handler as ``inbound.request.AppRequest``s.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from ..access.callers import Caller
from ..errors import ProblemError
from ..tasks import spawn
from .connection import AppConnection
from .request import Handler

# At accept: (caller, the limits' refusal or None) → the refusal to answer, or None to serve.
Admit = Callable[[Caller, ProblemError | None], ProblemError | None]


class Limits:
    """``app_limits`` as enforced: ``max_connections`` already lowered under RLIMIT_NOFILE."""

    __slots__ = (
        "max_head_bytes", "max_connections", "max_connections_per_uid", "max_concurrent_streams",
    )  # fmt: skip

    def __init__(
        self,
        max_head_bytes: int,
        max_connections: int,
        max_connections_per_uid: int,
        max_concurrent_streams: int = 128,
    ) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_connections = max_connections
        self.max_connections_per_uid = min(max_connections_per_uid, max_connections)
        self.max_concurrent_streams = max_concurrent_streams  # per HTTP/2 connection


class AppListener:
    """What every app connection shares; a protocol factory for ``create_server``."""

    def __init__(self, handler: Handler, admit: Admit, keepalive_s: float, limits: Limits) -> None:
        self.handler = handler
        self.admit = admit
        self.keepalive_s = keepalive_s
        self.limits = limits
        self.connections: set[AppConnection] = set()
        self.per_uid: Counter[int | None] = Counter()
        self.lingering: dict[AppConnection, float] = {}  # answered, closing, until: ``_linger``
        self._sweep: asyncio.Task[None] | None = None

    def __call__(self) -> AppConnection:
        if self._sweep is None:
            self._sweep = spawn(self._close_idle_every(0.25), name="app-idle-sweep")
        return AppConnection(asyncio.get_running_loop(), self)

    async def _close_idle_every(self, interval_s: float) -> None:
        """Connections without a request in progress for ``keepalive_s`` are closed (a head
        that never completes included): a sweep, not a timer per request."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            now = loop.time()
            expired = now - self.keepalive_s
            for connection in list(self.connections):
                if connection.idle_since is not None and connection.idle_since <= expired:
                    connection.abort()
            for connection, until in list(self.lingering.items()):
                if until <= now:
                    connection.abort()

    async def drain(self, timeout_s: float) -> None:
        """Idle connections close now; busy ones after their answer, or at ``timeout_s``."""
        for connection in list(self.connections):
            connection.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in [*self.connections, *self.lingering]:
            connection.abort()
        if self._sweep is not None:
            self._sweep.cancel()
