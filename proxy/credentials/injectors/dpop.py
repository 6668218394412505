"""``Authorization: DPoP`` plus a fresh proof for this request (RFC 9449 §7).

The proof covers the method, the target URI without query, the token (``ath``) and the resource
server's latest nonce, so neither the token nor the proof can be replayed elsewhere.
"""

from __future__ import annotations

from ...config.credential import DPoPCredential
from ...config.model import RouteConfig
from ..dpop import DPoPKey
from ..issuers.base import Issuer
from ..signing import SignatureBatch
from ..token import Token
from .base import Injector, Outbound, Signing, injector


class DPoPInjector(Injector):
    binds_token = True

    def __init__(self, dpop_key: DPoPKey, batch: SignatureBatch) -> None:
        self._key = dpop_key
        self._batch = batch

    async def apply(self, outbound: Outbound, token: Token) -> None:
        outbound.secret = token.value.reveal()
        outbound.headers["Authorization"] = "DPoP " + outbound.secret
        outbound.headers["DPoP"] = await self._key.request_proof(
            self._batch, outbound.method, outbound.htu, ath=token.ath, nonce=outbound.nonce
        )


@injector(DPoPCredential)
def _dpop(
    credential: DPoPCredential, route: RouteConfig, issuer: Issuer, signing: Signing
) -> Injector:
    return DPoPInjector(signing.dpop_key, signing.batch)
