"""``Authorization: Bearer`` (RFC 6750): the plain, unbound token."""

from __future__ import annotations

from multidict import CIMultiDict

from ..dpop import DPoPKey
from ..token_cache import Token


class BearerInjector:
    binds_token = False

    def __init__(self, dpop_key: DPoPKey) -> None:
        del dpop_key  # a bearer token is not bound to a key

    def apply(
        self, headers: CIMultiDict[str], token: Token, method: str, htu: str, nonce: str | None
    ) -> None:
        headers["Authorization"] = "Bearer " + token.value.reveal()
