"""Two more schemes behind the same routes and policy: legacy static secrets (header or query)
and self-signed per-request JWTs, each against an independent verifier on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from tests.counterparts import LEDGER, PREAMBLE, ROOT, ThreadedApp, ec_private_pem


class ApiKeyServer(ThreadedApp):
    """An API that accepts the key currently in ``key_file`` as X-Api-Key or ?api_key=."""

    def __init__(self, key_file) -> None:
        super().__init__()
        self.key_file = key_file

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            expected = self.key_file.read_text().strip()
            LEDGER.secret(expected)
            sent = request.headers.get("X-Api-Key") or request.query.get("api_key")
            if sent != expected:
                return web.json_response({"error": "bad key"}, status=401)
            return web.json_response({
                "path": request.path,
                "query": {k: v for k, v in request.query.items() if k != "api_key"},
                "api_key_values": len(request.query.getall("api_key", [])) + len(request.headers.getall("X-Api-Key", [])),
            })  # fmt: skip

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


class JWTServer(ThreadedApp):
    """An API that verifies self-signed JWTs with pyjwt against credproxy's published JWKS."""

    def __init__(self) -> None:
        super().__init__()
        self.jwks_url = ""
        self.jtis: set[str] = set()
        self.kids: list[str] = []
        self.accepted: list[str] = []

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            LEDGER.secret(token)
            try:
                kid = jwt.get_unverified_header(token)["kid"]
                async with aiohttp.ClientSession() as session:
                    async with session.get(self.jwks_url) as response:
                        keys = jwt.PyJWKSet.from_dict(await response.json())
                key = next(k for k in keys.keys if k.key_id == kid)
                claims: dict[str, Any] = jwt.decode(
                    token, key.key, algorithms=["ES256", "EdDSA", "RS256"], audience=self.origin,
                    issuer="orders-service", options={"require": ["exp", "iat", "jti", "sub"]},
                )  # fmt: skip
            except (jwt.PyJWTError, KeyError, StopIteration) as exc:
                return web.json_response({"error": f"invalid: {exc}"}, status=401)
            if claims["exp"] - claims["iat"] > 60:
                return web.json_response({"error": "too long-lived"}, status=401)
            if (
                claims.get("htu") != self.origin + request.path
                or claims.get("htm") != request.method
            ):
                return web.json_response({"error": "made for another request"}, status=401)
            if claims["jti"] in self.jtis:
                return web.json_response({"error": "replayed"}, status=401)
            self.jtis.add(claims["jti"])
            self.kids.append(kid)
            self.accepted.append(token)
            return web.json_response({"sub": claims["sub"], "kid": kid})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture
def servers(tmp_path):
    """The API-key checker and the JWT verifier, with the files credproxy reads."""
    key_file = tmp_path / "api-key"
    key_file.write_text("legacy-key-0123456789abcdef\n")
    jwt_key = tmp_path / "jwt.pem"
    jwt_key.write_bytes(ec_private_pem()[0])
    api, jwt_server = ApiKeyServer(key_file), JWTServer()
    api.start()
    jwt_server.start()
    yield api, jwt_server, key_file, jwt_key
    api.stop()
    jwt_server.stop()


def _config(api: ApiKeyServer, jwt_server: JWTServer, key_file, jwt_key) -> str:
    return f"""\
{PREAMBLE}issuers:
  legacy-key:
    type: static
    secret_file: {key_file}
    reread_s: 2
  self:
    type: self_signed_jwt
    iss: orders-service
    sub: orders-service
    key_file: {jwt_key}
    request_claims: true
routes:
  - name: by-header
    path_prefix: /h/
    upstream: {api.origin}
    credential: {{issuer: legacy-key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
  - name: by-query
    path_prefix: /q/
    upstream: {api.origin}
    credential: {{issuer: legacy-key, inject: query, query_param: api_key}}
    allow: [{{callers: [test-suite]}}]
  - name: jwt
    path_prefix: /jwt/
    upstream: {jwt_server.origin}
    credential: {{issuer: self, inject: bearer}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: json}}
"""


async def test_static_secret_in_header_and_query_with_rotation(servers, credproxy, client):
    """The file's key reaches the API as a header or query parameter (the app's own is dropped),
    is audited as legacy once per value, and a rotated file is picked up without restart."""
    api, jwt_server, key_file, jwt_key = servers
    proc = credproxy(_config(api, jwt_server, key_file, jwt_key))
    async with client.get(proc.url + "/h/v1/items", headers={"X-Api-Key": "app-junk"}) as response:
        assert response.status == 200 and (await response.json())["api_key_values"] == 1
    async with client.get(proc.url + "/q/v1/items?page=2&api_key=app-junk") as response:
        body = await response.json()
        assert (
            response.status == 200
            and body["query"] == {"page": "2"}
            and body["api_key_values"] == 1
        )
    key_file.write_text("legacy-key-rotated-fedcba9876\n")
    for _ in range(100):
        async with client.get(proc.url + "/h/v1/items") as response:
            if response.status == 200:
                break
        await asyncio.sleep(0.1)
    assert response.status == 200  # the new key, no restart
    issued = proc.audit()
    legacy = [e for e in issued if e.get("issuer") == "legacy-key"]
    assert [e["event"] for e in legacy] == ["credential.issued", "credential.refreshed"]
    assert all(e["legacy"] is True for e in legacy)


async def test_self_signed_jwt_per_request_verified_against_published_jwks(
    servers, credproxy, client
):
    """Each request carries a fresh JWT the API verifies with the admin JWKS; a captured JWT
    replayed, or used for another request, is refused; a rotated key file is picked up."""
    api, jwt_server, key_file, jwt_key = servers
    proc = credproxy(_config(api, jwt_server, key_file, jwt_key))
    jwt_server.jwks_url = proc.admin_url + "/.well-known/jwks.json"
    for _ in range(5):
        async with client.post(
            proc.url + "/jwt/v1/orders", headers={"Authorization": "Bearer app-junk"}
        ) as response:
            assert response.status == 200, await response.text()
    assert len(jwt_server.jtis) == 5
    captured = jwt_server.accepted[-1]
    async with aiohttp.ClientSession() as attacker:
        for path, error in [
            ("/v1/orders", "replayed"),
            ("/v1/refunds", "made for another request"),
        ]:
            headers = {"Authorization": f"Bearer {captured}"}
            async with attacker.post(jwt_server.origin + path, headers=headers) as response:
                assert response.status == 401 and (await response.json())["error"] == error
    old_kid = jwt_server.kids[-1]
    time.sleep(0.01)
    jwt_key.write_bytes(ec_private_pem()[0])
    await asyncio.sleep(1.2)  # the key file is checked at most once a second
    async with client.post(proc.url + "/jwt/v1/orders") as response:
        assert response.status == 200
    assert jwt_server.kids[-1] != old_kid
    async with client.get(proc.admin_url + "/.well-known/jwks.json") as response:
        kids = [k["kid"] for k in (await response.json())["keys"]]
    assert kids == [old_kid, jwt_server.kids[-1]]  # the previous key stays for in-flight tokens


class MTLSEcho(ThreadedApp):
    """An upstream that demands a client certificate from the test CA and names it back."""

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            subject = dict(item[0] for item in peer["subject"]) if peer else {}
            return web.json_response({"client_cn": subject.get("commonName")})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def test_mtls_to_upstream_with_client_certificate_rotation(tmp_path, credproxy, client):
    """A route with a client certificate passes an upstream that requires one; without, the TLS
    handshake fails (502); replaced certificate files are used without restart."""
    from tests.tls import TestCA

    ca = TestCA(tmp_path)
    cert, key = ca.issue("orders-workload-v1", server=False, stem="client")
    upstream = MTLSEcho(tls=ca.server_context(require_client_cert=True))
    upstream.start()
    secret = tmp_path / "api-key"
    secret.write_text("k-0123456789abcdef\n")
    routes = "".join(
        f"""\
  - name: {name}
    path_prefix: /{name}/
    upstream: {upstream.origin}
    ca_file: {ca.ca_file}
{extra}    credential: {{issuer: key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
"""
        for name, extra in [
            ("mtls", f"    client_cert_file: {cert}\n    client_key_file: {key}\n"),
            ("plain", ""),
        ]
    )
    text = f"""\
{PREAMBLE}issuers:
  key: {{type: static, secret_file: {secret}}}
routes:
{routes}audit: {{file: "{{audit}}"}}
"""
    try:
        proc = credproxy(text)
        async with client.get(proc.url + "/mtls/x") as response:
            assert (await response.json()) == {"client_cn": "orders-workload-v1"}
        async with client.get(proc.url + "/plain/x") as response:
            assert response.status == 502
        ca.issue("orders-workload-v2", server=False, stem="client")  # rotated in place
        await asyncio.sleep(1.2)  # certificate files are checked at most once a second
        async with aiohttp.ClientSession() as fresh:  # a new connection: a new handshake
            async with fresh.get(proc.url + "/mtls/y", headers={"Connection": "close"}) as response:
                assert (await response.json()) == {"client_cn": "orders-workload-v2"}
    finally:
        upstream.stop()


@pytest.mark.parametrize("request_claims", [True, False])
async def test_minted_claims_are_exact_json_whatever_the_names_hold(request_claims):
    """The per-request claims template escapes what config and request put in it: the JWT
    decodes (verified with the JWKS key) to exactly the claims below."""
    from proxy.config.issuers import SelfSignedJWTIssuerConfig as JWTConfig
    from proxy.credentials.issuers.self_signed_jwt import SelfSignedJWTIssuer
    from proxy.credentials.signing import SignatureBatch

    config = JWTConfig(
        type="self_signed_jwt", iss='svc "a"\\b', sub="zoë\u2028", lifetime_s=20.5,
        request_claims=request_claims,
    )  # fmt: skip
    issuer = SelfSignedJWTIssuer("self", config, session=None, dpop_key=None, identity=None)  # type: ignore[arg-type]
    token = await issuer.mint(SignatureBatch(), 'https://api.example/"x"', "POST", "https://a/b")
    key = jwt.PyJWK(issuer.jwks()["keys"][-1]).key
    claims = jwt.decode(token, key, algorithms=["ES256"], audience='https://api.example/"x"')
    expected = {"iss": 'svc "a"\\b', "sub": "zoë\u2028", "aud": 'https://api.example/"x"'}
    if request_claims:
        expected |= {"htm": "POST", "htu": "https://a/b"}
    assert {k: v for k, v in claims.items() if k not in ("iat", "exp", "jti")} == expected
    assert claims["exp"] == claims["iat"] + 20 and abs(claims["iat"] - time.time()) <= 2
    assert len(claims["jti"]) == 22  # 128 random bits, base64url


def _static_only(api: ApiKeyServer, key_file, *, on_start_failure: str = "not_ready") -> str:
    return f"""\
{PREAMBLE}issuers:
  legacy-key: {{type: static, secret_file: {key_file}, reread_s: 2}}
routes:
  - name: by-header
    path_prefix: /h/
    upstream: {api.origin}
    credential: {{issuer: legacy-key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
on_start_failure: {on_start_failure}
"""


UNUSABLE_SECRETS = {
    "invalid-utf8": b"\xff\xfelegacy-key-0123\n",
    "non-ascii": "clé-secrète-0123456789\n".encode(),
    # a bare CR: some parsers end the header line there, and "X-Forged" becomes a header
    "bare-cr": b"legacy-key-0123\rX-Forged: 1\n",
}


@pytest.mark.parametrize("content", UNUSABLE_SECRETS.values(), ids=UNUSABLE_SECRETS.keys())
async def test_an_unusable_static_secret_answers_503_then_recovers_without_restart(
    content, tmp_path, credproxy, client
):
    """A secret file credproxy cannot send (invalid UTF-8, non-ASCII, a control character) makes
    requests answer 503 credential_unavailable with Retry-After instead of hanging (a bare CR is
    never forwarded); once the file is fixed they succeed, without restart, and the bad content
    never reaches the log."""
    key_file = tmp_path / "api-key"
    key_file.write_bytes(content)
    LEDGER.secret(content.decode(errors="ignore").strip())
    api = ApiKeyServer(key_file)
    api.start()
    try:
        proc = credproxy(_static_only(api, key_file), expect_ready=False)
        hang_guard = aiohttp.ClientTimeout(total=20)
        async with client.get(proc.url + "/h/v1/items", timeout=hang_guard) as response:
            problem = await response.json()
            assert response.status == 503 and problem["code"] == "credential_unavailable"
            assert int(response.headers["Retry-After"]) >= 1
        key_file.write_text("legacy-key-fixed-0123456789\n")
        for _ in range(400):
            async with client.get(proc.url + "/h/v1/items", timeout=hang_guard) as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.1)
        assert response.status == 200
        assert "clé" not in proc.log() and "Traceback" not in proc.log()
    finally:
        api.stop()


async def test_an_unusable_static_secret_with_exit_on_start_failure_exits(tmp_path, credproxy):
    """With on_start_failure: exit, an undecodable secret file ends the start with exit 1 and a
    message naming the file, instead of a start that never finishes."""
    key_file = tmp_path / "api-key"
    key_file.write_bytes(UNUSABLE_SECRETS["invalid-utf8"])
    api = ApiKeyServer(key_file)
    api.start()
    try:
        proc = credproxy(_static_only(api, key_file, on_start_failure="exit"), expect_ready=False)
        assert proc.process is not None and proc.process.wait(timeout=30) == 1
        assert f"issuers.legacy-key.secret_file: {key_file} is not UTF-8 text" in proc.log()
    finally:
        api.stop()


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
async def test_a_generated_key_is_of_the_configured_alg(alg):
    """Without a key_file, alg decides the generated key: RS256 publishes an RSA key and signs
    RS256 JWTs (not an EC key under an RS256 config)."""
    from proxy.config.issuers import SelfSignedJWTIssuerConfig as JWTConfig
    from proxy.credentials.issuers.self_signed_jwt import SelfSignedJWTIssuer
    from proxy.credentials.signing import SignatureBatch

    config = JWTConfig(type="self_signed_jwt", iss="svc", sub="svc", alg=alg)
    issuer = SelfSignedJWTIssuer("self", config, session=None, dpop_key=None, identity=None)  # type: ignore[arg-type]
    [published] = issuer.jwks()["keys"]
    assert published["alg"] == alg
    assert published["kty"] == {"ES256": "EC", "EdDSA": "OKP", "RS256": "RSA"}[alg]
    token = await issuer.mint(SignatureBatch(), "https://api.example", "GET", "https://a/b")
    assert jwt.get_unverified_header(token)["alg"] == alg
    key = jwt.PyJWK(published).key
    assert jwt.decode(token, key, algorithms=[alg], audience="https://api.example")["sub"] == "svc"


async def test_the_audit_fingerprint_of_a_static_key_confirms_no_guess(tmp_path, credproxy, client):
    """The audit log names the static key by a keyed fingerprint, not sha256(key)[:12], so a
    guessed key cannot be confirmed from the log; both workers of a run use the same one (one
    instance), so uses correlate with issuance and ``credproxy evidence`` sees one credential."""
    key = "legacy-key-0123456789abcdef"
    key_file = tmp_path / "api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    api = ApiKeyServer(key_file)
    api.start()
    try:
        text = _static_only(api, key_file).replace(
            'audit: {file: "{audit}"}', 'audit: {file: "{audit}", used: request}'
        )
        proc = credproxy(text, args=("--workers", "2"))
        for _ in range(20):
            async with client.get(
                proc.url + "/h/v1/items", headers={"Connection": "close"}
            ) as response:
                assert response.status == 200
    finally:
        api.stop()
    events = proc.audit()
    started = [e for e in events if e["event"] == "audit.started"]
    issued = [e for e in events if e["event"] == "credential.issued"]
    used = [e for e in events if e["event"] == "credential.used"]
    assert len(started) == 2 and len(issued) == 2 and len(used) == 20  # one writer per worker
    assert len({e["instance"] for e in events}) == 1
    assert {e["fingerprint"] for e in issued + used} == {issued[0]["fingerprint"]}
    assert issued[0]["fingerprint"] != hashlib.sha256(key.encode()).hexdigest()[:12]
    assert issued[0]["fingerprint"] != hashlib.sha256((key + "\n").encode()).hexdigest()[:12]
    report = subprocess.run(
        [sys.executable, "-m", "proxy", "evidence", "--audit", str(proc.audit_file),
         "--format", "json"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    [credential] = json.loads(report.stdout)["credentials"]
    assert credential["fingerprint"] == issued[0]["fingerprint"] and credential["uses"] == 20
