"""End to end through a running ``credproxy run``: app → credproxy → oidc-provider + verifying
resource server, all real, all on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import jwt
import pytest

from tests.counterparts import LEDGER, config, wait_until


def _proxy_config(idp, upstream, **kwargs):
    return config(idp=idp, upstream=upstream.origin, audience=upstream.audience, **kwargs)


@pytest.mark.parametrize(
    ("dpop_alg", "assertion_audience", "client_key"),
    [("ES256", "issuer", "ES256"), ("EdDSA", "token_endpoint", "RS256")],
)
async def test_app_request_is_accepted_by_verifying_resource_server(
    oauth_idp, oauth_upstream, credproxy, client, dpop_alg, assertion_audience, client_key
):
    """Discovery from issuer_url, private_key_jwt (an ES256 or RS256 client key, assertion
    audience the issuer or the token endpoint), and a DPoP-bound token: the app's plain request
    arrives with the token and a valid proof, path and query intact."""
    from yarl import URL

    idp, upstream = oauth_idp, oauth_upstream
    key_file = idp.client_key_file if client_key == "ES256" else idp.client_rsa_key_file
    text = config(
        idp=idp,
        upstream=upstream.origin,
        audience=upstream.audience,
        client_key_file=key_file,
        top=f"identity: {{dpop_alg: {dpop_alg}}}",
    ).replace("    client_auth:", f"    assertion_audience: {assertion_audience}\n    client_auth:")
    proc = credproxy(text)

    target = URL(proc.url + "/payments/v1/charges?limit=2&x=%2Fy", encoded=True)
    async with client.get(target) as response:
        body = await response.json()
    assert response.status == 200, body
    assert body["authorization_schemes"] == ["DPoP"]
    assert body["path"] == "/v1/charges" and body["query"] == "limit=2&x=%2Fy"
    assert body["client_id"] == "orders-service" and body["scope"] == "payments.write"
    assert body["jkt"]
    assert jwt.get_unverified_header(upstream.seen()[-1][1])["alg"] == dpop_alg
    records = idp.records()
    if records is None:  # Keycloak keeps no record of the assertion: that it issued is the proof
        return
    assertion = [r for r in records if r.get("client_assertion")][-1]["client_assertion"]
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert jwt.get_unverified_header(assertion)["alg"] == client_key
    assert claims["aud"] == (
        idp.issuer if assertion_audience == "issuer" else idp.issuer + "/token"
    )
    assert (
        claims["exp"] - claims["iat"] <= 60 and claims["iss"] == claims["sub"] == "orders-service"
    )


async def test_scope_and_audience_per_route_are_in_the_tokens(
    oauth_idp, oauth_upstream, credproxy, client
):
    """Two routes to two APIs, each with its own audience (RFC 8707 resource) and scope: each
    API receives a token for exactly its audience and scope."""
    idp, upstream = oauth_idp, oauth_upstream
    extra = f"""\
  - name: reports
    path_prefix: /reports/
    upstream: {upstream.origin}
    credential: {{issuer: test-idp, audience: "{upstream.other_audience}", scope: payments.read}}
    allow: [{{callers: [test-suite]}}]
"""
    proc = credproxy(
        config(idp=idp, upstream=upstream.origin, audience=upstream.audience, extra_route=extra)
    )
    seen = {}
    for route in ("payments", "reports"):
        async with client.get(f"{proc.url}/{route}/v1/x") as response:
            body = await response.json()
            assert response.status == 200, body
        audience = body["aud"] if isinstance(body["aud"], list) else [body["aud"]]
        seen[route] = (audience, body["scope"])
    assert seen == {
        "payments": ([upstream.audience], "payments.write"),
        "reports": ([upstream.other_audience], "payments.read"),
    }


async def test_a_scope_the_idp_did_not_grant_is_named_in_the_operators_log(
    idp, upstream, credproxy, client
):
    """oidc-provider grants a resource only the scopes it declares and drops the rest without
    an error (its answer's ``scope`` says what was granted): the token is used for what it
    holds, and one warning names the issuer, the audience and the missing scope."""
    extra = f"""\
  - name: reports
    path_prefix: /reports/
    upstream: {upstream.origin}
    credential:
      issuer: test-idp
      audience: "{upstream.other_audience}"
      scope: payments.read payments.write
    allow: [{{callers: [test-suite]}}]
"""
    proc = credproxy(
        config(idp=idp, upstream=upstream.origin, audience=upstream.audience, extra_route=extra)
    )
    for _ in range(2):
        async with client.get(f"{proc.url}/reports/v1/x") as response:
            body = await response.json()
            assert response.status == 200, body
    assert body["scope"] == "payments.read"  # the IdP narrowed it
    warnings = [line for line in proc.log().splitlines() if "the IdP granted scope" in line]
    assert len(warnings) == 1, warnings
    assert "issuers.test-idp" in warnings[0] and upstream.other_audience in warnings[0]
    assert "missing payments.write" in warnings[0]


async def test_app_credentials_and_hop_by_hop_headers_are_not_forwarded(
    idp, upstream, credproxy, client
):
    """App-supplied Authorization, Proxy-Authorization, DPoP, configured and hop-by-hop headers never reach the upstream."""
    proc = credproxy(_proxy_config(idp, upstream))
    headers = {
        "Authorization": "Bearer app-held-secret-1",
        "Proxy-Authorization": "Basic app-held-secret-2",
        "DPoP": "app-held-secret-3",
        "X-Api-Key": "app-held-secret-4",
        "Connection": "keep-alive, X-Private-Hop",
        "X-Private-Hop": "app-held-secret-5",
        "TE": "trailers",
        "X-Kept": "visible",
    }
    async with client.get(proc.url + "/payments/v1/me", headers=headers) as response:
        body = await response.json()
    assert response.status == 200, body
    assert body["authorization_schemes"] == ["DPoP"]
    forwarded = json.dumps(body["headers"])
    assert "app-held-secret" not in forwarded
    names = {name.lower() for name, _ in body["headers"]}
    assert {"proxy-authorization", "x-api-key", "x-private-hop", "te"}.isdisjoint(names)
    assert ["X-Kept", "visible"] in body["headers"]
    assert not any(name.lower().startswith("x-forwarded") for name in names)


async def test_response_hop_by_hop_headers_are_removed(idp, upstream, credproxy, client):
    """Headers the upstream lists in Connection are dropped from the response; others pass."""
    proc = credproxy(_proxy_config(idp, upstream, top="warm_up: true"))
    async with client.get(proc.url + "/payments/api/hop-by-hop") as response:
        assert response.status == 200
        assert "X-Upstream-Hop" not in response.headers
        assert response.headers["X-Kept"] == "1"


async def test_captured_token_and_proof_are_useless_without_sidecar_key(
    oauth_idp, oauth_upstream, credproxy, client
):
    """A token and proof copied at the resource server cannot be replayed: as bearer, without proof, with the used proof, or with a proof from another key."""
    from proxy.credentials.dpop import DPoPKey, access_token_hash

    upstream = oauth_upstream
    proc = credproxy(_proxy_config(oauth_idp, upstream))
    async with client.get(proc.url + "/payments/v1/charges") as response:
        assert response.status == 200
    token, proof = upstream.seen()[-1]
    target = upstream.origin + "/v1/charges"
    attacker_key = DPoPKey()
    attempts = {
        "as bearer": {"Authorization": f"Bearer {token}"},
        "without proof": {"Authorization": f"DPoP {token}"},
        "replayed proof": {"Authorization": f"DPoP {token}", "DPoP": proof},
        "attacker's own proof": {
            "Authorization": f"DPoP {token}",
            "DPoP": attacker_key.proof("GET", target, ath=access_token_hash(token)),
        },
    }
    for what, headers in attempts.items():
        async with client.get(target, headers=headers) as response:
            assert response.status == 401, what
            assert "invalid" in response.headers["WWW-Authenticate"], what


async def test_each_request_gets_a_fresh_proof(oauth_idp, oauth_upstream, credproxy, client):
    """Ten requests carry ten distinct proofs (distinct jti) with one token."""
    upstream = oauth_upstream
    proc = credproxy(_proxy_config(oauth_idp, upstream))
    before = len(upstream.seen())
    for _ in range(10):
        async with client.post(proc.url + "/payments/v1/charges", data=b"{}") as response:
            assert response.status == 200
    pairs = upstream.seen()[before:]
    assert len({proof for _, proof in pairs}) == 10
    assert len({token for token, _ in pairs}) == 1


async def test_concurrent_requests_each_carry_a_proof_for_their_own_method_and_path(
    idp, upstream, credproxy
):
    """Proofs signed together (``signing``) still each cover their own request: 40 concurrent
    requests to distinct paths, half POST, all accepted by the verifying resource server."""
    proc = credproxy(_proxy_config(idp, upstream))
    before = len(upstream.seen())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def one(i: int) -> int:
            method = "POST" if i % 2 else "GET"
            url = f"{proc.url}/payments/v1/charges/{i}"
            async with client.request(method, url, data=b"{}" if i % 2 else None) as response:
                body = await response.json()
                assert body["path"] == f"/v1/charges/{i}", body
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(40)))
    assert statuses == [200] * 40
    proofs = [proof for _, proof in upstream.seen()[before:]]
    claims = [jwt.decode(p, options={"verify_signature": False}) for p in proofs]
    assert sorted(c["htu"].rsplit("/", 1)[1] for c in claims) == sorted(map(str, range(40)))
    assert len({c["jti"] for c in claims}) == 40


async def test_200_concurrent_cold_requests_cause_one_token_request(idp, upstream, credproxy):
    """With no cached token, 200 concurrent requests produce exactly one token request at the IdP."""
    proc = credproxy(_proxy_config(idp, upstream, top="warm_up: false"))
    before = idp.stats()["token_requests"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def one() -> int:
            async with client.get(proc.url + "/payments/v1/charges") as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses == [200] * 200
    assert idp.stats()["token_requests"] - before == 1


async def test_short_lived_tokens_refresh_ahead_under_steady_traffic(
    idp, upstream, credproxy, client
):
    """5 s tokens over 30 s of steady traffic: no failed request, one refresh per ~4 s."""
    proc = credproxy(config(idp=idp, upstream=upstream.origin, audience=upstream.short_audience))
    before = idp.stats()["token_requests"]
    started = time.monotonic()
    statuses: list[int] = []
    while time.monotonic() - started < 30:
        async with client.get(proc.url + "/payments/v1/charges") as response:
            statuses.append(response.status)
        await asyncio.sleep(0.05)
    token_requests = idp.stats()["token_requests"] - before
    print(f"5 s tokens, 30 s traffic: {len(statuses)} requests, {token_requests} token requests")
    assert statuses and set(statuses) == {200}, f"{statuses.count(200)}/{len(statuses)} ok"
    # refresh ahead = min(60, 20 % of 5 s) = 1 s → one token per 4 s → 7 or 8 in 30 s
    assert 6 <= token_requests <= 9, token_requests
    tokens = {token for token, _ in upstream.seen()[-len(statuses) :]}
    assert len(tokens) >= 6


async def test_idp_nonce_requirement_is_met_with_one_retry(idp, upstream, credproxy, client):
    """When the IdP demands a DPoP nonce, the token request is retried once with it and succeeds."""
    idp.require_nonce(True)
    try:
        before = len(idp.records())
        proc = credproxy(_proxy_config(idp, upstream))
        async with client.get(proc.url + "/payments/v1/charges") as response:
            assert response.status == 200
        attempts = idp.records()[before:]
    finally:
        idp.require_nonce(False)
    assert [(a["status"], a.get("error")) for a in attempts] == [
        (400, "use_dpop_nonce"),
        (200, None),
    ]


async def test_resource_server_nonce_is_honoured_with_one_retry(
    oauth_idp, oauth_upstream, credproxy, client
):
    """A 401 use_dpop_nonce from the upstream is answered by exactly one replay carrying the
    nonce (the IdP's DPoP-bound token: oidc-provider's or Keycloak's, whose token endpoint asks
    for no nonce)."""
    upstream = oauth_upstream
    proc = credproxy(_proxy_config(oauth_idp, upstream))
    async with client.get(proc.url + "/payments/v1/warm") as response:
        assert response.status == 200
    upstream.verifier.require_nonce = True
    try:
        before = len(upstream.seen())
        async with client.post(proc.url + "/payments/v1/charges", json={"n": 1}) as response:
            assert response.status == 200
            assert (await response.json())["method"] == "POST"
        assert len(upstream.seen()) - before == 2  # the refused attempt and the replay
        async with client.get(proc.url + "/payments/v1/again") as response:
            assert response.status == 200
        assert len(upstream.seen()) - before == 3  # the stored nonce is reused: no retry
    finally:
        upstream.verifier.require_nonce = False
    async with client.get(proc.admin_url + "/metrics") as response:
        metrics = await response.text()
    assert (
        'credproxy_credential_retries_total{reason="use_dpop_nonce",route="payments"} 1.0'
        in metrics
    )


async def test_invalid_token_triggers_one_refresh_and_replay(idp, upstream, credproxy, client):
    """After the upstream rejects the token as invalid, credproxy fetches a new one and replays once."""
    proc = credproxy(_proxy_config(idp, upstream))
    async with client.get(proc.url + "/payments/v1/warm") as response:
        assert response.status == 200
    old_token = upstream.seen()[-1][0]
    upstream.verifier.revoked.add(old_token)
    before = idp.stats()["token_requests"]
    async with client.put(proc.url + "/payments/v1/charges/1", data=b"small body") as response:
        assert response.status == 200
    assert idp.stats()["token_requests"] - before == 1
    assert upstream.seen()[-1][0] != old_token


async def test_token_echo_is_scrubbed_from_response(idp, upstream, credproxy, client):
    """An upstream echoing the injected token in headers and body shows the app only a mask."""
    proc = credproxy(_proxy_config(idp, upstream))
    async with client.get(proc.url + "/payments/api/echo-credential") as response:
        text = await response.text()
        echo_header = response.headers["X-Echo"]
    token = upstream.seen()[-1][0]
    assert token not in text and token not in echo_header
    assert text.count("*" * len(token)) == 2
    assert int(response.headers["Content-Length"]) == len(text)


async def test_redirects_are_returned_not_followed(idp, upstream, credproxy, client):
    """A 302 from the upstream goes back to the app; credproxy does not follow it with a credential."""
    proc = credproxy(_proxy_config(idp, upstream))
    async with client.get(proc.url + "/payments/api/redirect", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "http://127.0.0.2:9/stolen"


async def test_bearer_injection_and_legacy_client_secret(
    oauth_idp, oauth_upstream, credproxy, client
):
    """A bearer route with client_secret authentication gets an unbound token the upstream accepts."""
    proc = credproxy(
        _proxy_config(oauth_idp, oauth_upstream, inject="bearer", client_auth="client_secret")
    )
    async with client.get(proc.url + "/payments/v1/charges") as response:
        body = await response.json()
    assert response.status == 200, body
    assert body["authorization_schemes"] == ["Bearer"]
    assert body["client_id"] == oauth_idp.LEGACY_CLIENT_ID and body["jkt"] is None


async def test_host_routing_and_kept_prefix(idp, upstream, credproxy, client):
    """A Host-routed route keeps the path whole; a prefix route strips it; unknown → 404 problem."""
    extra = f"""\
  - name: by-host
    host: payments.local
    upstream: {upstream.origin}
    credential: {{issuer: test-idp, audience: "{upstream.audience}", scope: payments.read}}
    allow: [{{callers: [test-suite]}}]
  - name: kept
    path_prefix: /keep/
    strip_prefix: false
    upstream: {upstream.origin}/base
    credential: {{issuer: test-idp, audience: "{upstream.audience}", scope: payments.read}}
    allow: [{{callers: [test-suite]}}]
"""
    proc = credproxy(_proxy_config(idp, upstream, extra_route=extra))
    async with client.get(proc.url + "/x/y", headers={"Host": "payments.local:15001"}) as response:
        assert (await response.json())["path"] == "/x/y"
    async with client.get(proc.url + "/keep/z") as response:
        assert (await response.json())["path"] == "/base/keep/z"
    async with client.get(proc.url + "/nowhere") as response:
        problem = await response.json()
        LEDGER.output("problem body", json.dumps(problem))
        assert response.status == 404
        assert response.content_type == "application/problem+json"
        assert problem["code"] == "route_not_found" and problem["type"].endswith("route_not_found")


async def test_connect_and_absolute_form_are_refused(idp, upstream, credproxy):
    """CONNECT and absolute-form targets get clear problem answers, not a tunnel or an open proxy."""
    proc = credproxy(_proxy_config(idp, upstream))
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    for request_line, status, code in [
        ("CONNECT example.com:443 HTTP/1.1", 405, "method_not_allowed"),
        ("GET http://example.com/payments/x HTTP/1.1", 403, "destination_not_allowed"),
    ]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"{request_line}\r\nHost: example.com\r\nConnection: close\r\n\r\n".encode())
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}".encode()), head
        assert json.loads(body)["code"] == code


async def test_upstream_unreachable_is_502_problem(idp, upstream, credproxy, client):
    """A refused upstream connection becomes 502 upstream_unreachable, and the proxy keeps serving."""
    from tests.counterparts import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    extra = f"""\
  - name: dead
    path_prefix: /dead/
    upstream: {dead}
    credential: {{issuer: test-idp, audience: "{upstream.audience}", scope: payments.read}}
    allow: [{{callers: [test-suite]}}]
"""
    proc = credproxy(_proxy_config(idp, upstream, extra_route=extra))
    async with client.get(proc.url + "/dead/x") as response:
        problem = await response.json()
        assert response.status == 502 and problem["code"] == "upstream_unreachable"
        assert problem["route"] == "dead"
    async with client.get(proc.url + "/payments/x") as response:
        assert response.status == 200


async def test_unix_socket_listener(idp, upstream, credproxy, tmp_path):
    """The app can reach credproxy over a Unix socket created with the configured mode."""
    import os
    import stat

    socket_path = tmp_path / "app.sock"
    text = (
        _proxy_config(idp, upstream).replace(
            "listen: 127.0.0.1:0", f"listen: [127.0.0.1:0, 'unix:{socket_path}']"
        )
        + "unix_socket_mode: '0600'\n"
    )
    credproxy(text)
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as app:
        async with app.get("http://localhost/payments/v1/charges") as response:
            assert response.status == 200
            assert (await response.json())["authorization_schemes"] == ["DPoP"]


async def test_metrics_and_readiness(idp, upstream, credproxy, client):
    """/readyz is ready with a credential; /metrics counts requests and exposes the token expiry."""
    proc = credproxy(_proxy_config(idp, upstream))
    async with client.get(proc.admin_url + "/readyz") as response:
        assert response.status == 200
        assert (await response.json()) == {
            "ready": True,
            "draining": False,
            "routes_without_credential": [],
        }
    async with client.get(proc.url + "/payments/v1/charges") as response:
        assert response.status == 200
    async with client.get(proc.url + "/missing") as response:
        assert response.status == 404
    async with client.get(proc.admin_url + "/healthz") as response:
        assert response.status == 200
    async with client.get(proc.admin_url + "/metrics") as response:
        metrics = await response.text()
    LEDGER.output("metrics", metrics)
    assert 'credproxy_requests_total{code="200",outcome="proxied",route="payments"} 1.0' in metrics
    assert 'credproxy_requests_total{code="404",outcome="route_not_found",route="-"} 1.0' in metrics
    assert 'credproxy_denied_total{reason="route_not_found"} 1.0' in metrics
    assert 'credproxy_credential_issued_total{issuer="test-idp",outcome="success"} 1.0' in metrics
    expiry = [
        line
        for line in metrics.splitlines()
        if line.startswith("credproxy_credential_expiry_seconds{")
    ]
    assert len(expiry) == 1 and float(expiry[0].split()[-1]) > time.time() + 30
    assert "credproxy_request_duration_seconds_bucket" in metrics
    assert "credproxy_upstream_duration_seconds_count" in metrics

    def access_lines() -> list[dict[str, str]]:
        return [
            json.loads(line) for line in proc.log().splitlines() if '"credproxy.access"' in line
        ]

    wait_until(lambda: len(access_lines()) >= 2, what="two access lines")
    access = access_lines()
    assert [entry["msg"].split(" route=")[0] for entry in access] == [
        "GET /payments/v1/charges",
        "GET /missing",
    ]
    assert "status=200" in access[0]["msg"] and "status=404" in access[1]["msg"]


async def test_readiness_false_while_no_credential(oauth_idp, oauth_upstream, credproxy, client):
    """With the IdP refusing the client, /readyz is 503 naming the route and requests get 503 problem."""
    text = _proxy_config(oauth_idp, oauth_upstream).replace(
        f"client_id: {oauth_idp.CLIENT_ID}", "client_id: unknown-client"
    )
    proc = credproxy(text, expect_ready=False)
    wait_until(lambda: "invalid_client" in proc.log(), what="the IdP's refusal in the log")
    async with client.get(proc.admin_url + "/readyz") as response:
        assert response.status == 503
        assert (await response.json())["routes_without_credential"] == ["payments"]
    async with client.get(proc.url + "/payments/v1/charges") as response:
        problem = await response.json()
        assert response.status == 503 and problem["code"] == "credential_unavailable"
        assert int(response.headers["Retry-After"]) >= 1


def test_unreachable_idp_with_exit_policy_fails_start(idp, upstream, credproxy):
    """on_start_failure: exit makes an unreachable IdP a start failure naming the issuer."""
    from tests.counterparts import free_port

    text = _proxy_config(idp, upstream, top="on_start_failure: exit").replace(
        idp.issuer, f"http://127.0.0.1:{free_port()}"
    )
    proc = credproxy(text, expect_ready=False)
    assert proc.process is not None and proc.process.wait(timeout=30) == 1
    assert "cannot start" in proc.log() and "issuers.test-idp" in proc.log()


def test_missing_key_file_fails_start_naming_the_path(idp, upstream, credproxy, tmp_path):
    """A missing client_key_file stops the start with the config path and the file named."""
    missing = tmp_path / "nope.pem"
    text = _proxy_config(idp, upstream).replace(str(idp.client_key_file), str(missing))
    proc = credproxy(text, expect_ready=False)
    assert proc.process is not None and proc.process.wait(timeout=30) == 1
    assert f"issuers.test-idp.client_key_file: {missing} does not exist" in proc.log()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(idp, upstream, credproxy, signal_name):
    """SIGTERM and SIGINT drain and exit 0."""
    import signal as signals

    proc = credproxy(_proxy_config(idp, upstream))
    assert proc.process is not None
    proc.process.send_signal(getattr(signals, signal_name))
    assert proc.process.wait(timeout=20) == 0
    assert "stopped" in proc.log()


async def test_unexpected_error_is_a_problem_not_a_trace(idp, upstream, client, tmp_path):
    """A bug inside credproxy answers 500 problem+json (internal_error), logs it, and keeps serving."""
    from proxy.audit.trail import Audit
    from proxy.config import loader
    from proxy.lifecycle.server import Server

    text = _proxy_config(idp, upstream).replace("{audit}", str(tmp_path / "audit.jsonl"))
    loaded = loader.parse(text)
    async with Server(loaded, audit=Audit(loaded.audit.file)) as server:
        base = f"http://127.0.0.1:{server.app_addresses[0].port}"
        injector = server.runtime.routes[0].injector

        def broken(outbound, token):
            raise RuntimeError("a bug")

        injector.apply = broken  # type: ignore[method-assign]
        async with client.get(base + "/payments/v1/x") as response:
            body = await response.text()
            assert response.status == 500 and response.content_type == "application/problem+json"
            assert json.loads(body)["code"] == "internal_error" and "Traceback" not in body
            assert "a bug" not in body
        del injector.apply
        async with client.get(base + "/payments/v1/x") as response:
            assert response.status == 200


def test_unwritable_audit_file_fails_start_clearly(idp, upstream, credproxy, tmp_path):
    """An audit file that cannot be opened stops the start with its config path, no traceback."""
    text = _proxy_config(idp, upstream).replace(
        'audit: {file: "{audit}"}', f'audit: {{file: "{tmp_path}/missing/dir/audit.jsonl"}}'
    )
    proc = credproxy(text, expect_ready=False)
    assert proc.process is not None and proc.process.wait(timeout=30) == 1
    assert "audit.file: cannot append to" in proc.log() and "Traceback" not in proc.log()


# -- HTTP_PROXY pointing at credproxy beside a base URL on the same port (issue 18, defect 2) ---

PROXY_ENV = ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy")


def _get_through_proxy(kind: str, url: str, proxy: str) -> tuple[int, bytes]:
    """One GET by a real client that takes its proxy from the environment."""
    import subprocess

    if kind == "requests":
        import requests

        response = requests.get(url, timeout=10)
        return response.status_code, response.content
    if kind == "httpx":
        import httpx

        with httpx.Client(trust_env=True, timeout=10) as http:
            answer = http.get(url)
        return answer.status_code, answer.content
    done = subprocess.run(  # curl honours only the lower-case http_proxy
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", url],
        capture_output=True, timeout=15, check=True,
    )  # fmt: skip
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


@pytest.mark.parametrize("kind", ["requests", "httpx", "curl"])
async def test_http_proxy_beside_a_base_url_on_the_same_port_is_proxied(
    idp, upstream, credproxy, monkeypatch, kind
):
    """With HTTP_PROXY and http_proxy at credproxy and the base URL at credproxy too, the client
    sends the absolute form to credproxy itself: an ordinary request (200), while a foreign
    destination (another host, the upstream's own port) is still destination_not_allowed."""
    from tests.aws_counterparts import Relay

    proc = credproxy(_proxy_config(idp, upstream))
    port = int(proc.url.rsplit(":", 1)[1])
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proc.url)
    monkeypatch.setenv("http_proxy", proc.url)
    url = f"{proc.url}/payments/v1/charges?limit=2"
    status, body = await asyncio.to_thread(_get_through_proxy, kind, url, proc.url)
    assert status == 200, body
    assert json.loads(body)["path"] == "/v1/charges"
    for foreign in ("http://example.com/payments/v1", f"{upstream.origin}/v1/charges"):
        status, body = await asyncio.to_thread(_get_through_proxy, kind, foreign, proc.url)
        assert (status, json.loads(body)["code"]) == (403, "destination_not_allowed"), foreign
    # the same through a recording relay: the client did send the absolute form
    relay = Relay(port)
    try:
        monkeypatch.setenv("HTTP_PROXY", relay.url)
        monkeypatch.setenv("http_proxy", relay.url)
        status, _ = await asyncio.to_thread(_get_through_proxy, kind, url, relay.url)
        assert status == 200
        assert relay.requests[-1].startswith(f"GET {url} HTTP/1.1\r\n".encode())
    finally:
        relay.close()
