"""A JWT minted for this very request by a ``self_signed_jwt`` issuer, sent as a bearer token
(or in a custom header): a unique ``jti`` each time, ``aud`` the upstream, seconds of life."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from yarl import URL

from ...config.model import RouteConfig
from ..issuers.base import PerRequestIssuer
from ..signing import SignatureBatch
from ..token import Token
from .base import Injector, Outbound, Signing


class JWTInjector(Injector):
    usable_if_echoed = True

    def __init__(
        self,
        mint: Callable[[SignatureBatch, str, str, str], Awaitable[str]],
        batch: SignatureBatch,
        audience: str,
        header: str,
        prefix: str,
    ) -> None:
        self._mint = mint
        self._batch = batch
        self._audience = audience
        self._header = header
        self._prefix = prefix
        self.strip = frozenset({header.lower()})

    @classmethod
    def for_route(
        cls,
        route: RouteConfig,
        issuer: PerRequestIssuer,
        signing: Signing,
        header: str,
        prefix: str,
    ) -> JWTInjector:
        """JWTs for the route's audience, else its upstream origin, in ``header``."""
        upstream = URL(route.upstream)
        audience = route.credential.audience or f"{upstream.scheme}://{upstream.authority}"
        return cls(issuer.mint, signing.batch, audience, header, prefix)

    async def apply(self, outbound: Outbound, token: Token) -> None:
        del token  # nothing cached: the JWT is made now
        outbound.secret = await self._mint(
            self._batch, self._audience, outbound.method, outbound.htu
        )
        outbound.headers[self._header] = self._prefix + outbound.secret
