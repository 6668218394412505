"""RFC 8705 against the real IdPs over TLS (oidc-provider, Keycloak's X.509 client
authenticator): the sidecar authenticates to the IdP with a client certificate
(``tls_client_auth``), the IdP binds the token to that certificate (``cnf.x5t#S256``), and the
API accepts it only over a connection presenting the same one."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import urllib.request
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.credentials.jose import b64url
from tests.counterparts import LEDGER, PREAMBLE, IdP, ThreadedApp
from tests.tls import TestCA

AUDIENCE = "https://orders-api.example"


class CertificateBoundAPI(ThreadedApp):
    """An API over mTLS that accepts a JWT access token from the IdP only when its
    ``cnf.x5t#S256`` is the thumbprint of the client certificate of this very connection."""

    def __init__(self, ca: TestCA, jwks: dict[str, Any], audience: str) -> None:
        super().__init__(tls=ca.server_context(require_client_cert=True))
        self.keys = jwt.PyJWKSet.from_dict(jwks)
        self.audience = audience
        self.tokens: list[str] = []  # as received

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            LEDGER.secret(token)
            self.tokens.append(token)
            tls = request.transport.get_extra_info("ssl_object") if request.transport else None
            der = tls.getpeercert(binary_form=True) if tls else None
            try:
                kid = jwt.get_unverified_header(token)["kid"]
                key = next(k for k in self.keys.keys if k.key_id == kid)
                claims = jwt.decode(
                    token, key.key, algorithms=["ES256", "RS256"], audience=self.audience
                )
            except (jwt.PyJWTError, KeyError, StopIteration) as exc:
                return _invalid(f"invalid token: {exc}")
            bound = claims.get("cnf", {}).get("x5t#S256")
            if der is None or bound != b64url(hashlib.sha256(der).digest()):
                return _invalid("token not bound to this client certificate")
            return web.json_response({"client_id": claims.get("client_id"), "x5t": bound})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def _invalid(detail: str) -> web.Response:
    challenge = f'Bearer error="invalid_token", error_description="{detail}"'
    return web.json_response({"error": detail}, status=401, headers={"WWW-Authenticate": challenge})


def _thumbprint(cert_file) -> str:
    """RFC 8705 §3.1: base64url SHA-256 of the DER certificate."""
    der = x509.load_pem_x509_certificate(cert_file.read_bytes()).public_bytes(Encoding.DER)
    return b64url(hashlib.sha256(der).digest())


@dataclass
class MTLS:
    """An IdP over https with a tls_client_auth client, and a certificate-bound API it serves."""

    ca: TestCA
    idp: Any  # IdP or Keycloak: MTLS_CLIENT_ID, records()
    issuer: str
    api: CertificateBoundAPI
    scope: str


@pytest.fixture(params=["oidc-provider", "keycloak"])
def mtls_idp(request, tmp_path):
    """oidc-provider over https (certificate from a test CA) with a tls_client_auth client, or
    the session's Keycloak on its https port."""
    if request.param == "keycloak":
        keycloak = request.getfixturevalue("keycloak")
        with urllib.request.urlopen(keycloak.jwks_uri, timeout=10) as response:
            jwks = json.load(response)
        api = CertificateBoundAPI(keycloak.tls, jwks, keycloak.PAYMENTS)
        api.start()
        yield MTLS(keycloak.tls, keycloak, keycloak.https_issuer, api, "payments.write")
        api.stop()
        return
    ca = TestCA(tmp_path)
    idp = IdP(tmp_path, tls=ca)
    idp.add_resource(AUDIENCE, ttl_s=300)
    idp.start()
    public = {k: v for k, v in idp._signing_jwk.items() if k != "d"}
    api = CertificateBoundAPI(ca, {"keys": [public]}, AUDIENCE)
    api.start()
    yield MTLS(ca, idp, idp.issuer, api, "")
    api.stop()
    idp.records()
    idp.stop()


def _config(mtls: MTLS, cert, key) -> str:
    scope = f", scope: {mtls.scope}" if mtls.scope else ""
    return f"""\
{PREAMBLE}issuers:
  corp-idp:
    type: oauth2
    issuer_url: {mtls.issuer}
    client_id: {mtls.idp.MTLS_CLIENT_ID}
    client_auth: tls_client_auth
    client_cert_file: {cert}
    client_key_file: {key}
    ca_file: {mtls.ca.ca_file}
routes:
  - name: orders
    path_prefix: /orders/
    upstream: {mtls.api.origin}
    ca_file: {mtls.ca.ca_file}
    credential: {{issuer: corp-idp, audience: "{mtls.api.audience}"{scope}, inject: bearer}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
"""


def _issued(mtls: MTLS) -> list[dict[str, Any]] | None:
    """The token requests the IdP answered with a token, where it records them."""
    records = mtls.idp.records()
    return None if records is None else [r for r in records if r.get("access_token")]


async def test_certificate_bound_token_from_tls_client_auth(mtls_idp, credproxy, client):
    """The IdP authenticates the sidecar by its certificate and binds the token to it; the
    route presents the same certificate upstream, so the API accepts the token."""
    mtls = mtls_idp
    cert, key = mtls.ca.issue("orders-workload", server=False, stem="client")
    proc = credproxy(_config(mtls, cert, key))
    async with client.get(proc.url + "/orders/v1/list") as response:
        body = await response.json()
        assert response.status == 200, body
    assert body == {"client_id": mtls.idp.MTLS_CLIENT_ID, "x5t": _thumbprint(cert)}
    issued = _issued(mtls)
    if issued is not None:
        [request] = issued
        assert "client_assertion" not in request  # no assertion, no secret: the certificate


async def test_stolen_certificate_bound_token_is_useless(mtls_idp, credproxy, client):
    """The token replayed over a connection with another client certificate, or none, fails."""
    mtls = mtls_idp
    ca, api = mtls.ca, mtls.api
    cert, key = ca.issue("orders-workload", server=False, stem="client")
    proc = credproxy(_config(mtls, cert, key))
    async with client.get(proc.url + "/orders/v1/list") as response:
        assert response.status == 200
    token = api.tokens[-1]
    other_cert, other_key = ca.issue("attacker", server=False, stem="attacker")
    with_other = ssl.create_default_context(cafile=ca.ca_file)
    with_other.load_cert_chain(other_cert, other_key)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as attacker:
        async with attacker.get(api.origin + "/v1/list", headers=headers, ssl=with_other) as r:
            assert r.status == 401
            assert (await r.json())["error"] == "token not bound to this client certificate"
        plain = ssl.create_default_context(cafile=ca.ca_file)
        with pytest.raises(aiohttp.ClientError):  # the API demands a certificate at all
            async with attacker.get(api.origin + "/v1/list", headers=headers, ssl=plain):
                pass


async def test_rotated_client_certificate_gets_a_token_bound_to_it(mtls_idp, credproxy, client):
    """Replaced certificate files are used for the IdP and the API without restart; the token
    bound to the old certificate is refused once (invalid_token) and replaced."""
    mtls = mtls_idp
    ca = mtls.ca
    cert, key = ca.issue("orders-workload", server=False, stem="client")
    proc = credproxy(_config(mtls, cert, key))
    async with client.get(proc.url + "/orders/v1/list") as response:
        first = (await response.json())["x5t"]
    ca.issue("orders-workload", server=False, stem="client")  # rotated in place, new key
    await asyncio.sleep(1.2)  # certificate files are checked at most once a second
    async with aiohttp.ClientSession() as fresh:  # a new connection: a new handshake
        async with fresh.get(proc.url + "/orders/v1/list") as response:
            body = await response.json()
            assert response.status == 200, body
    assert body["x5t"] == _thumbprint(cert) != first
    issued = _issued(mtls)
    assert issued is None or len(issued) == 2


async def test_certificate_the_idp_does_not_accept_gets_no_token(mtls_idp, credproxy, client):
    """A certificate whose subject is not the registered one gets no token: the route answers
    503 credential_unavailable and the operator's log names the token endpoint's refusal."""
    mtls = mtls_idp
    cert, key = mtls.ca.issue("somebody-else", server=False, stem="client")
    proc = credproxy(_config(mtls, cert, key), expect_ready=False)
    async with client.get(proc.url + "/orders/v1/list") as response:
        assert response.status == 503
        assert (await response.json())["code"] == "credential_unavailable"
    assert "invalid_client" in proc.log()
