"""Tokens shared by workers (``--workers N``): worker 0 is the leader and the only one that asks
the IdP; the others ask it over a Unix socket in a directory only the sidecar's user can enter.
So the IdP sees one token request per credential and refresh window, however many workers.

Token values cross that socket between processes of the same sidecar, never further; they are
not logged. Static secrets are read by each worker from their file; nothing else is shared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from ..errors import CredentialUnavailable, IssuerError
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


class LeaderClient:
    """A follower's way to its tokens: from the leader, never from the IdP."""

    def __init__(self, socket_path: str) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path))

    async def fetch(self, key: CacheKey) -> Token:
        where = f"issuers.{key.issuer}: the leader worker"
        try:
            async with self._session.get(
                "http://leader/token", params=_query(key), timeout=aiohttp.ClientTimeout(total=30)
            ) as response:
                answer = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise IssuerError(f"{where} did not answer: {exc.__class__.__name__}") from None
        if response.status != 200:
            raise IssuerError(f"{where} has no token: {answer.get('error', response.status)}")
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

    async def aclose(self) -> None:
        await self._session.close()
