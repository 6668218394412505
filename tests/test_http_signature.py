"""RFC 9421 HTTP Message Signatures (``inject: http_signature``), verified by an independent
implementation (PyPI ``http-message-signatures``) with RFC 9530 Content-Digest checked over the
body it received: Ed25519, ECDSA P-256 and HMAC-SHA256 keys, rotation, tampering and replay."""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from http_message_signatures import InvalidSignature, MappingKeyResolver, algorithms
from http_message_signatures.aiohttp import (
    ServerSignatureMiddleware,
    ServerSignatureMiddlewareMode,
)

from tests.counterparts import LEDGER, PREAMBLE, ThreadedApp, ec_private_pem

REQUIRED = ("@method", "@target-uri", "date")


class SignatureVerifier(ThreadedApp):
    """An API that accepts only requests signed with a key it knows, covering method, target
    URI and date (and the body's Content-Digest when there is a body), each nonce once."""

    def __init__(self, algorithm: Any) -> None:
        super().__init__()
        self.resolver = MappingKeyResolver(public_keys={}, private_keys={})
        self.keys = self.resolver.public_keys  # the trusted keys; tests update them in place
        self.nonces: set[str] = set()
        self.accepted: list[dict[str, str]] = []  # the headers of each accepted request
        # made here: aiohttp's RequestKey cannot name itself when created in the server thread
        self.verifier = ServerSignatureMiddleware(
            ServerSignatureMiddlewareMode.VERIFY_REQUEST,
            verify_options={
                "signature_algorithm": algorithm,
                "key_resolver": self.resolver,
                "max_age": datetime.timedelta(seconds=60),
                "require_components": REQUIRED,
            },
        )
        assert self.verifier.verifier is not None
        self.verifier.verifier.max_clock_skew = datetime.timedelta(0)  # strict on expiry

    def app(self) -> web.Application:
        verifier = self.verifier

        @web.middleware
        async def refuse_invalid(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except InvalidSignature as exc:
                return web.json_response({"error": f"invalid signature: {exc}"}, status=401)

        async def handle(request: web.Request) -> web.Response:
            [result] = verifier.verification_results(request)
            body = await request.read()
            if body and result.body != body:
                return web.json_response({"error": "body not covered by the digest"}, status=401)
            if result.nonce is None or result.nonce in self.nonces:
                return web.json_response({"error": "replayed"}, status=401)
            self.nonces.add(result.nonce)
            self.accepted.append(dict(request.headers))
            LEDGER.secret(request.headers["Signature"].split("=:", 1)[1].rstrip(":"))
            return web.json_response({
                "keyid": result.parameters["keyid"],
                "covered": list(result.covered_components),
                "body_bytes": len(body),
            })  # fmt: skip

        kwargs = verifier.application_kwargs
        app = web.Application(
            middlewares=(refuse_invalid, *kwargs["middlewares"]),
            handler_args=kwargs.get("handler_args"),
        )
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def _load_jwks(client: aiohttp.ClientSession, proc: Any, verifier: SignatureVerifier) -> None:
    """The verifier trusts exactly the public keys credproxy publishes."""
    async with client.get(proc.admin_url + "/.well-known/jwks.json") as response:
        keys = jwt.PyJWKSet.from_dict(await response.json())
    verifier.keys.clear()
    verifier.keys.update({key.key_id: key.key for key in keys.keys if key.key_id})


def _config(upstream: str, issuer: str, credential: str) -> str:
    return f"""\
{PREAMBLE}issuers:
{issuer}
routes:
  - name: signed
    path_prefix: /api/
    upstream: {upstream}
    credential: {credential}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: json}}
"""


@pytest.fixture
def verifiers():
    started: list[SignatureVerifier] = []

    def start(algorithm: Any) -> SignatureVerifier:
        verifier = SignatureVerifier(algorithm)
        verifier.start()
        started.append(verifier)
        return verifier

    yield start
    for verifier in started:
        verifier.stop()


async def test_ed25519_signature_with_content_digest_verified_independently(
    verifiers, credproxy, client
):
    """Each request is signed for itself (method, target URI, date, and the body's digest when
    there is one); the app's own Signature headers never reach the API."""
    verifier = verifiers(algorithms.ED25519)
    proc = credproxy(
        _config(
            verifier.origin,
            "  self: {type: self_signed_jwt, iss: orders, sub: orders, alg: EdDSA}",
            "{issuer: self, inject: http_signature}",
        )
    )
    await _load_jwks(client, proc, verifier)
    body = b'{"amount": 42}' * 1000
    forged = {"Signature": "sig1=:AAAA:", "Signature-Input": 'sig1=("@method");keyid="x"'}
    async with client.post(proc.url + "/api/v1/charges?x=1", data=body, headers=forged) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
    assert answer["body_bytes"] == len(body)
    assert answer["keyid"] in verifier.keys
    assert answer["covered"] == [
        '"@method"',
        '"@target-uri"',
        '"content-digest"',
        '"date"',
        '"@signature-params"',
    ]
    async with client.get(proc.url + "/api/v1/charges") as resp:
        answer = await resp.json()
        assert resp.status == 200 and '"content-digest"' not in answer["covered"]
    assert len(verifier.nonces) == 2


async def test_tampered_or_replayed_signed_requests_are_refused(verifiers, credproxy, client):
    """A captured signed request fails at the verifier when replayed as is (nonce), with another
    body (digest), another path (target URI), or after its expiry."""
    verifier = verifiers(algorithms.ECDSA_P256_SHA256)
    proc = credproxy(
        _config(
            verifier.origin,
            "  self: {type: self_signed_jwt, iss: orders, sub: orders}",
            "{issuer: self, inject: http_signature, signature: {lifetime_s: 2}}",
        )
    )
    await _load_jwks(client, proc, verifier)
    async with client.put(proc.url + "/api/v1/items/7", data=b"original") as resp:
        assert resp.status == 200, await resp.text()
    captured = {
        k: v
        for k, v in verifier.accepted[-1].items()
        if k in ("Signature", "Signature-Input", "Content-Digest", "Date")
    }
    async with aiohttp.ClientSession() as attacker:
        for path, body, error in [
            ("/v1/items/7", b"original", "replayed"),
            ("/v1/items/7", b"tampered", "invalid signature"),
            ("/v1/items/8", b"original", "invalid signature"),
        ]:
            async with attacker.put(verifier.origin + path, data=body, headers=captured) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"].startswith(error)
        await asyncio.sleep(3)  # past the signature's expires
        verifier.nonces.clear()
        async with attacker.put(
            verifier.origin + "/v1/items/7", data=b"original", headers=captured
        ) as resp:
            assert resp.status == 401 and "expire" in (await resp.json())["error"]


async def test_hmac_with_a_static_secret_and_its_rotation(verifiers, credproxy, client, tmp_path):
    """A static secret signs as HMAC-SHA256 under the configured keyid; a rotated secret file is
    used without restart, and the secret itself never travels."""
    secret = tmp_path / "hmac-key"
    secret.write_text("hmac-secret-one-0123456789abcdef\n")
    verifier = verifiers(algorithms.HMAC_SHA256)
    verifier.keys["partner-2026"] = b"hmac-secret-one-0123456789abcdef"
    LEDGER.secret("hmac-secret-one-0123456789abcdef")
    proc = credproxy(
        _config(
            verifier.origin,
            f"  partner: {{type: static, secret_file: {secret}, reread_s: 1}}",
            "{issuer: partner, inject: http_signature, signature: {key_id: partner-2026}}",
        )
    )
    async with client.post(proc.url + "/api/v1/orders", data=b"{}") as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["keyid"] == "partner-2026"
    assert not any(
        "hmac-secret" in value for value in verifier.accepted[-1].values()
    )  # only the signature travels
    secret.write_text("hmac-secret-two-fedcba9876543210\n")
    verifier.keys["partner-2026"] = b"hmac-secret-two-fedcba9876543210"
    LEDGER.secret("hmac-secret-two-fedcba9876543210")
    for _ in range(50):
        async with client.post(proc.url + "/api/v1/orders", data=b"{}") as resp:
            if resp.status == 200:
                break
        await asyncio.sleep(0.1)
    assert resp.status == 200  # signed with the new secret, no restart


async def test_rotated_key_file_signs_under_its_new_keyid(verifiers, credproxy, client, tmp_path):
    """A replaced ECDSA key file is picked up: signatures carry the new key's thumbprint, which
    the JWKS now lists beside the previous one."""
    key_file = tmp_path / "sign.pem"
    key_file.write_bytes(ec_private_pem()[0])
    verifier = verifiers(algorithms.ECDSA_P256_SHA256)
    proc = credproxy(
        _config(
            verifier.origin,
            f"  self: {{type: self_signed_jwt, iss: orders, sub: orders, key_file: {key_file}}}",
            "{issuer: self, inject: http_signature}",
        )
    )
    await _load_jwks(client, proc, verifier)
    async with client.get(proc.url + "/api/ping") as resp:
        first = (await resp.json())["keyid"]
    time.sleep(0.01)
    key_file.write_bytes(ec_private_pem()[0])
    await asyncio.sleep(1.2)  # key files are checked at most once a second
    async with client.get(proc.url + "/api/ping") as resp:
        assert resp.status == 401  # the verifier does not know the new key yet
    await _load_jwks(client, proc, verifier)
    async with client.get(proc.url + "/api/ping") as resp:
        second = (await resp.json())["keyid"]
    assert second != first and set(verifier.keys) == {first, second}


async def test_unsignable_requests_get_clear_problems(verifiers, credproxy, client):
    """A body over payload_max_bytes is 413, and a request lacking a covered header is 400;
    both are problem+json naming the route, and nothing reaches the API."""
    verifier = verifiers(algorithms.ED25519)
    proc = credproxy(
        _config(
            verifier.origin,
            "  self: {type: self_signed_jwt, iss: orders, sub: orders, alg: EdDSA}",
            "{issuer: self, inject: http_signature, payload_max_bytes: 1024, "
            'signature: {components: ["@method", "@target-uri", "content-digest", "date", '
            '"x-request-id"]}}',
        )
    )
    async with client.post(
        proc.url + "/api/upload", data=b"x" * 2048, headers={"X-Request-Id": "r1"}
    ) as resp:
        assert resp.status == 413
        assert resp.content_type == "application/problem+json"
        assert (await resp.json())["route"] == "signed"
    async with client.get(proc.url + "/api/items") as resp:
        problem = await resp.json()
        assert resp.status == 400 and problem["code"] == "request_not_signable"
    assert verifier.accepted == []
    await _load_jwks(client, proc, verifier)
    async with client.get(proc.url + "/api/items", headers={"X-Request-Id": "r2"}) as resp:
        assert resp.status == 200
        assert '"x-request-id"' in (await resp.json())["covered"]
    events = proc.audit()
    assert [e["reason"] for e in events if e["event"] == "request.denied"] == [
        "payload_too_large",
        "request_not_signable",
    ]
