"""The OpenBao issuer against a real ``bao server -dev``: login with the workload's token by JWT
role, a KV v2 field injected as a legacy secret (rotation picked up without restart), the Vault
token renewed, replaced when refused and revoked at SIGTERM, and OpenBao outages ridden out."""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config import loader
from proxy.config.issuers import OpenBaoIssuerConfig
from proxy.config.model import IdentityConfig
from proxy.credentials.dpop import DPoPKey
from proxy.credentials.issuers import make_issuer
from proxy.credentials.token import CacheKey
from proxy.errors import ConfigError, IssuerError
from tests.counterparts import PREAMBLE, ROOT, wait_until
from tests.disk import open_regular_files, read_head, written_since
from tests.openbao import (
    KV_PATH,
    PKI_CA_NAME,
    PKI_NAME,
    ROLE,
    ApiKeyAPI,
    OpenBao,
    PKIUpstream,
    TokenReviewAPI,
    jwt_authorities_pem,
)
from tests.tls import TestCA

KEY = CacheKey("bao", None, None, False)
SESSION = CacheKey("bao", None, None, False, "session")
CLIENT_CERT = CacheKey("bao", None, None, False, "client_cert")


@pytest.fixture(autouse=True)
def _ledger(bao: OpenBao) -> Iterator[None]:
    """After each test, every Vault token OpenBao issued goes to the leak scan's ledger."""
    yield
    bao.record_tokens()


@pytest.fixture
def api() -> Iterator[ApiKeyAPI]:
    server = ApiKeyAPI()
    server.start()
    yield server
    server.stop()


def _token_file(tmp_path: Path, bao: OpenBao, **claims: Any) -> Path:
    path = tmp_path / "workload-token"
    path.write_text(bao.workload_token(**claims))
    path.chmod(0o600)
    return path


def _config(bao: OpenBao, api: ApiKeyAPI, token_file: Path, *, issuer_extra: str = "") -> str:
    return (
        PREAMBLE
        + f"""\
identity: {{token_file: {token_file}}}
issuers:
  bao:
    type: openbao
    address: {bao.address}
    auth: {{role: {ROLE}}}
    secret: {{path: {KV_PATH}, field: api_key}}
    reread_s: 1
    backoff_max_s: 1
{issuer_extra}
routes:
  - name: payments
    path_prefix: /payments/
    upstream: {api.origin}
    credential: {{issuer: bao, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
"""
    )


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[int, str, str | None]:
    async with client.get(url + "/payments/v1/charges") as response:
        return response.status, await response.text(), response.headers.get("Retry-After")


async def test_kv_value_is_injected_rotated_without_restart_and_the_vault_token_revoked_at_sigterm(
    bao, api, credproxy, client, tmp_path
):
    """credproxy logs in by JWT role with the workload token, sends the KV field as X-Api-Key
    (the app's answer scrubbed of it), picks up a new KV version within reread_s, audits both
    as legacy with their KV version and never the value, and revokes its Vault token on
    the control plane's revoke and at SIGTERM (OpenBao's token lookup then fails)."""
    first = "kv-first-" + "a1b2c3d4e5f60718"
    version = bao.put_secret({"api_key": first})
    api.expected = first
    already = set(bao.issued_tokens())
    proc = credproxy(_config(bao, api, _token_file(tmp_path, bao)))

    status, body, _ = await _get(client, proc.url)
    assert status == 200, body
    assert api.seen[-1] == first
    assert first not in body  # the upstream's echo is scrubbed

    second = "kv-second-" + "0f1e2d3c4b5a6978"
    bao.put_secret({"api_key": second})
    api.expected = second
    for _ in range(50):  # the re-read (reread_s) is the event waited for, a few polls apart
        if api.seen[-1] == second:
            break
        await asyncio.sleep(0.2)
        status, body, _ = await _get(client, proc.url)
    assert api.seen[-1] == second, "the new KV version was not picked up"
    assert status == 200 and second not in body

    events = [e for e in proc.audit() if e["event"].startswith("credential.")]
    issued = [e for e in events if e["event"] in ("credential.issued", "credential.refreshed")]
    kv = [(e["legacy"], e["version"]) for e in issued if "kind" not in e]
    assert kv == [(True, version), (True, version + 1)]
    (session,) = [e for e in issued if e.get("kind") == "session"]  # the Vault token, audited
    assert session["expires_at"] > time.time() and session["routes"] == ["payments"]
    audit_text = proc.audit_file.read_text()
    assert first not in audit_text and second not in audit_text

    vault_tokens = [t for t in bao.issued_tokens() if t not in already]
    assert len(vault_tokens) == 1  # one login, reused for every read
    assert bao.token_alive(vault_tokens[0])

    async with proc.control() as control:  # `credproxy revoke --issuer bao`
        async with control.post("http://localhost/credentials/revoke?issuer=bao") as response:
            assert response.status == 200
            results = {r["credential"]: r for r in (await response.json())["revoked"]}
    assert results["-|-|bearer"]["outcome"] == "unsupported"  # the KV value: its owner rotates it
    assert results["session"]["outcome"] == "revoked"
    assert results["session"]["fingerprint"] == session["fingerprint"]
    assert not bao.token_alive(vault_tokens[0]), "the control plane's revoke left it alive"
    assert (await _get(client, proc.url))[0] == 200
    wait_until(lambda: len(set(bao.issued_tokens()) - already) == 2, what="a fresh login")
    vault_tokens = [t for t in bao.issued_tokens() if t not in already]

    assert proc.stop() == 0
    assert not bao.token_alive(vault_tokens[1]), "the Vault token outlived the sidecar"
    revoked = [e for e in proc.audit("credential.revoked") if e.get("kind") == "session"]
    assert [(e["reason"], e["outcome"]) for e in revoked] == [
        ("control", "revoked"),
        ("shutdown", "revoked"),
    ]
    assert "vault token" in proc.log() and "revoked (revoke)" in proc.log()
    for text in (proc.log(), audit_text, proc.audit_file.read_text()):
        assert not any(token in text for token in vault_tokens)


async def test_a_kv_value_with_a_bare_cr_never_reaches_the_upstream(
    bao, api, credproxy, client, tmp_path
):
    """A KV value that would forge a header (a bare CR: some parsers end the line there) is
    refused where it enters: 503 credential_unavailable with Retry-After, the upstream sees no
    request, the log names the field and never the value; a fixed value serves without restart."""
    forged = "kv-forged-9a8b7c6d\rX-Forged: 1"
    bao.put_secret({"api_key": forged})
    proc = credproxy(_config(bao, api, _token_file(tmp_path, bao)), expect_ready=False)
    wait_until(lambda: "holds non-ASCII or control characters" in proc.log(), what="refusal")
    status, body, retry_after = await _get(client, proc.url)
    assert status == 503 and "credential_unavailable" in body and retry_after is not None
    assert api.seen == [] and "X-Forged" not in proc.log()
    fixed = "kv-fixed-1f2e3d4c5b6a"
    bao.put_secret({"api_key": fixed})
    api.expected = fixed
    for _ in range(50):  # the re-read (reread_s) is the event waited for, a few polls apart
        status, body, _ = await _get(client, proc.url)
        if status == 200:
            break
        await asyncio.sleep(0.2)
    assert status == 200 and api.seen[-1] == fixed


def _issuer(
    bao: OpenBao,
    token_file: Path,
    session: aiohttp.ClientSession,
    role: str = ROLE,
    method: str = "jwt",
    **extra: Any,
):
    config = OpenBaoIssuerConfig.model_validate(
        {
            "type": "openbao",
            "address": bao.address,
            "auth": {"method": method, "role": role, "token_file": token_file},
            "secret": {"path": KV_PATH, "field": "api_key"},
            **extra,
        }
    )
    return make_issuer(
        "bao", config, session=session, dpop_key=DPoPKey("ES256"), identity=IdentityConfig()
    )


@pytest.mark.parametrize(
    ("claims", "refusal"),
    [
        ({"audience": "someone-else"}, "invalid audience (aud) claim"),
        ({"subject": "system:serviceaccount:shop:intruder"}, "invalid subject (sub) claim"),
    ],
)
async def test_a_workload_token_for_another_audience_or_subject_is_refused_and_said_so(
    bao, tmp_path, claims, refusal
):
    """OpenBao refuses a token the role is not bound to; the error names the config path,
    the login path, the role and OpenBao's reason."""
    bao.put_secret({"api_key": "kv-refused-" + "99aa88bb77cc66dd"})
    async with aiohttp.ClientSession() as session:
        issuer = _issuer(bao, _token_file(tmp_path, bao, **claims), session)
        with pytest.raises(IssuerError) as caught:
            await issuer.fetch(KEY)
    message = str(caught.value)
    assert message.startswith("issuers.bao.auth: OpenBao refused the login at auth/jwt/login")
    assert f"as role '{ROLE}'" in message and refusal in message and "HTTP 400" in message


async def test_kubernetes_auth_logs_in_at_the_kubernetes_method_with_the_workload_token(
    bao, tmp_path
):
    """``auth.method: kubernetes`` presents the workload token to OpenBao's Kubernetes auth
    method (auth/kubernetes/login, the role named), which has the Kubernetes API review it
    (TokenReview, over TLS verified with the cluster CA): here an API that authenticates only
    the workload's token as service account shop/orders. The login succeeds and the KV value
    is read with the Vault token; a token the API does not authenticate is refused, reported
    with the login path and the role."""
    cluster_ca = TestCA(tmp_path)
    token_file = _token_file(  # the claims a projected service-account token has
        tmp_path,
        bao,
        audience=["openbao"],
        **{
            "kubernetes.io": {
                "namespace": "shop",
                "serviceaccount": {"name": "orders", "uid": TokenReviewAPI.UID},
            }
        },
    )
    api = TokenReviewAPI(cluster_ca, token_file.read_text())
    api.start()
    try:
        for method, path, body in [
            ("POST", "sys/auth/kubernetes", {"type": "kubernetes"}),
            (
                "POST",
                "auth/kubernetes/config",
                {
                    "kubernetes_host": api.origin,
                    "kubernetes_ca_cert": cluster_ca.ca_file.read_text(),
                    "disable_local_ca_jwt": True,
                },
            ),
            (
                "POST",
                "auth/kubernetes/role/orders",
                {
                    "bound_service_account_names": ["orders"],
                    "bound_service_account_namespaces": ["shop"],
                    "token_policies": ["orders-read"],
                    "token_ttl": "60s",
                },
            ),
        ]:
            status, answer = bao.call(method, path, body)
            assert status in (200, 204), f"{path}: {answer}"
        value = "kv-kubernetes-" + "3c4d5e6f708192a3"
        bao.put_secret({"api_key": value})
        async with aiohttp.ClientSession() as session:
            issuer = _issuer(bao, token_file, session, method="kubernetes")
            assert (await issuer.fetch(KEY)).value.reveal() == value
            vault_token = (await issuer.fetch(SESSION)).value.reveal()
            assert vault_token in bao.issued_tokens("kubernetes")
            assert await issuer.revoke(await issuer.fetch(SESSION)) == "revoked"
        assert api.reviewed == [token_file.read_text()]
        assert not bao.token_alive(vault_token)

        stranger = tmp_path / "stranger-token"
        stranger.write_text(
            bao.workload_token(
                audience=["openbao"],
                **{"kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "orders"}}},
            )
        )
        async with aiohttp.ClientSession() as session:
            issuer = _issuer(bao, stranger, session, method="kubernetes")
            with pytest.raises(IssuerError) as caught:
                await issuer.fetch(KEY)
    finally:
        api.stop()
    assert api.reviewed[-1] == stranger.read_text()  # reviewed, and not authenticated
    assert str(caught.value).startswith(
        "issuers.bao.auth: OpenBao refused the login at auth/kubernetes/login as role 'orders'"
    ), caught.value


async def _until_renewal_tried(issuer: Any, bao: OpenBao, renewals: int) -> str:
    """Use the Vault token (fetch the session) until the issuer has tried to renew it once
    more than ``renewals``: a bounded poll for that event, never a fixed sleep. The token value
    then in use."""
    for _ in range(400):
        current: str = (await issuer.fetch(SESSION)).value.reveal()
        if bao.count("auth/token/renew-self") > renewals:
            return current
        await asyncio.sleep(0.025)
    raise AssertionError("the Vault token was never renewed")


async def test_the_vault_token_is_renewed_ahead_of_its_ttl_and_replaced_when_renewal_is_refused(
    bao, tmp_path
):
    """With a 4 s TTL and renew_ahead_s 3 (at most half the TTL: renewed once 2 s are left),
    using the token past its renewal point renews it (renew-self, no new login); once OpenBao
    has revoked it, the next renewal is refused and a new login follows. Each step is waited
    for as an event OpenBao records, not after a sleep."""
    bao.add_role("orders-renew", token_ttl_s=4, token_max_ttl_s=60)
    value = "kv-renewal-" + "5e6f7a8b9c0d1e2f"
    bao.put_secret({"api_key": value})
    before = set(bao.issued_tokens())
    async with aiohttp.ClientSession() as session:
        issuer = _issuer(
            bao, _token_file(tmp_path, bao), session, role="orders-renew", renew_ahead_s=3
        )
        started = time.perf_counter()
        first = (await issuer.fetch(SESSION)).value.reveal()  # the login
        login_ms = 1000 * (time.perf_counter() - started)
        assert (await issuer.fetch(KEY)).value.reveal() == value
        renewals = bao.count("auth/token/renew-self")
        assert await _until_renewal_tried(issuer, bao, renewals) == first  # renewed, kept
        assert bao.count("auth/token/renew-self") == renewals + 1
        logins = [t for t in bao.issued_tokens() if t not in before]
        assert logins == [first]

        status, _ = bao.call("POST", "auth/token/revoke", {"token": first})
        assert status == 204
        renewals = bao.count("auth/token/renew-self")
        replaced = await _until_renewal_tried(issuer, bao, renewals)  # refused: logged in anew
        assert replaced != first and bao.count("auth/token/renew-self") == renewals + 1
        logins = [t for t in bao.issued_tokens() if t not in before]
        assert logins == [first, replaced]
        assert (await issuer.fetch(KEY)).value.reveal() == value
        session_token = await issuer.fetch(SESSION)
        assert session_token.value.reveal() == replaced and session_token.token_type == "vault"
        assert await issuer.revoke(await issuer.fetch(KEY)) == "unsupported"
        assert bao.token_alive(replaced)  # a KV value is not revoked by its reader
        assert await issuer.revoke(session_token) == "revoked"
    assert not bao.token_alive(replaced)
    print(f"OpenBao JWT login (workload token file, in process): {login_ms:.1f} ms")


def _metric(metrics: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    for line in metrics.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and all(w in sample for w in wanted):
            total += float(value)
    return total


async def _metrics(client: aiohttp.ClientSession, proc: Any) -> str:
    async with client.get(proc.admin_url + "/metrics") as response:
        return await response.text()


async def test_openbao_down_serves_while_valid_then_503_and_recovers_when_back(
    api, credproxy, client, tmp_path
):
    """OpenBao stopped: the last value serves for serve_stale_s, then 503 with Retry-After; the
    failed reads and renewals are counted (credential_issued_total, outcome failure) and the
    retry delay is a gauge; a new OpenBao on the same address (the dev server's memory is
    gone: configured again) is used without restart, credproxy logging in again since its old
    Vault token is unknown, and the gauges say healthy again."""
    own = OpenBao(tmp_path / "own-bao").start()
    try:
        own.configure()
        value = "kv-outage-" + "a9b8c7d6e5f40312"
        own.put_secret({"api_key": value})
        api.expected = value
        text = _config(own, api, _token_file(tmp_path, own), issuer_extra="    serve_stale_s: 4")
        proc = credproxy(text)
        assert (await _get(client, proc.url))[0] == 200
        failures_before = _metric(
            await _metrics(client, proc), "credproxy_credential_issued_total", outcome="failure"
        )
        own.stop()
        stopped = time.monotonic()
        assert (await _get(client, proc.url))[0] == 200  # still valid: served from the cache
        served = 1
        for _ in range(100):  # until serve_stale_s (4 s) runs out: polls, not a timed bound
            status, body, retry_after = await _get(client, proc.url)
            if status != 200:
                break
            served += 1
            await asyncio.sleep(0.1)
        served_for_s = time.monotonic() - stopped
        assert status == 503 and "credential_unavailable" in body and retry_after
        assert int(retry_after) >= 1 and value not in body
        metrics = await _metrics(client, proc)
        failed = _metric(
            metrics, "credproxy_credential_issued_total", issuer="bao", outcome="failure"
        )
        assert failed > failures_before, "OpenBao's outage was not counted"
        assert _metric(metrics, "credproxy_credential_backoff_seconds", issuer="bao") > 0
        assert "unreachable" in proc.log()  # the reason, logged (the app gets the problem only)

        own.start()
        own.configure()
        own.put_secret({"api_key": value})
        for _ in range(50):  # recovery is the event waited for
            if (await _get(client, proc.url))[0] == 200:
                break
            await asyncio.sleep(0.3)
        else:
            raise AssertionError(f"not recovered:\n{proc.log()[-2000:]}")
        wait_until(lambda: len(own.issued_tokens()) >= 1, what="a login at the new server")
        metrics = await _metrics(client, proc)
        kv = {"issuer": "bao", "credential": "-|-|bearer"}
        assert _metric(metrics, "credproxy_credential_backoff_seconds", **kv) == 0
        assert _metric(metrics, "credproxy_credential_expiry_seconds", **kv) > time.time()
        print(
            f"OpenBao outage: {served} requests served from the cache over {served_for_s:.1f} s "
            f"(serve_stale_s 4), then 503 with Retry-After {retry_after}; recovered without restart"
        )
    finally:
        own.stop()


async def test_the_vault_token_renewals_are_audited_and_its_expiry_measured(
    bao, api, credproxy, client, tmp_path
):
    """With a 3 s Vault token TTL the session source renews it ahead of expiry (renew-self, no
    new login): each renewal is a ``credential.renewed`` event for the same fingerprint with a
    later expiry, and the expiry gauge follows it."""
    bao.add_role("orders-short", token_ttl_s=3, token_max_ttl_s=60)
    value = "kv-renewed-" + "1c2d3e4f5a6b7c8d"
    bao.put_secret({"api_key": value})
    api.expected = value
    already = set(bao.issued_tokens())
    text = _config(bao, api, _token_file(tmp_path, bao)).replace(
        f"auth: {{role: {ROLE}}}", "auth: {role: orders-short}"
    )
    proc = credproxy(text)
    assert (await _get(client, proc.url))[0] == 200
    wait_until(
        lambda: (
            len([e for e in proc.audit("credential.renewed") if e.get("kind") == "session"]) >= 2
        ),
        what="two renewals of the Vault token",
    )
    (issued,) = [e for e in proc.audit("credential.issued") if e.get("kind") == "session"]
    renewed = [e for e in proc.audit("credential.renewed") if e.get("kind") == "session"]
    assert {e["fingerprint"] for e in renewed} == {issued["fingerprint"]}
    expiries = [issued["expires_at"], *(e["expires_at"] for e in renewed)]
    assert expiries == sorted(expiries) and expiries[-1] > expiries[0]
    assert len([t for t in bao.issued_tokens() if t not in already]) == 1  # renewed, not new
    async with client.get(proc.admin_url + "/metrics") as response:
        metrics = await response.text()
    line = 'credproxy_credential_expiry_seconds{credential="session",issuer="bao"}'
    assert float(metrics.split(line)[1].split()[0]) >= expiries[-1] - 1
    print(f"Vault token (3 s TTL): {len(renewed)} renewals audited, 1 login")


async def test_a_reload_that_replaces_the_issuer_revokes_its_vault_token(
    bao, api, credproxy, client, tmp_path
):
    """SIGHUP with a changed OpenBao issuer: the new issuer logs in anew and the replaced one's
    Vault token is revoked (audited with reason reload), not left to live out its TTL."""
    value = "kv-reload-" + "7a6b5c4d3e2f1a0b"
    bao.put_secret({"api_key": value})
    api.expected = value
    already = set(bao.issued_tokens())
    text = _config(bao, api, _token_file(tmp_path, bao)) + "shutdown_timeout_s: 1\n"
    proc = credproxy(text)
    assert (await _get(client, proc.url))[0] == 200
    (first,) = [t for t in bao.issued_tokens() if t not in already]
    changed = text.replace("reread_s: 1", "reread_s: 2")
    proc.config_file.write_text(changed.replace("{audit}", str(proc.audit_file)))
    proc.process.send_signal(signal.SIGHUP)
    wait_until(lambda: proc.audit("config.reloaded"), what="the reload")
    assert proc.audit("config.reloaded")[0]["outcome"] == "applied"
    wait_until(lambda: not bao.token_alive(first), what="the replaced issuer's token revoked")
    assert (await _get(client, proc.url))[0] == 200
    revoked = [e for e in proc.audit("credential.revoked") if e.get("kind") == "session"]
    assert [(e["reason"], e["outcome"]) for e in revoked] == [("reload", "revoked")]
    assert len([t for t in bao.issued_tokens() if t not in already]) == 2


async def test_pki_client_certificate_is_presented_renewed_under_traffic_and_revoked_at_sigterm(
    bao, credproxy, client, tmp_path
):
    """A route with ``client_cert: {issuer: …}`` reaches an upstream that requires a client
    certificate from OpenBao's PKI: the key is made in credproxy's memory (pki/sign with a
    CSR), the certificate is renewed ahead of expiry while requests flow (none fails; the
    upstream sees each new serial), every certificate is audited by serial and listed in the
    inventory, and SIGTERM revokes the last one (its serial is on OpenBao's CRL) and the Vault
    token. No private key reaches a log, the audit trail or the app, and none reaches the disk:
    credproxy holds no file open but its log and audit, and no file written since it started
    holds the key of any certificate the upstream was shown."""
    bao_ca = bao.configure_pki(ttl_s=6)
    upstream = PKIUpstream(TestCA(tmp_path), bao_ca)
    upstream.start()
    token_file = _token_file(tmp_path, bao)
    already = set(bao.issued_tokens())
    text = f"""{PREAMBLE}identity: {{token_file: {token_file}}}
issuers:
  bao-pki:
    type: openbao
    address: {bao.address}
    auth: {{role: {ROLE}}}
    pki: {{role: orders, common_name: {PKI_NAME}, renew_ahead_s: 3}}
  key: {{type: static, secret_file: {tmp_path / "api-key"}}}
routes:
  - name: ledger
    path_prefix: /ledger/
    upstream: {upstream.origin}
    ca_file: {tmp_path / "ca.pem"}
    client_cert: {{issuer: bao-pki}}
    credential: {{issuer: key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
"""
    (tmp_path / "api-key").write_text("k-5f0e1d2c3b4a6978\n")
    started = time.time()
    try:
        proc = credproxy(text)
        statuses, bodies = [], []
        for _ in range(300):  # steady traffic until three certificates were presented
            async with client.get(proc.url + "/ledger/v1/entries") as response:
                statuses.append(response.status)
                bodies.append(await response.text())
            if len({serial for serial, _ in upstream.seen}) >= 3:
                break
            await asyncio.sleep(0.05)
        serials = list(dict.fromkeys(serial for serial, _ in upstream.seen))
        assert len(serials) >= 3, f"renewals seen by the upstream: {len(serials) - 1}"
        assert set(statuses) == {200}, f"{len(statuses) - statuses.count(200)} requests failed"
        assert {issuer for _, issuer in upstream.seen} == {PKI_CA_NAME}
        print(
            f"PKI: {len(statuses)} requests, {len(serials)} certificates presented "
            f"({len(serials) - 1} renewals), {len(statuses) - statuses.count(200)} failed"
        )
        assert bao.count("pki/sign/orders") >= 3 and bao.count("pki/issue/orders") == 0
        open_files = open_regular_files(proc.process.pid)  # the certificates' memfd is none
        assert open_files <= {str(proc.log_file), str(proc.audit_file)}, open_files

        async with proc.control() as control:
            async with control.get("http://localhost/credentials") as response:
                rows = (await response.json())["credentials"]
        (row,) = [r for r in rows if r["kind"] == "client_cert"]
        assert row["issuer"] == "bao-pki" and row["binding"] == "mtls"
        assert [r["name"] for r in row["routes"]] == ["ledger"] and row["use_count"] >= 3
        assert row["serial"] and row["expires_at"]
        assert {r["kind"] for r in rows if r["issuer"] == "bao-pki"} == {"client_cert", "session"}
        async with client.get(proc.admin_url + "/metrics") as response:
            metrics = await response.text()
        for credential in ("client_cert", "session"):  # the expiry gauges: certificate, token
            line = (
                f'credproxy_credential_expiry_seconds{{credential="{credential}",issuer="bao-pki"}}'
            )
            assert float(metrics.split(line)[1].split()[0]) > time.time(), credential

        assert proc.stop() == 0
        audited = [
            e for e in proc.audit() if e.get("serial") and e["event"].startswith("credential.")
        ]
        issued = [e for e in audited if e["event"] in ("credential.issued", "credential.refreshed")]
        as_int = [int(e["serial"].replace(":", ""), 16) for e in issued]
        assert set(serials) <= set(as_int) and all(e["binding"] == "mtls" for e in issued)
        (revoked,) = [e for e in audited if e["event"] == "credential.revoked"]
        assert revoked["outcome"] == "revoked" and revoked["reason"] == "shutdown"
        last = int(revoked["serial"].replace(":", ""), 16)
        assert last == as_int[-1] and last in bao.revoked_serials()
        vault_tokens = [t for t in bao.issued_tokens() if t not in already]
        assert vault_tokens and not any(bao.token_alive(t) for t in vault_tokens)
        for output in (proc.log(), proc.audit_file.read_text(), *bodies):
            assert "PRIVATE KEY" not in output
        roots = [Path(tempfile.gettempdir()), Path("/var/tmp"), Path("/dev/shm"), ROOT, Path.home()]
        on_disk = [
            p for p in written_since(started, roots) if _holds_key_of(p, upstream.public_keys)
        ]
        assert on_disk == [], "a key of a certificate credproxy presented was written to disk"
    finally:
        upstream.stop()


_PEM_KEY = re.compile(rb"-----BEGIN ((?:EC |RSA )?PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL)


def _holds_key_of(path: Path, public_keys: set[bytes]) -> bool:
    """Whether ``path`` holds a PEM private key whose public half is one of ``public_keys``
    (SubjectPublicKeyInfo DER): the key itself, whatever else the file holds."""
    for match in _PEM_KEY.finditer(read_head(path)):
        try:
            key = serialization.load_pem_private_key(match[0], password=None)
        except (ValueError, TypeError):
            continue
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if public in public_keys:
            return True
    return False


async def test_pki_issue_mode_takes_the_key_openbao_made_and_revokes_by_serial(bao, tmp_path):
    """``key: openbao`` (pki/issue): the certificate comes with the key OpenBao made (checked
    against the certificate; the key enters the leak scan's ledger from OpenBao's audit log),
    and revoking it puts its serial on the CRL."""
    bao.configure_pki(ttl_s=60)
    pki = {"role": "orders", "common_name": PKI_NAME, "key": "openbao", "key_type": "rsa"}
    async with aiohttp.ClientSession() as session:
        issuer = _issuer(bao, _token_file(tmp_path, bao), session, pki=pki)
        token = await issuer.fetch(CLIENT_CERT)
        held = serialization.load_pem_private_key(token.value.reveal().encode(), None)
        (made,) = [
            k
            for k in bao.issued_private_keys()
            if serialization.load_pem_private_key(k.encode(), None).private_numbers()  # type: ignore[union-attr]
            == held.private_numbers()  # type: ignore[union-attr]
        ]
        leaf = x509.load_pem_x509_certificate(token.certificate.encode())
        assert token.serial and int(token.serial.replace(":", ""), 16) == leaf.serial_number
        public = leaf.public_key()
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
        assert 50 < token.lifetime_s <= 60
        assert leaf.serial_number not in bao.revoked_serials()
        assert await issuer.revoke(token) == "revoked"
    assert leaf.serial_number in bao.revoked_serials()
    assert made


def test_the_disk_scan_finds_a_planted_key(tmp_path):
    """Control for the PKI test's disk scan: a PEM key among other text is found by its public
    half, and a key of another certificate is not."""
    from cryptography.hazmat.primitives.asymmetric import ec

    planted, other = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    pem = planted.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "dump").write_bytes(b"noise\n" + pem + b"more noise\n")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    mine = planted.public_key().public_bytes(serialization.Encoding.DER, spki)
    theirs = other.public_key().public_bytes(serialization.Encoding.DER, spki)
    assert _holds_key_of(tmp_path / "dump", {mine})
    assert not _holds_key_of(tmp_path / "dump", {theirs})


async def test_tls_to_openbao_is_verified_with_the_issuers_ca_file_and_an_impostor_gets_nothing(
    tmp_path,
):
    """OpenBao over HTTPS (``-dev-tls``: a certificate from a CA it made): with that CA as the
    issuer's ``ca_file`` the login and the KV read succeed; without it (the system trust store)
    the handshake fails; and an impostor on loopback with a certificate for 127.0.0.1 from
    another CA gets a failed handshake and no request at all (the workload token never leaves).
    Each failure names the issuer and says TLS failed."""
    own = OpenBao(tmp_path / "tls-bao", tls=True).start()
    impostor = ApiKeyAPI(tls=TestCA(tmp_path).server_context())
    impostor.start()
    try:
        own.configure()
        value = "kv-over-tls-" + "0a1b2c3d4e5f6a7b"
        own.put_secret({"api_key": value})
        token_file = _token_file(tmp_path, own)
        assert own.address.startswith("https://")
        async with aiohttp.ClientSession() as session:
            issuer = _issuer(own, token_file, session, ca_file=str(own.ca_file))
            assert (await issuer.fetch(KEY)).value.reveal() == value
            assert len(own.issued_tokens()) == 1
            for address, ca_file in [(own.address, None), (impostor.origin, str(own.ca_file))]:
                issuer = _issuer(own, token_file, session, address=address, ca_file=ca_file)
                with pytest.raises(IssuerError) as caught:
                    await issuer.fetch(KEY)
                message = str(caught.value)
                assert message.startswith(f"issuers.bao: TLS to {address}/v1/auth/jwt/login failed")
                assert "Certificate" in message, message
        assert impostor.seen == [] and len(own.issued_tokens()) == 1
    finally:
        impostor.stop()
        own.stop()


async def test_a_namespace_is_sent_as_x_vault_namespace_and_its_own_secret_is_read(bao, tmp_path):
    """``namespace:``: the login and the KV read go to that OpenBao namespace (its own JWT
    mount, role, policy and KV mount), so the value read is the namespace's; the same issuer
    without ``namespace`` reads the root namespace's value at the same path."""
    namespace = "team-" + secrets.token_hex(3)
    bao.configure(namespace=namespace)
    in_namespace = "kv-namespace-" + secrets.token_hex(8)
    at_root = "kv-root-" + secrets.token_hex(8)
    bao.put_secret({"api_key": in_namespace}, namespace=namespace)
    bao.put_secret({"api_key": at_root})
    token_file = _token_file(tmp_path, bao)
    async with aiohttp.ClientSession() as session:
        issuer = _issuer(bao, token_file, session, namespace=namespace)
        assert (await issuer.fetch(KEY)).value.reveal() == in_namespace
        vault_token = (await issuer.fetch(SESSION)).value.reveal()
        assert vault_token.startswith("s.") and vault_token.endswith(
            "." + bao.call("GET", f"sys/namespaces/{namespace}")[1]["data"]["id"]
        )  # a namespace's token names it
        assert await issuer.revoke(await issuer.fetch(SESSION)) == "revoked"
        assert not bao.token_alive(vault_token)
        issuer = _issuer(bao, token_file, session)
        assert (await issuer.fetch(KEY)).value.reveal() == at_root


async def test_a_kv_value_signs_hmac_http_signatures_and_travels_as_a_query_parameter(
    bao, api, credproxy, client, tmp_path
):
    """The KV field with the other injectors: ``http_signature`` signs each request with it as
    an HMAC-SHA256 key (an independent RFC 9421 verifier holding the value accepts; the value
    itself never travels), and ``query`` sends it as ``api_key`` (the upstream's echo is
    scrubbed from the app's answer); neither the log nor the audit trail holds it."""
    from http_message_signatures import algorithms

    from tests.test_http_signature import SignatureVerifier

    value = "kv-hmac-" + secrets.token_hex(12)
    bao.put_secret({"api_key": value})
    api.expected = value
    verifier = SignatureVerifier(algorithms.HMAC_SHA256)
    verifier.keys["orders-2026"] = value.encode()
    verifier.start()
    try:
        text = _config(bao, api, _token_file(tmp_path, bao)).replace(
            "routes:\n",
            f"""routes:
  - name: signed
    path_prefix: /signed/
    upstream: {verifier.origin}
    credential: {{issuer: bao, inject: http_signature, signature: {{key_id: orders-2026}}}}
    allow: [{{callers: [test-suite]}}]
  - name: query
    path_prefix: /query/
    upstream: {api.origin}
    credential: {{issuer: bao, inject: query, query_param: api_key}}
    allow: [{{callers: [test-suite]}}]
""",
        )
        proc = credproxy(text)
        async with client.post(proc.url + "/signed/v1/orders", data=b'{"n": 1}') as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["keyid"] == "orders-2026"
        assert not any(value in v for v in verifier.accepted[-1].values())
        async with client.get(proc.url + "/query/v1/charges?page=2") as response:
            body = await response.text()
            assert response.status == 200, body
        assert api.seen[-1] == value and value not in body
        assert proc.stop() == 0
        assert value not in proc.log() and value not in proc.audit_file.read_text()
    finally:
        verifier.stop()


async def test_login_with_a_jwt_svid_from_spire_and_a_wrong_audience_is_refused_clearly(
    bao, spire, api, credproxy, client, tmp_path
):
    """``auth: {identity: jwt_svid}``: with no token file anywhere, credproxy fetches a JWT-SVID
    for the role's audience from the SPIRE agent and logs in at a JWT mount that trusts only
    SPIRE's JWT authorities, bound to credproxy's SPIFFE ID; the KV value reaches the upstream
    and not the app. What OpenBao received verifies against SPIRE's bundle as credproxy's
    SPIFFE ID. An issuer asking SPIRE for another audience is refused by OpenBao: the app gets
    503, the log names the config path, the login path, the role and OpenBao's reason."""
    from tests.spire import CREDPROXY_ID, JWT_ISSUER, SVIDVerifier

    bao.add_jwt_mount(
        "jwt-spiffe", pubkeys=jwt_authorities_pem(spire.jwks()), bound_issuer=JWT_ISSUER
    )
    bao.add_role("orders-spiffe", mount="jwt-spiffe", subject=CREDPROXY_ID, audience="openbao")
    value = "kv-svid-" + secrets.token_hex(12)
    bao.put_secret({"api_key": value})
    api.expected = value
    issuer = f"""\
    type: openbao
    address: {bao.address}
    secret: {{path: {KV_PATH}, field: api_key}}
    backoff_max_s: 1"""
    proc = credproxy(
        f"""{PREAMBLE}identity:
  spiffe: {{socket: "{spire.socket_uri}"}}
issuers:
  bao:
{issuer}
    auth: {{mount: jwt-spiffe, role: orders-spiffe, identity: jwt_svid, audience: openbao}}
  elsewhere:
{issuer}
    auth: {{mount: jwt-spiffe, role: orders-spiffe, identity: jwt_svid, audience: someone-else}}
routes:
  - name: payments
    path_prefix: /payments/
    upstream: {api.origin}
    credential: {{issuer: bao, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
  - name: elsewhere
    path_prefix: /elsewhere/
    upstream: {api.origin}
    credential: {{issuer: elsewhere, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
""",
        expect_ready=False,  # one route never gets a credential: /readyz stays 503
    )
    status, body, _ = await _get(client, proc.url)
    assert status == 200, body
    assert api.seen[-1] == value and value not in body
    assert bao.issued_tokens("jwt-spiffe"), "no Vault token from the JWT-SVID login"

    async with client.get(proc.url + "/elsewhere/v1/charges") as response:
        refused = await response.text()
        assert response.status == 503 and "credential_unavailable" in refused
    wait_until(lambda: "issuers.elsewhere.auth: OpenBao refused" in proc.log(), what="the log")
    line = next(x for x in proc.log().splitlines() if "issuers.elsewhere.auth: OpenBao" in x)
    assert "refused the login at auth/jwt-spiffe/login as role 'orders-spiffe'" in line
    assert "invalid audience (aud) claim" in line
    async with proc.control() as control, control.get("http://localhost/credentials") as answer:
        rows = (await answer.json())["credentials"]
    assert {r["issuer"] for r in rows if r["svid_rooted"]} >= {"bao", "elsewhere"}
    assert proc.stop() == 0
    bao.record_tokens()  # the JWT-SVIDs presented, for the leak scan
    presented: dict[str, list[str]] = {"openbao": [], "someone-else": []}
    for svid in bao.presented_jwts("jwt-spiffe"):
        (audience,) = jwt.decode(svid, options={"verify_signature": False})["aud"]
        presented[audience].append(svid)
        assert svid not in proc.log() and svid not in proc.audit_file.read_text()
    for audience, svids in presented.items():  # JWT-SVIDs SPIRE signed, for credproxy's ID
        verifier = SVIDVerifier(spire, audience)
        assert svids and {verifier.verify("Bearer " + svid) for svid in svids} == {CREDPROXY_ID}


def _parse_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        loader.parse(text)
    return caught.value.errors


def test_check_config_explains_openbao_misconfigurations_by_path():
    """Missing role, an inline Vault token, an address with a path, a path that climbs, no
    token to log in with, a PKI-only issuer as a route's credential, a client_cert from an
    issuer without PKI or from no issuer, an issuer serving nothing: each reported with its
    config path."""
    errors = _parse_errors(
        PREAMBLE
        + """\
issuers:
  a: {type: openbao, address: "https://bao.example:8200/v1", auth: {role: r, token_file: /t}, secret: {path: p, field: f}}
  b: {type: vault, address: "https://bao.example", token: s.abc, auth: {role: r, token_file: /t}, secret: {path: p, field: f}}
  c: {type: openbao, address: "https://bao.example", auth: {token_file: /t}, secret: {path: "../sys", field: f}}
  d: {type: openbao, address: "https://bao.example", auth: {role: r}, secret: {path: p, field: f}}
  e: {type: openbao, address: "http://bao.example", auth: {role: r, token_file: /t}, secret: {path: p, field: f}}
  f: {type: openbao, address: "https://bao.example", auth: {role: r, token_file: /t}, pki: {role: o, common_name: o.svc}}
  g: {type: openbao, address: "https://bao.example", auth: {role: r, token_file: /t}}
routes:
  - {name: r, path_prefix: /r/, upstream: "https://api.example", credential: {issuer: a, inject: bearer}}
  - {name: s, path_prefix: /s/, upstream: "https://api.example", credential: {issuer: f, inject: bearer}}
  - {name: t, path_prefix: /t/, upstream: "https://api.example", credential: {issuer: e, inject: bearer}, client_cert: {issuer: e}}
  - {name: u, path_prefix: /u/, upstream: "https://api.example", credential: {issuer: e, inject: bearer}, client_cert: {issuer: nope}}
"""
    )
    text = "\n".join(errors)
    assert "issuers.a" in text and "without /v1" in text
    assert "issuers.b" in text and "never uses a stored Vault token" in text
    assert "issuers.c.openbao.auth.role" in text or "issuers.c.auth.role" in text
    assert "issuers.c" in text and "secret.path" in text
    assert "issuers.d.auth.token_file: needed to log in" in text
    assert "issuers.e" in text and "plain http" in text
    assert "routes[1].credential.issuer: issuers.f has no secret to inject" in text
    assert "routes[2].client_cert.issuer: issuers.e issues no client certificates" in text
    assert "routes[3].client_cert.issuer: 'nope' is not defined under issuers" in text
    assert "issuers.g" in text and "secret: {path, field} and/or pki" in text


def test_check_config_explains_jwt_svid_login_misconfigurations_by_path():
    """``auth.identity: jwt_svid``: with the Kubernetes method, beside a token_file, or an
    audience for a token file, each is an error at its path; a valid one needs no token file
    but a Workload API socket, and says so."""
    errors = _parse_errors(
        PREAMBLE
        + """\
issuers:
  h: {type: openbao, address: "https://bao.example", auth: {role: r, identity: jwt_svid, method: kubernetes}, secret: {path: p, field: f}}
  i: {type: openbao, address: "https://bao.example", auth: {role: r, identity: jwt_svid, token_file: /t}, secret: {path: p, field: f}}
  j: {type: openbao, address: "https://bao.example", auth: {role: r, token_file: /t, audience: openbao}, secret: {path: p, field: f}}
"""
    )
    assert errors == [
        "issuers.h.auth: identity jwt_svid logs in with the JWT auth method (method: jwt); the "
        "Kubernetes method accepts only service-account tokens (TokenReview)",
        "issuers.i.auth: token_file is for identity token_file; identity jwt_svid fetches a "
        "JWT-SVID from the SPIFFE Workload API instead",
        "issuers.j.auth: audience is for identity jwt_svid; a token file's audience is set where "
        "the token is projected",
        "routes: field required",
    ]
    (error,) = _parse_errors(
        PREAMBLE
        + """\
issuers:
  k: {type: openbao, address: "https://bao.example", auth: {role: r, identity: jwt_svid}, secret: {path: p, field: f}}
routes:
  - {name: r, path_prefix: /r/, upstream: "https://api.example", credential: {issuer: k, inject: header, header: X-Api-Key}}
"""
    )
    assert error.startswith("issuers.k: needs an SVID from the SPIFFE Workload API"), error


def test_a_vault_typed_issuer_is_the_openbao_issuer():
    """``type: vault`` is accepted as an alias and builds the same runtime issuer."""
    from proxy.credentials.issuers import ISSUERS
    from proxy.credentials.issuers.openbao import OpenBaoIssuer

    config = loader.parse(
        PREAMBLE
        + """\
identity: {token_file: /var/run/secrets/tokens/credproxy}
issuers:
  v: {type: vault, address: "https://vault.example:8200", namespace: team-a, auth: {role: r}, secret: {path: p, field: f}}
routes:
  - {name: r, path_prefix: /r/, upstream: "https://api.example", credential: {issuer: v, inject: header, header: X-Api-Key}}
"""
    )
    assert ISSUERS[type(config.issuers["v"])] is OpenBaoIssuer
