"""The leak scan (invariant 7). Named to run last: it greps everything credproxy wrote during the
whole session (logs, audit files, metrics, problem bodies) for every credential value the IdP
issued or received and the resource server received: tokens, client assertions, DPoP proofs,
the legacy client secret, SVIDs and their keys, Vault tokens, KV values and PKI keys. Each
kind first drives a full tour of its own, so it is never vacuous."""

from __future__ import annotations

import pytest

from tests.counterparts import LEDGER, config
from tests.raw_upstream import RawUpstream, Request


async def test_no_credential_value_appears_in_any_output(idp, upstream, credproxy, client):
    """Zero hits for any token, assertion, proof or secret across all logs, audits, metrics and error bodies."""
    extra = f"""\
  - name: legacy
    path_prefix: /legacy/
    upstream: {upstream.origin}
    credential: {{issuer: legacy-idp, audience: "{upstream.audience}", scope: payments.read, inject: bearer}}
    allow: [{{callers: [test-suite]}}]
"""
    legacy_issuer = f"""\
  legacy-idp:
    type: oauth2
    issuer_url: {idp.issuer}
    client_id: {idp.LEGACY_CLIENT_ID}
    client_auth: client_secret
    client_secret_file: {idp.client_secret_file}
"""
    proc = credproxy(
        config(
            idp=idp,
            upstream=upstream.origin,
            audience=upstream.audience,
            extra_route=extra,
            extra_issuer=legacy_issuer,
            top="log: {format: text, level: debug}",
        ).replace("log: {format: json}\n", "")
    )
    for path in ("/payments/v1/a", "/legacy/v1/b", "/payments/api/echo-credential", "/nowhere"):
        async with client.get(
            proc.url + path, headers={"Authorization": "Bearer app-junk"}
        ) as response:
            LEDGER.output(f"response {path}", await response.text())
            LEDGER.output(f"response headers {path}", str(dict(response.headers)))
    async with client.get(proc.admin_url + "/metrics") as response:
        LEDGER.output("metrics", await response.text())
    assert proc.stop() == 0

    records = idp.records()
    seen = upstream.seen()
    assert any(r.get("client_assertion") for r in records) and any(r.get("dpop") for r in records)
    assert any(token for token, _ in seen) and any(proof for _, proof in seen)
    assert len(LEDGER.secrets) >= 6 and len(LEDGER.files) >= 2
    assert "credential" in proc.log() and proc.audit("credential.issued")
    hits = LEDGER.hits()
    print(
        f"leak scan: {len(LEDGER.secrets)} credential values × {len(LEDGER.files)} files "
        f"+ {len(LEDGER.texts)} outputs: {len(hits)} hits"
    )
    assert hits == []


async def test_no_svid_or_svid_key_appears_in_any_output(
    spire, svid_upstream, spiffe_idp, credproxy, client
):
    """SVIDs too: the X.509-SVID keys the agent handed credproxy's entry (as the Workload API
    carries them and as PEM), every JWT-SVID the upstream, the IdP (subject tokens, client
    assertions) and STS-like counterparts received appear in no log line (debug level), audit
    event, metric or answer of a run that used them."""
    from tests.spire import SPIFFE_CLIENT, record_svid_keys

    idp, server = spiffe_idp
    proc = credproxy(f"""\
listen: 127.0.0.1:0
admin: 127.0.0.1:0
callers:
  test-suite: {{uid: 0}}
identity:
  spiffe: {{socket: "{spire.socket_uri}"}}
issuers:
  workload: {{type: spiffe}}
  exchange:
    type: token_exchange
    issuer_url: {idp.issuer}
    client_id: {SPIFFE_CLIENT}
    client_auth: jwt_svid
    subject_token: jwt_svid
routes:
  - name: svc
    path_prefix: /svc/
    upstream: {svid_upstream.origin}
    credential: {{issuer: workload, inject: jwt_svid}}
    allow: [{{callers: [test-suite]}}]
  - name: exchanged
    path_prefix: /exchanged/
    upstream: {server.origin}
    credential: {{issuer: exchange, audience: "{server.audience}", scope: payments.read}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: text, level: debug}}
""")
    record_svid_keys(spire)
    for path in ("/svc/a", "/exchanged/api/echo-credential", "/svc/b"):
        async with client.get(proc.url + path) as response:
            LEDGER.output(f"response {path}", await response.text())
            LEDGER.output(f"response headers {path}", str(dict(response.headers)))
    async with client.get(proc.admin_url + "/metrics") as response:
        LEDGER.output("metrics", await response.text())
    async with proc.control() as control, control.get("http://localhost/credentials") as answer:
        LEDGER.output("inventory", await answer.text())
    record_svid_keys(spire)
    assert proc.stop() == 0
    records = idp.records()
    assert any(r.get("subject_token") for r in records)
    assert svid_upstream.verifier.seen and "svid.received" in proc.audit_file.read_text()
    hits = LEDGER.hits()
    print(f"leak scan with SVIDs: {len(LEDGER.secrets)} values: {len(hits)} hits")
    assert hits == []


async def test_no_vault_token_kv_value_or_pki_key_appears_in_any_output(
    bao, credproxy, client, tmp_path
):
    """OpenBao too: every Vault token OpenBao issued (the login's and the one after a control
    revoke), every workload token presented to it, the KV value (sent as a header and as a
    query parameter) and every private key its PKI engine made (pki/issue, for the mTLS
    client certificate) appear in no log line (debug level), audit event, metric, inventory or
    answer of a run that used them all."""
    from tests.openbao import KV_PATH, PKI_NAME, ROLE, ApiKeyAPI, PKIUpstream
    from tests.tls import TestCA

    value = "kv-leak-scan-" + "6d5c4b3a29180f7e"
    bao.put_secret({"api_key": value})
    bao_ca = bao.configure_pki(ttl_s=60)
    api, mtls = ApiKeyAPI(), PKIUpstream(TestCA(tmp_path), bao_ca)
    api.expected = value
    token_file = tmp_path / "workload-token"
    token_file.write_text(bao.workload_token())
    already = set(bao.issued_tokens())
    api.start()
    mtls.start()
    try:
        proc = credproxy(f"""\
listen: 127.0.0.1:0
admin: 127.0.0.1:0
callers:
  test-suite: {{uid: 0}}
identity: {{token_file: {token_file}}}
issuers:
  bao:
    type: openbao
    address: {bao.address}
    auth: {{role: {ROLE}}}
    secret: {{path: {KV_PATH}, field: api_key}}
    pki: {{role: orders, common_name: {PKI_NAME}, key: openbao}}
routes:
  - name: header
    path_prefix: /header/
    upstream: {api.origin}
    credential: {{issuer: bao, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
  - name: query
    path_prefix: /query/
    upstream: {api.origin}
    credential: {{issuer: bao, inject: query, query_param: api_key}}
    allow: [{{callers: [test-suite]}}]
  - name: mtls
    path_prefix: /mtls/
    upstream: {mtls.origin}
    ca_file: {tmp_path / "ca.pem"}
    client_cert: {{issuer: bao}}
    credential: {{issuer: bao, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: text, level: debug}}
""")
        paths = ("/header/v1/a", "/query/v1/b?page=1", "/mtls/v1/c", "/nowhere")
        for round_ in ("first", "after revoke"):
            for path in paths:
                async with client.get(
                    proc.url + path, headers={"Authorization": "Bearer app-junk"}
                ) as response:
                    LEDGER.output(f"response {path} ({round_})", await response.text())
                    LEDGER.output(f"headers {path} ({round_})", str(dict(response.headers)))
            if round_ == "first":
                async with proc.control() as control:
                    url = "http://localhost/credentials/revoke?issuer=bao"
                    async with control.post(url) as answer:
                        LEDGER.output("revoke", await answer.text())
        async with client.get(proc.admin_url + "/metrics") as response:
            LEDGER.output("metrics", await response.text())
        async with proc.control() as control, control.get("http://localhost/credentials") as answer:
            LEDGER.output("inventory", await answer.text())
        assert proc.stop() == 0
    finally:
        api.stop()
        mtls.stop()
    bao.record_tokens()
    vault_tokens = [t for t in bao.issued_tokens() if t not in already]
    keys = bao.issued_private_keys()
    assert len(vault_tokens) >= 2 and set(vault_tokens) <= LEDGER.secrets
    assert value in LEDGER.secrets and api.seen.count(value) >= 4
    assert keys and all(max(k.splitlines(), key=len) in LEDGER.secrets for k in keys)
    assert len(mtls.seen) == 2 and token_file.read_text() in LEDGER.secrets
    hits = LEDGER.hits()
    print(f"leak scan with OpenBao: {len(LEDGER.secrets)} values: {len(hits)} hits")
    assert hits == []


def _status_echo(status: str) -> object:
    """An upstream that echoes the bearer token it received in its status line and a header."""

    def reply(request: Request) -> bytes:
        token = request.values("Authorization")[0].removeprefix("Bearer ")
        LEDGER.secret(token)
        return f"HTTP/1.1 {status} {token}\r\nX-Echo: {token}\r\nContent-Length: 0\r\n\r\n".encode()

    return reply


@pytest.mark.parametrize(("status", "answered"), [("2x0", 502), ("200", 200)])
async def test_a_token_echoed_in_the_status_line_reaches_no_log_and_no_app(
    status, answered, idp, upstream, credproxy, client
):
    """An upstream quoting the bearer token in its status line (unparseable: 502; or as the
    reason phrase) and a header leaves no trace of it in the log, the audit or the answer."""
    echo = RawUpstream(_status_echo(status)).start()  # type: ignore[arg-type]
    try:
        proc = credproxy(
            config(
                idp=idp,
                upstream=echo.origin,
                audience=upstream.audience,  # one the IdP issues for
                inject="bearer",
                client_auth="client_secret",
                top="log: {format: text, level: debug}",
            ).replace("log: {format: json}\n", "")
        )
        async with client.get(proc.url + "/payments/v1/echo") as response:
            answer = f"{response.reason} {dict(response.headers)} {await response.text()}"
            assert response.status == answered
        [request] = echo.requests
    finally:
        echo.stop()
    token = request.values("Authorization")[0].removeprefix("Bearer ")
    assert proc.stop() == 0 and token.startswith("eyJ")
    LEDGER.output(f"status-echo {status} answer", answer)
    assert token not in answer and token not in proc.log()
    assert token not in proc.audit_file.read_text()
    assert ("Bad status line" in proc.log()) == (answered == 502)  # the 502 was logged, bare


def test_the_scan_finds_a_planted_leak():
    """Control: the same scan reports a credential that does appear in an output."""
    planted = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBsYW50ZWQtZm9yLWNvbnRyb2w"
    LEDGER.secret(planted)
    LEDGER.output("control", f"log line with ...{planted.rsplit('.', 1)[1]}")
    try:
        assert len(LEDGER.hits()) == 1
    finally:
        LEDGER.secrets.discard(planted)
        LEDGER.texts.pop()
