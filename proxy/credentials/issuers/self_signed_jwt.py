"""JWTs minted by the sidecar for each request: ``iss``/``sub`` from config, ``aud`` the upstream
(or configured), ``iat``, ``exp`` ≤ 60 s later, a unique ``jti``, and optionally ``htm``/``htu``.
Upstreams verify them with the JWKS on the admin listener. A ``key_file`` is re-read when it
changes; the previous public key stays in the JWKS so tokens already in flight still verify.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_str
from typing import TYPE_CHECKING, Any

import aiohttp

from ...config.issuers import SelfSignedJWTIssuerConfig
from ...config.model import IdentityConfig
from ..dpop import DPoPKey
from ..identity import generate_key, load_signing_key
from ..jose import Signer, SigningKey, b64url, public_jwk, thumbprint
from ..signing import SignatureBatch
from ..token import CacheKey, Token
from .base import issuer

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ...spiffe.workload_api import WorkloadAPI

_STAT_INTERVAL_S = 1.0
_HTTP_SIGNATURE_ALGS = {
    "ES256": "ecdsa-p256-sha256",
    "EdDSA": "ed25519",
    "RS256": "rsa-v1_5-sha256",
}


@issuer(SelfSignedJWTIssuerConfig)
class SelfSignedJWTIssuer:
    shared_by_workers = False  # minted by each worker
    region: str | None = None
    revoke_on_shutdown = False
    per_request = True  # no token cache: every request gets its own JWT

    def __init__(
        self,
        name: str,
        config: SelfSignedJWTIssuerConfig,
        *,
        session: aiohttp.ClientSession,
        dpop_key: DPoPKey,
        identity: IdentityConfig,
        workload_api: WorkloadAPI | None = None,
    ) -> None:
        del session, dpop_key, identity  # the signing key is this issuer's identity
        self.name = name
        self.config = config
        self._keys: list[dict[str, str]] = []  # published public keys, newest last
        self._key_mtime_ns = 0
        self._checked_at = 0.0
        self._signer: Signer
        fixed = json.dumps({"iss": config.iss, "sub": config.sub}, separators=(",", ":"))
        self._iss_sub = fixed[:-1]  # the start of every claims object, left open
        self._lifetime_s = int(config.lifetime_s)
        if config.key_file is None:
            self._use(generate_key(config.alg))
        else:
            self._load()

    @property
    def kid(self) -> str:
        return self._keys[-1]["kid"]

    def jwks(self) -> dict[str, Any]:
        return {"keys": list(self._keys)}

    async def mint(self, batch: SignatureBatch, audience: str, htm: str, htu: str) -> str:
        """The claims are a filled template (iss and sub encoded once): there is one per request."""
        self._reload_if_changed()
        now = int(time.time())
        claims = f'{self._iss_sub},"aud":{_json_str(audience)},"iat":{now}'
        claims += f',"exp":{now + self._lifetime_s},"jti":"{b64url(os.urandom(16))}"'
        if self.config.request_claims:
            claims += f',"htm":{_json_str(htm)},"htu":{_json_str(htu)}'
        return await self._signer.sign_json_in(batch, claims + "}")

    def signing_key(self, token: Token) -> tuple[str, str, Callable[[bytes], bytes]]:
        """(kid, RFC 9421 algorithm, sign) of the current key, whose public half is in the JWKS:
        for HTTP Message Signatures."""
        del token  # nothing cached: the key is this issuer's
        self._reload_if_changed()
        return self.kid, _HTTP_SIGNATURE_ALGS[self._signer.alg], self._signer.sign_bytes

    def _reload_if_changed(self) -> None:
        if (
            self.config.key_file is not None
            and time.monotonic() - self._checked_at > _STAT_INTERVAL_S
        ):
            self._checked_at = time.monotonic()
            if os.stat(self.config.key_file).st_mtime_ns != self._key_mtime_ns:
                self._load()

    async def fetch(self, key: CacheKey) -> Token:
        raise NotImplementedError("self-signed JWTs are minted per request, never cached")

    async def revoke(self, token: Token) -> str:
        del token
        return "unsupported"  # they expire within a minute

    def _load(self) -> None:
        assert self.config.key_file is not None
        self._key_mtime_ns = os.stat(self.config.key_file).st_mtime_ns
        self._use(load_signing_key(self.config.key_file, what=f"issuers.{self.name}.key_file"))

    def _use(self, key: SigningKey) -> None:
        jwk = public_jwk(key)
        kid = thumbprint(jwk)
        self._signer = Signer(key, {"typ": "JWT", "kid": kid})
        self._keys = [*self._keys[-1:], {**jwk, "kid": kid, "alg": self._signer.alg, "use": "sig"}]
