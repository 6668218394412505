"""Issuers obtain short-lived credentials with the workload's identity; one module per type.

``ISSUERS`` maps the config's ``type`` to the implementation (STYLE habit 5).
"""

from __future__ import annotations

from typing import Protocol

from ..token_cache import CacheKey, Token
from .aws import AWSIssuer
from .oauth2 import OAuth2Issuer


class Issuer(Protocol):
    name: str
    region: str | None  # where the issuer's credentials are scoped (AWS), else None
    revoke_on_shutdown: bool

    async def fetch(self, key: CacheKey) -> Token: ...

    async def revoke(self, token: Token) -> str: ...


ISSUERS: dict[str, type[OAuth2Issuer] | type[AWSIssuer]] = {
    "oauth2": OAuth2Issuer,
    "aws": AWSIssuer,
}

__all__ = ["ISSUERS", "AWSIssuer", "Issuer", "OAuth2Issuer"]
