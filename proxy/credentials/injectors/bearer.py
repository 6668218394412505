"""``Authorization: Bearer`` (RFC 6750): the plain, unbound token."""

from __future__ import annotations

from ..token_cache import Token
from .base import Injector, Outbound


class BearerInjector(Injector):
    usable_if_echoed = True

    async def apply(self, outbound: Outbound, token: Token) -> None:
        outbound.secret = token.value.reveal()
        outbound.headers["Authorization"] = "Bearer " + outbound.secret
