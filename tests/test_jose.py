"""JWS signing and JWK thumbprints, checked against RFC 7638's vector and pyjwt's verifier."""

import base64
import os

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.credentials.jose import Signer, b64url, public_jwk, thumbprint


def test_thumbprint_matches_rfc7638_example():
    """The RFC 7638 §3.1 example key hashes to the thumbprint the RFC gives."""
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
    ],
)
def test_signed_jws_verifies_with_pyjwt_from_the_public_jwk(key, alg):
    """What Signer produces is a standard JWS that pyjwt verifies using only the public JWK."""
    token = Signer(key, {"typ": "JWT", "kid": "k1"}).sign({"sub": "x", "n": 1})
    header = jwt.get_unverified_header(token)
    assert header == {"typ": "JWT", "kid": "k1", "alg": alg}
    public = jwt.PyJWK({**public_jwk(key), "alg": alg}).key
    assert jwt.decode(token, public, algorithms=[alg]) == {"sub": "x", "n": 1}
    assert "d" not in public_jwk(key)


def test_small_rsa_and_other_curves_are_refused():
    """Keys too weak or unsupported for our algorithms fail loudly instead of signing."""
    with pytest.raises(ValueError, match="too small"):
        Signer(rsa.generate_private_key(public_exponent=65537, key_size=1024), {})
    with pytest.raises(ValueError, match="not supported"):
        Signer(ec.generate_private_key(ec.SECP384R1()), {})


def test_b64url_is_unpadded_base64url_for_every_length_and_byte():
    """The hand-rolled encoder against the standard library's, for lengths 0..64 and every
    byte value (the '+' and '/' of plain base64 must come out as '-' and '_', no '=')."""
    samples = [os.urandom(n) for n in range(65)] + [bytes(range(256)), b"\xfb\xff\xbf" * 7]
    for data in samples:
        expected = base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
        assert b64url(data) == expected
