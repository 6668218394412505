"""``Authorization: DPoP`` plus a fresh proof for this request (RFC 9449 §7).

The proof covers the method, the target URI without query, the token (``ath``) and the resource
server's latest nonce, so neither the token nor the proof can be replayed elsewhere.
"""

from __future__ import annotations

from multidict import CIMultiDict

from ..dpop import DPoPKey
from ..token_cache import Token


class DPoPInjector:
    binds_token = True

    def __init__(self, dpop_key: DPoPKey) -> None:
        self._key = dpop_key

    def apply(
        self, headers: CIMultiDict[str], token: Token, method: str, htu: str, nonce: str | None
    ) -> None:
        headers["Authorization"] = "DPoP " + token.value.reveal()
        headers["DPoP"] = self._key.proof(method, htu, ath=token.ath, nonce=nonce)
