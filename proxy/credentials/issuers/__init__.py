"""Issuers obtain short-lived credentials with the workload's identity; one module per type.

``ISSUERS`` maps the config's ``type`` to the implementation (STYLE habit 5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..token_cache import CacheKey, Token
from .aws import AWSIssuer
from .oauth2 import OAuth2Issuer
from .self_signed_jwt import SelfSignedJWTIssuer
from .static import StaticIssuer
from .token_exchange import TokenExchangeIssuer


class Issuer(Protocol):
    name: str
    config: Any
    region: str | None  # where the issuer's credentials are scoped (AWS), else None
    revoke_on_shutdown: bool

    async def fetch(self, key: CacheKey) -> Token: ...

    async def revoke(self, token: Token) -> str: ...


ISSUERS: dict[str, Callable[..., Issuer]] = {
    "oauth2": OAuth2Issuer,
    "token_exchange": TokenExchangeIssuer,
    "aws": AWSIssuer,
    "static": StaticIssuer,
    "self_signed_jwt": SelfSignedJWTIssuer,
}

__all__ = [
    "ISSUERS",
    "AWSIssuer",
    "Issuer",
    "OAuth2Issuer",
    "SelfSignedJWTIssuer",
    "StaticIssuer",
    "TokenExchangeIssuer",
]
