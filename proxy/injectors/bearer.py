"""``Authorization: Bearer`` (RFC 6750): the plain, unbound token."""

from __future__ import annotations

from ..token_cache import Token
from .base import Injector, Outbound


class BearerInjector(Injector):
    def apply(self, outbound: Outbound, token: Token) -> None:
        outbound.headers["Authorization"] = "Bearer " + token.value.reveal()
