"""Compact JWS signing with pre-encoded headers, JWKs and RFC 7638 thumbprints.

Hand-rolled instead of ``jwt.encode`` because the hot path signs a DPoP proof per request: the
header segment is encoded once per key, only the claims change.
"""

from __future__ import annotations

import binascii
import hashlib
import json
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .signing import SignatureBatch

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_EC_ALGS = {"secp256r1": ("ES256", "P-256", hashes.SHA256(), 32)}


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2), in one call frame: it runs several times per proof."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _json_b64(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def _int_b64(value: int, length: int) -> str:
    return b64url(value.to_bytes(length, "big"))


def algorithm(key: SigningKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _EC_ALGS:
            raise ValueError(f"EC curve {key.curve.name} is not supported; use P-256")
        return _EC_ALGS[key.curve.name][0]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if key.key_size < 2048:
        raise ValueError(f"RSA key of {key.key_size} bits is too small; use 2048 or more")
    return "RS256"


def public_jwk(key: SigningKey) -> dict[str, str]:
    """The public half as a JWK holding only the required members (RFC 7638 order irrelevant)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        _, crv, _, size = _EC_ALGS[key.curve.name]
        numbers = key.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": _int_b64(numbers.x, size),
            "y": _int_b64(numbers.y, size),
        }
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    rsa_numbers = key.public_key().public_numbers()
    n_len = (rsa_numbers.n.bit_length() + 7) // 8
    return {"kty": "RSA", "n": _int_b64(rsa_numbers.n, n_len), "e": _int_b64(rsa_numbers.e, 3)}


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) over the required members only."""
    required = {
        "EC": ("crv", "kty", "x", "y"),
        "OKP": ("crv", "kty", "x"),
        "RSA": ("e", "kty", "n"),
    }
    members = {name: jwk[name] for name in required[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64url(hashlib.sha256(canonical).digest())


class Signer:
    """Signs compact JWS for one key and one fixed header; the header segment is encoded once,
    and the signing function is chosen once for the key's type, not per signature."""

    __slots__ = ("_header_b64", "alg", "sign_bytes")

    def __init__(self, key: SigningKey, header: dict[str, Any]) -> None:
        self.alg = algorithm(key)
        self._header_b64 = _json_b64({**header, "alg": self.alg})
        # The raw JWS signature (ECDSA as r‖s), which RFC 9421 uses as well.
        self.sign_bytes: Callable[[bytes], bytes] = _raw_signer(key)

    def sign(self, claims: dict[str, Any]) -> str:
        return self.sign_json(json.dumps(claims, separators=(",", ":")))

    def sign_json(self, claims: str) -> str:
        """Sign claims already serialised as JSON (a template filled per request)."""
        signing_input = f"{self._header_b64}.{b64url(claims.encode())}"
        return f"{signing_input}.{b64url(self.sign_bytes(signing_input.encode('ascii')))}"

    async def sign_json_in(self, batch: SignatureBatch, claims: str) -> str:
        """``sign_json`` for a proxied request: the signature is made in ``batch``."""
        signing_input = f"{self._header_b64}.{b64url(claims.encode())}"
        signature = await batch.sign(self.sign_bytes, signing_input.encode("ascii"))
        return f"{signing_input}.{b64url(signature)}"


def _raw_signer(key: SigningKey) -> Callable[[bytes], bytes]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        ec_key = key

        def ecdsa(data: bytes) -> bytes:
            r, s = decode_dss_signature(ec_key.sign(data, _ECDSA_SHA256))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

        return ecdsa
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    rsa_key = key
    pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()
    return lambda data: rsa_key.sign(data, pkcs1, sha256)
