"""The sidecar's DPoP key (RFC 9449) and the proofs it signs: one fresh proof per HTTP request.

The key is generated in memory at start and never written anywhere, so a token bound to it
(``cnf.jkt``) is useless to anyone who copies the token out of a request.
"""

from __future__ import annotations

import hashlib
import os
import time
from json.encoder import encode_basestring_ascii as _json_str

from .identity import generate_key
from .jose import Signer, b64url, public_jwk, thumbprint
from .signing import SignatureBatch


def access_token_hash(token: str) -> str:
    """The ``ath`` claim: base64url SHA-256 of the access token's ASCII bytes."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


class DPoPKey:
    """An in-memory key pair; ``proof()`` returns a compact ``dpop+jwt`` for one request."""

    __slots__ = ("_signer", "jwk", "jkt")

    def __init__(self, alg: str = "ES256") -> None:
        key = generate_key(alg)
        self.jwk = public_jwk(key)
        self.jkt = thumbprint(self.jwk)
        self._signer = Signer(key, {"typ": "dpop+jwt", "jwk": self.jwk})

    @property
    def alg(self) -> str:
        return self._signer.alg

    def proof(self, htm: str, htu: str, *, ath: str | None = None, nonce: str | None = None) -> str:
        """``htu`` must already be stripped of query and fragment (see ``routing.dpop_htu``)."""
        return self._signer.sign_json(_claims(htm, htu, ath, nonce))

    async def request_proof(
        self, batch: SignatureBatch, htm: str, htu: str, *, ath: str | None, nonce: str | None
    ) -> str:
        """``proof`` for a proxied request: signed in ``batch`` (see ``signing``)."""
        return await self._signer.sign_json_in(batch, _claims(htm, htu, ath, nonce))


def _claims(htm: str, htu: str, ath: str | None, nonce: str | None) -> str:
    """A filled template, not a serialised dict: there is one per request."""
    jti = b64url(os.urandom(16))  # base64url: nothing to escape
    claims = f'{{"jti":"{jti}","htm":{_json_str(htm)},"htu":{_json_str(htu)}'
    claims += f',"iat":{int(time.time())}'
    if ath is not None:
        claims += f',"ath":{_json_str(ath)}'
    if nonce is not None:
        claims += f',"nonce":{_json_str(nonce)}'
    return claims + "}"
