"""``Authorization: Bearer`` (RFC 6750): the plain, unbound token."""

from __future__ import annotations

from ...config.credential import BearerCredential
from ...config.model import RouteConfig
from ..issuers.base import Issuer, PerRequestIssuer
from ..token import Token
from .base import Injector, Outbound, Signing, injector
from .jwt import JWTInjector


class BearerInjector(Injector):
    usable_if_echoed = True

    async def apply(self, outbound: Outbound, token: Token) -> None:
        outbound.secret = token.value.reveal()
        outbound.headers["Authorization"] = "Bearer " + outbound.secret


@injector(BearerCredential)
def _bearer(
    credential: BearerCredential, route: RouteConfig, issuer: Issuer, signing: Signing
) -> Injector:
    if isinstance(issuer, PerRequestIssuer):
        return JWTInjector.for_route(route, issuer, signing, "Authorization", "Bearer ")
    return BearerInjector()
