"""Injectors put a credential into one outbound request; one module per kind.

``INJECTORS`` maps the route's ``credential.inject`` to a factory (STYLE habit 5); credentials
minted per request (self-signed JWTs) get the JWT injector whatever header carries them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from yarl import URL

from ..config import Route
from ..dpop import DPoPKey
from .base import Injector, Outbound
from .bearer import BearerInjector
from .dpop import DPoPInjector
from .header import HeaderInjector, QueryInjector
from .http_signature import HTTPSignatureInjector, hmac_key
from .jwt import JWTInjector
from .sigv4 import SigV4Injector

INJECTORS: dict[str, Callable[[Route, Any, DPoPKey], Injector]] = {
    "bearer": lambda route, issuer, dpop_key: BearerInjector(),
    "dpop": lambda route, issuer, dpop_key: DPoPInjector(dpop_key),
    "sigv4": lambda route, issuer, dpop_key: SigV4Injector.for_route(route, issuer.region),
    "header": lambda route, issuer, dpop_key: HeaderInjector(
        route.credential.header or "", route.credential.header_prefix
    ),
    "query": lambda route, issuer, dpop_key: QueryInjector(route.credential.query_param or ""),
    "http_signature": lambda route, issuer, dpop_key: HTTPSignatureInjector(
        issuer.signing_key
        if getattr(issuer, "per_request", False)
        else hmac_key(route.credential.signature.key_id or ""),
        route.credential.signature,
        body_max_bytes=route.credential.payload_max_bytes,
    ),
}


def make_injector(route: Route, issuer: Any, dpop_key: DPoPKey) -> Injector:
    credential = route.credential
    if getattr(issuer, "per_request", False) and credential.inject != "http_signature":
        upstream = URL(route.upstream)
        audience = credential.audience or f"{upstream.scheme}://{upstream.authority}"
        if credential.inject == "header":
            return JWTInjector(
                issuer.mint, audience, credential.header or "", credential.header_prefix
            )
        return JWTInjector(issuer.mint, audience, "Authorization", "Bearer ")
    return INJECTORS[credential.inject](route, issuer, dpop_key)


__all__ = ["INJECTORS", "Injector", "Outbound", "make_injector"]
