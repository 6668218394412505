"""Injectors put a credential into one outbound request; one module per kind.

``INJECTORS`` maps the route's ``credential.inject`` to a factory (STYLE habit 5); credentials
minted per request (self-signed JWTs) get the JWT injector whatever header carries them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yarl import URL

from ...config.model import RouteConfig
from ..dpop import DPoPKey
from ..signing import SignatureBatch
from .base import Injector, Outbound
from .bearer import BearerInjector
from .dpop import DPoPInjector
from .header import HeaderInjector, QueryInjector
from .http_signature import HTTPSignatureInjector, hmac_key
from .jwt import JWTInjector
from .sigv4 import SigV4Injector


@dataclass(frozen=True, slots=True)
class Signing:
    """What the sidecar signs with, shared by every route: its DPoP key and the batch in which
    per-request signatures are made (``signing``)."""

    dpop_key: DPoPKey
    batch: SignatureBatch


INJECTORS: dict[str, Callable[[RouteConfig, Any, Signing], Injector]] = {
    "bearer": lambda route, issuer, signing: BearerInjector(),
    "dpop": lambda route, issuer, signing: DPoPInjector(signing.dpop_key, signing.batch),
    "sigv4": lambda route, issuer, signing: SigV4Injector.for_route(route, issuer.region),
    "header": lambda route, issuer, signing: HeaderInjector(
        route.credential.header or "", route.credential.header_prefix
    ),
    "query": lambda route, issuer, signing: QueryInjector(route.credential.query_param or ""),
    "http_signature": lambda route, issuer, signing: HTTPSignatureInjector(
        issuer.signing_key
        if getattr(issuer, "per_request", False)
        else hmac_key(route.credential.signature.key_id or ""),
        route.credential.signature,
        signing.batch,
        body_max_bytes=route.credential.payload_max_bytes,
    ),
}


def make_injector(route: RouteConfig, issuer: Any, signing: Signing) -> Injector:
    credential = route.credential
    if getattr(issuer, "per_request", False) and credential.inject != "http_signature":
        upstream = URL(route.upstream)
        audience = credential.audience or f"{upstream.scheme}://{upstream.authority}"
        header, prefix = "Authorization", "Bearer "
        if credential.inject == "header":
            header, prefix = credential.header or "", credential.header_prefix
        return JWTInjector(issuer.mint, signing.batch, audience, header, prefix)
    return INJECTORS[credential.inject](route, issuer, signing)


__all__ = ["INJECTORS", "Injector", "Outbound", "Signing", "make_injector"]
