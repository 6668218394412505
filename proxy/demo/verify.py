"""What a resource server (or IdP) checks in a DPoP proof (RFC 9449 §4.3), independently of
the code that signs proofs: pyjwt verifies, the rules are spelled out here."""

from __future__ import annotations

import time
from typing import Any

import jwt

from ..credentials.dpop import access_token_hash
from ..credentials.jose import thumbprint

PROOF_ALGORITHMS = ("ES256", "EdDSA")


class Rejected(Exception):
    """Verification failed; ``error`` is the RFC 6750/9449 error code for WWW-Authenticate."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


class JtiCache:
    """Remembers proof/assertion ids until they could no longer pass the ``iat`` window."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._seen: dict[str, float] = {}

    def first_use(self, jti: str) -> bool:
        now = time.monotonic()
        if len(self._seen) > 10_000:
            self._seen = {k: t for k, t in self._seen.items() if t > now}
        if jti in self._seen and self._seen[jti] > now:
            return False
        self._seen[jti] = now + 2 * self._window_s
        return True


def verify_proof(
    proof: str,
    *,
    htm: str,
    htu: str,
    jtis: JtiCache,
    access_token: str | None = None,
    nonce: str | None = None,
    iat_window_s: float = 60.0,
) -> tuple[dict[str, Any], str]:
    """Return the proof's claims and its key's thumbprint (``jkt``), or raise ``Rejected``."""
    try:
        header = jwt.get_unverified_header(proof)
    except jwt.PyJWTError as exc:
        raise Rejected("invalid_dpop_proof", f"not a JWS: {exc}") from None
    if header.get("typ") != "dpop+jwt":
        raise Rejected("invalid_dpop_proof", "typ is not dpop+jwt")
    alg, jwk = header.get("alg"), header.get("jwk")
    if alg not in PROOF_ALGORITHMS or not isinstance(jwk, dict):
        raise Rejected("invalid_dpop_proof", "unsupported alg or missing jwk")
    if "d" in jwk:
        raise Rejected("invalid_dpop_proof", "jwk contains a private key")
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
        claims: dict[str, Any] = jwt.decode(
            proof, key, algorithms=[alg], options={"require": ["jti", "htm", "htu", "iat"]}
        )
    except jwt.PyJWTError as exc:
        raise Rejected("invalid_dpop_proof", f"signature or claims invalid: {exc}") from None
    if claims["htm"] != htm:
        raise Rejected("invalid_dpop_proof", f"htm {claims['htm']!r} is not {htm!r}")
    if claims["htu"] != htu:
        raise Rejected("invalid_dpop_proof", f"htu {claims['htu']!r} is not {htu!r}")
    if abs(time.time() - float(claims["iat"])) > iat_window_s:
        raise Rejected("invalid_dpop_proof", "iat outside the accepted window")
    if access_token is not None and claims.get("ath") != access_token_hash(access_token):
        raise Rejected("invalid_dpop_proof", "ath does not match the access token")
    if nonce is not None and claims.get("nonce") != nonce:
        raise Rejected("use_dpop_nonce", "a fresh server nonce is required")
    if not jtis.first_use(str(claims["jti"])):
        raise Rejected("invalid_dpop_proof", "proof jti already used (replay)")
    return claims, thumbprint(jwk)
