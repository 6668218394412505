"""DPoP proofs (RFC 9449 §4.2): structure, claims, uniqueness, and verification by pyjwt."""

import base64
import hashlib
import time

import jwt
import pytest

from proxy.credentials.dpop import DPoPKey, access_token_hash
from proxy.credentials.jose import thumbprint
from proxy.demo.verify import JtiCache, Rejected, verify_proof


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_proof_is_a_valid_dpop_jwt_for_this_request(alg):
    """A proof carries typ dpop+jwt, the public JWK only, and htm/htu/iat/jti/ath/nonce as given."""
    key = DPoPKey(alg)
    proof = key.proof("POST", "https://api.example/v1/x", ath="abc", nonce="n-1")
    header = jwt.get_unverified_header(proof)
    assert header["typ"] == "dpop+jwt" and header["alg"] == alg
    assert "d" not in header["jwk"] and thumbprint(header["jwk"]) == key.jkt
    claims = jwt.decode(proof, jwt.PyJWK(header["jwk"], algorithm=alg).key, algorithms=[alg])
    assert claims["htm"] == "POST" and claims["htu"] == "https://api.example/v1/x"
    assert claims["ath"] == "abc" and claims["nonce"] == "n-1"
    assert abs(claims["iat"] - time.time()) < 5


def test_every_proof_has_a_unique_jti_and_each_key_is_new():
    """1000 proofs never repeat a jti; two sidecar starts never share a key."""
    key = DPoPKey()
    jtis = {
        jwt.decode(key.proof("GET", "https://a/"), options={"verify_signature": False})["jti"]
        for _ in range(1000)
    }
    assert len(jtis) == 1000
    assert DPoPKey().jkt != key.jkt


def test_access_token_hash_is_base64url_sha256():
    """ath is the unpadded base64url SHA-256 of the token (RFC 9449 §4.2)."""
    expected = base64.urlsafe_b64encode(hashlib.sha256(b"tok.en").digest()).rstrip(b"=").decode()
    assert access_token_hash("tok.en") == expected


def test_verifier_rejects_wrong_method_url_token_and_replay():
    """The demo verifier (used as the tests' resource server) refuses each kind of misuse."""
    key = DPoPKey()
    ath = access_token_hash("t")
    jtis = JtiCache(60)
    good = key.proof("GET", "https://a/x", ath=ath)
    verify_proof(good, htm="GET", htu="https://a/x", jtis=jtis, access_token="t")
    cases = {
        "replay": (good, "GET", "https://a/x", "t"),
        "method": (key.proof("POST", "https://a/x", ath=ath), "GET", "https://a/x", "t"),
        "url": (key.proof("GET", "https://a/y", ath=ath), "GET", "https://a/x", "t"),
        "token": (key.proof("GET", "https://a/x", ath=ath), "GET", "https://a/x", "other"),
    }
    for what, (proof, htm, htu, token) in cases.items():
        with pytest.raises(Rejected):
            verify_proof(proof, htm=htm, htu=htu, jtis=jtis, access_token=token)
            pytest.fail(what)
