"""A credential in a custom header (``inject: header``) or query parameter (``inject: query``):
how static API keys travel. The app's own value of that header or parameter is never forwarded."""

from __future__ import annotations

from urllib.parse import quote

from ...config.credential import HeaderCredential, QueryCredential
from ...config.model import RouteConfig
from ..issuers.base import Issuer, PerRequestIssuer
from ..token import Token
from .base import Injector, Outbound, Signing, injector
from .jwt import JWTInjector


class HeaderInjector(Injector):
    usable_if_echoed = True

    def __init__(self, header: str, prefix: str = "") -> None:
        self._header = header
        self._prefix = prefix
        self.strip = frozenset({header.lower()})

    async def apply(self, outbound: Outbound, token: Token) -> None:
        outbound.secret = token.value.reveal()
        outbound.headers[self._header] = self._prefix + outbound.secret


class QueryInjector(Injector):
    usable_if_echoed = True

    def __init__(self, param: str) -> None:
        self._param = param
        self._prefix = param + "="

    async def apply(self, outbound: Outbound, token: Token) -> None:
        outbound.secret = token.value.reveal()
        path, _, query = outbound.path_qs.partition("?")
        kept = [p for p in query.split("&") if p and not p.startswith(self._prefix)]
        kept.append(self._prefix + quote(outbound.secret, safe=""))
        outbound.path_qs = path + "?" + "&".join(kept)


@injector(HeaderCredential)
def _header(
    credential: HeaderCredential, route: RouteConfig, issuer: Issuer, signing: Signing
) -> Injector:
    if isinstance(issuer, PerRequestIssuer):
        return JWTInjector.for_route(
            route, issuer, signing, credential.header, credential.header_prefix
        )
    return HeaderInjector(credential.header, credential.header_prefix)


@injector(QueryCredential)
def _query(
    credential: QueryCredential, route: RouteConfig, issuer: Issuer, signing: Signing
) -> Injector:
    return QueryInjector(credential.query_param)
