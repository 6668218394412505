"""Tokens shared by workers (``--workers N``): worker 0 is the leader and the only one that asks
the IdP; the others ask it over a Unix socket in a directory only the sidecar's user can enter.
So the IdP sees one token request per credential and refresh window, however many workers.

Token values cross that socket between processes of the same sidecar, never further; they are
not logged. Static secrets are read by each worker from their file; nothing else is shared.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from ..errors import CredentialUnavailable, IssuerError
from ..log import credentials_log
from ..secret import Secret
from .token import CacheKey, Token
from .token_cache import TokenSource


def _query(key: CacheKey) -> dict[str, str]:
    query = {"issuer": key.issuer, "bound": "1" if key.bound else "0", "kind": key.kind}
    if key.audience is not None:
        query["audience"] = key.audience
    if key.scope is not None:
        query["scope"] = key.scope
    return query


def leader_app(sources: Callable[[], dict[CacheKey, Any]]) -> web.Application:
    """The leader's side: ``GET /token?issuer=&audience=&scope=&bound=`` → its current token."""

    async def token(request: web.Request) -> web.Response:
        q = request.query
        key = CacheKey(
            q.get("issuer", ""),
            q.get("audience"),
            q.get("scope"),
            q.get("bound") == "1",
            "client_cert" if q.get("kind") == "client_cert" else "token",  # sessions: unshared
        )
        source = sources().get(key)
        if not isinstance(source, TokenSource):
            return web.json_response({"error": "no such credential"}, status=404)
        try:
            current = await source.latest()
        except CredentialUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)
        return web.json_response({
            "value": current.value.reveal(), "token_type": current.token_type,
            "expires_at": current.expires_at, "key_id": current.key_id,
            "signing_secret": current.signing_secret.reveal() if current.signing_secret else None,
            "legacy": current.legacy, "secret_version": current.secret_version,
            "certificate": current.certificate, "serial": current.serial,
        })  # fmt: skip

    app = web.Application()
    app.router.add_get("/token", token)
    return app


_CONNECT_RETRY_S = 0.05


class LeaderClient:
    """A follower's way to its tokens: from the leader, never from the IdP.

    The leader is a sibling process: at start it may bind its socket a moment after a follower
    first asks, and after a crash the supervisor starts it again. A follower that cannot
    connect keeps trying for ``connect_wait_s`` before it calls the leader unavailable, so a
    start-up race never becomes a backoff during which requests get 503."""

    def __init__(self, socket_path: str, *, connect_wait_s: float = 10.0) -> None:
        self._socket_path = socket_path
        self._connect_wait_s = connect_wait_s
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path))

    async def fetch(self, key: CacheKey) -> Token:
        where = f"issuers.{key.issuer}: the leader worker"
        try:
            answer, status = await self._ask(key)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise IssuerError(f"{where} did not answer: {exc.__class__.__name__}") from None
        if status != 200:
            raise IssuerError(f"{where} has no token: {answer.get('error', status)}")
        return _token(answer)

    async def _ask(self, key: CacheKey) -> tuple[dict[str, Any], int]:
        give_up = time.monotonic() + self._connect_wait_s
        waiting = False
        while True:
            try:
                async with self._session.get(
                    "http://leader/token",
                    params=_query(key),
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as response:
                    return await response.json(), response.status
            except aiohttp.ClientConnectorError:
                if time.monotonic() >= give_up:
                    raise
                if not waiting:
                    waiting = True
                    credentials_log.info(
                        "the leader worker is not listening at %s yet; waiting up to %gs",
                        self._socket_path,
                        self._connect_wait_s,
                    )
                await asyncio.sleep(_CONNECT_RETRY_S)

    async def aclose(self) -> None:
        await self._session.close()


def _token(answer: dict[str, Any]) -> Token:
    secret = answer.get("signing_secret")
    return Token(
        value=Secret(answer["value"]),
        token_type=answer["token_type"],
        lifetime_s=max(0.0, float(answer["expires_at"]) - time.time()),
        key_id=answer.get("key_id"),
        signing_secret=Secret(secret) if secret else None,
        legacy=bool(answer.get("legacy")),
        secret_version=answer.get("secret_version"),
        certificate=answer.get("certificate"),
        serial=answer.get("serial"),
    )
