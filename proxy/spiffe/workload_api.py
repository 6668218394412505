"""The SPIFFE Workload API client: the local agent's Unix socket (``identity.spiffe.socket``,
default ``SPIFFE_ENDPOINT_SOCKET``), spoken over grpcio's asyncio API.

Two watch streams run for the life of the process: X.509-SVIDs (the current one is kept in
memory; a new one is a rotation, audited) and JWT bundles. JWT-SVIDs are fetched per audience on
demand; the token cache around them (``credentials/issuers/spiffe.py``) gives them the cache's
rules. A broken stream (agent restarted, socket gone) is opened again with jittered backoff; the
last SVID keeps serving while it is valid. Every call carries ``workload.spiffe.io: true``.

Why grpcio's asyncio API rather than py-spiffe: py-spiffe is synchronous (its watchers are
threads calling back into the caller), so every call would cross a thread boundary and every
rotation a lock; grpc.aio streams are awaited on the event loop like the rest of credproxy,
cancel cleanly at shutdown, and need only the public ``workload.proto`` (``proto/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from ..audit.trail import Audit
from ..errors import IssuerError
from ..metrics import Metrics
from ..tasks import spawn
from .proto import workload_pb2 as pb
from .svid import JWTSVID, X509SVID, jwks_key_ids

spiffe_log = logging.getLogger("credproxy.spiffe")

SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"
METADATA = (("workload.spiffe.io", "true"),)
_SERVICE = "/SpiffeWorkloadAPI/"
_BACKOFF_BASE_S = 0.2
_EXPLAIN = {
    "PERMISSION_DENIED": "the agent has no registration entry for this process (its selectors, "
    "e.g. unix:uid:{uid}, match none): no identity issued",
    "UNAVAILABLE": "the agent is not reachable on that socket (not running, restarting, or the "
    "socket is not mounted into this container)",
    "DEADLINE_EXCEEDED": "the agent did not answer in time",
    "INVALID_ARGUMENT": "the agent refused the request",
}

R = TypeVar("R")


def grpc_target(socket: str) -> str:
    """``unix:///path`` / ``unix:/path`` / ``tcp://host:port`` (SPIFFE's forms) as gRPC's."""
    if socket.startswith("unix://"):
        return "unix:" + socket.removeprefix("unix://")
    if socket.startswith("unix:"):
        return socket
    if socket.startswith("tcp://"):
        return socket.removeprefix("tcp://")
    raise ValueError(f"{socket!r}: a Workload API address is unix:///path or tcp://ip:port")


def socket_path(socket: str) -> str | None:
    """The filesystem path of a ``unix:`` address, for checks and messages."""
    target = grpc_target(socket)
    return target.removeprefix("unix:") if target.startswith("unix:") else None


def reconnect_delay_s(failures: int, backoff_max_s: float) -> float:
    """How long to wait before opening a watch stream again after ``failures`` in a row: a
    ceiling doubling from 0.2 s up to ``backoff_max_s``, jittered in its upper half so that
    the sidecars of a node do not all call a restarted agent at once."""
    ceiling = min(backoff_max_s, _BACKOFF_BASE_S * 2 ** min(failures - 1, 16))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret


class WorkloadAPI:
    """One connection to the agent, owned by the server (``aclose()`` at exit)."""

    def __init__(
        self,
        socket: str,
        *,
        metrics: Metrics,
        audit: Audit,
        timeout_s: float = 10.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.socket = socket
        self._target = grpc_target(socket)
        self._metrics = metrics
        self._audit = audit
        self._timeout_s = timeout_s
        self._backoff_max_s = backoff_max_s
        self._channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._x509: X509SVID | None = None
        self._x509_arrived = asyncio.Event()
        self._agent_answered = asyncio.Event()  # a call succeeded: broken streams retry now
        self.jwt_bundles: dict[str, bytes] = {}  # trust domain's SPIFFE ID → JWKS (JSON)
        self.jwt_authorities: dict[str, list[str]] = {}  # trust domain → its JWT key IDs
        self.rotations = 0
        self.last_error = ""
        self._closed = False

    @property
    def x509(self) -> X509SVID | None:
        """The current X.509-SVID (None before the first, or once it expired)."""
        svid = self._x509
        return svid if svid is not None and svid.valid() else None

    @property
    def ready(self) -> bool:
        return self.x509 is not None

    def start(self) -> None:
        """Open the channel and the watch streams (idempotent)."""
        if self._closed:
            raise RuntimeError("the Workload API client is closed")
        if self._tasks:
            return
        self._open()
        self._tasks = [
            spawn(
                self._watch(
                    "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse, self._x509_update
                ),
                name="spiffe:x509-svid",
            ),
            spawn(
                self._watch(
                    "FetchJWTBundles",
                    pb.JWTBundlesRequest(),
                    pb.JWTBundlesResponse,
                    self._bundles_update,
                ),
                name="spiffe:jwt-bundles",
            ),
        ]

    async def wait_x509(self, timeout_s: float) -> X509SVID | None:
        """The current X.509-SVID, waiting up to ``timeout_s`` for the first."""
        if self.x509 is None:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._x509_arrived.wait()
            except TimeoutError:
                pass
        return self.x509

    async def fetch_jwt_svid(
        self, audience: str, *, spiffe_id: str | None = None, where: str
    ) -> JWTSVID:
        """A JWT-SVID for ``audience`` (the first the agent lists, or ``spiffe_id``'s);
        ``IssuerError`` naming ``where`` and what to fix when there is none."""
        call = self._open().unary_unary(
            _SERVICE + "FetchJWTSVID",
            request_serializer=pb.JWTSVIDRequest.SerializeToString,
            response_deserializer=pb.JWTSVIDResponse.FromString,
        )
        request = pb.JWTSVIDRequest(audience=[audience], spiffe_id=spiffe_id or "")
        try:
            response: Any = await call(request, metadata=METADATA, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise IssuerError(f"{where}: {self._failed('FetchJWTSVID', exc)}") from None
        self._agent_answered.set()
        svids = [s for s in response.svids if spiffe_id is None or s.spiffe_id == spiffe_id]
        if not svids:
            raise IssuerError(
                f"{where}: the SPIFFE Workload API at {self.socket} returned no JWT-SVID"
                + (f" for {spiffe_id}" if spiffe_id else "")
            )
        return JWTSVID.parse(svids[0].spiffe_id, svids[0].svid, where)

    async def aclose(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self._x509 = None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            backoff_ms = int(self._backoff_max_s * 1000)
            self._channel = grpc.aio.insecure_channel(
                self._target,
                options=[
                    # an agent back after a restart is found within the backoff, not gRPC's 120 s
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.min_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", min(backoff_ms, 5000)),
                    ("grpc.enable_retries", 0),
                ],
            )
        return self._channel

    async def _watch(
        self,
        method: str,
        request: Any,
        response_type: Any,
        update: Callable[[Any], None],
    ) -> None:
        """Follow one server stream for ever: open it, apply each message, and after it ends
        or breaks open it again with jittered exponential backoff."""
        failures = 0
        while True:
            stream = self._open().unary_stream(
                _SERVICE + method,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )
            try:
                call: Any = stream(request, metadata=METADATA)
                async for message in call:
                    update(message)
                    failures = 0
                self._metrics.workload_api_errors.labels(method, "STREAM_ENDED").inc()
                spiffe_log.warning(
                    "SPIFFE Workload API %s: the agent at %s ended the stream; reconnecting",
                    method,
                    self.socket,
                )
            except grpc.aio.AioRpcError as exc:
                self.last_error = self._failed(method, exc)
                log = spiffe_log.warning if failures == 0 else spiffe_log.debug
                log("SPIFFE Workload API %s: %s; retrying with backoff", method, self.last_error)
            except ValueError as exc:  # a message we cannot use: the next one may be fine
                self._metrics.workload_api_errors.labels(method, "UNUSABLE").inc()
                spiffe_log.error("SPIFFE Workload API %s: unusable answer: %s", method, exc)
            failures += 1
            self._agent_answered.clear()
            with contextlib.suppress(TimeoutError):  # cut short once the agent answers a call
                delay_s = reconnect_delay_s(failures, self._backoff_max_s)
                await asyncio.wait_for(self._agent_answered.wait(), delay_s)

    def _failed(self, method: str, exc: grpc.aio.AioRpcError) -> str:
        code = exc.code().name
        self._metrics.workload_api_errors.labels(method, code).inc()
        why = _EXPLAIN.get(code, "").format(uid=os.getuid())
        detail = "".join(c if c.isprintable() else "?" for c in (exc.details() or ""))[:200]
        return f"{method} at {self.socket} failed: {code} ({why or detail or 'no detail'})"

    def _x509_update(self, message: Any) -> None:
        if not message.svids:
            raise ValueError("an X509SVIDResponse without SVIDs")
        first = message.svids[0]  # the default identity (SPIFFE: the first one)
        svid = X509SVID.parse(first.spiffe_id, first.x509_svid, first.x509_svid_key, first.bundle)
        previous, self._x509 = self._x509, svid
        self._x509_arrived.set()
        self._metrics.svid_expiry.set(svid.expires_at)
        if previous is not None and previous.fingerprint == svid.fingerprint:
            return  # the same SVID again (a bundle or a federated update): nothing rotated
        event = "svid.received" if previous is None else "svid.rotated"
        if previous is not None:
            self.rotations += 1
            self._metrics.svid_rotations.inc()
        self._audit.emit(
            event,
            kind="x509",
            **svid.describe(),
            **({"previous_serial": previous.serial} if previous is not None else {}),
            bundle_authorities=len(svid.bundle),
        )
        spiffe_log.info(
            "X.509-SVID %s %s: serial %s, certificate %s, expires in %.0fs",
            svid.spiffe_id,
            "received" if previous is None else "rotated",
            svid.serial,
            svid.fingerprint,
            svid.expires_at - time.time(),
        )

    def _bundles_update(self, message: Any) -> None:
        bundles = dict(message.bundles)
        if bundles != self.jwt_bundles:
            authorities = {domain: jwks_key_ids(jwks) for domain, jwks in sorted(bundles.items())}
            self.jwt_bundles, self.jwt_authorities = bundles, authorities
            spiffe_log.info(
                "JWT bundles: %s",
                "; ".join(f"{d}: {', '.join(ids)}" for d, ids in authorities.items()) or "none",
            )
