"""A JWT minted for this very request by a ``self_signed_jwt`` issuer, sent as a bearer token
(or in a custom header): a unique ``jti`` each time, ``aud`` the upstream, seconds of life."""

from __future__ import annotations

from collections.abc import Callable

from ..token_cache import Token
from .base import Injector, Outbound


class JWTInjector(Injector):
    def __init__(
        self, mint: Callable[[str, str, str], str], audience: str, header: str, prefix: str
    ) -> None:
        self._mint = mint
        self._audience = audience
        self._header = header
        self._prefix = prefix
        self.strip = frozenset({header.lower()})

    def apply(self, outbound: Outbound, token: Token) -> None:
        del token  # nothing cached: the JWT is made now
        outbound.secret = self._mint(self._audience, outbound.method, outbound.htu)
        outbound.headers[self._header] = self._prefix + outbound.secret
