"""The OpenBao issuer against a real ``bao server -dev``: login with the workload's token by JWT
role, a KV v2 field injected as a legacy secret (rotation picked up without restart), the Vault
token renewed, replaced when refused and revoked at SIGTERM, and OpenBao outages ridden out."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from proxy.config import loader
from proxy.config.issuers import OpenBaoIssuerConfig
from proxy.config.model import IdentityConfig
from proxy.credentials.dpop import DPoPKey
from proxy.credentials.issuers import make_issuer
from proxy.credentials.token import CacheKey
from proxy.errors import ConfigError, IssuerError
from tests.counterparts import PREAMBLE, ThreadedApp, wait_until
from tests.openbao import KV_PATH, PKI_CA_NAME, PKI_NAME, ROLE, OpenBao
from tests.tls import TestCA

KEY = CacheKey("bao", None, None, False)
SESSION = CacheKey("bao", None, None, False, "session")
CLIENT_CERT = CacheKey("bao", None, None, False, "client_cert")


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One configured dev server for the module's tests; stopped at the end of the session."""
    server = OpenBao(tmp_path_factory.mktemp("openbao")).start()
    try:
        server.configure()
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _ledger(bao: OpenBao) -> Iterator[None]:
    """After each test, every Vault token OpenBao issued goes to the leak scan's ledger."""
    yield
    bao.record_tokens()


class ApiKeyAPI(ThreadedApp):
    """An API that accepts only ``expected`` as X-Api-Key, and echoes the key it got back in
    its answer (a careless API: the sidecar must scrub it)."""

    def __init__(self) -> None:
        super().__init__()
        self.expected = ""
        self.seen: list[str] = []

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            sent = request.headers.get("X-Api-Key", "")
            self.seen.append(sent)
            if sent != self.expected:
                return web.json_response({"error": "bad key"}, status=401)
            return web.json_response({"ok": True, "echo": sent})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


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
    method (auth/kubernetes/login, the role named), which takes it to the Kubernetes API's
    TokenReview. No Kubernetes API server runs here: the configured API address is a socket
    that records the connection and closes it, which proves OpenBao got as far as checking
    the token there; the refusal that follows is reported with the login path and the role."""
    api = socket.create_server(("127.0.0.1", 0))
    connected = threading.Event()

    def accept_once() -> None:
        connection, _ = api.accept()
        connected.set()
        connection.close()

    threading.Thread(target=accept_once, daemon=True).start()
    try:
        for method, path, body in [
            ("POST", "sys/auth/kubernetes", {"type": "kubernetes"}),
            (
                "POST",
                "auth/kubernetes/config",
                {
                    "kubernetes_host": f"https://127.0.0.1:{api.getsockname()[1]}",
                    "kubernetes_ca_cert": TestCA(tmp_path).ca_file.read_text(),
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
                },
            ),
        ]:
            status, answer = bao.call(method, path, body)
            assert status in (200, 204), f"{path}: {answer}"
        token_file = _token_file(  # the claims a projected service-account token has
            tmp_path,
            bao,
            audience=["openbao"],
            **{"kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "orders"}}},
        )
        async with aiohttp.ClientSession() as session:
            issuer = _issuer(bao, token_file, session, method="kubernetes")
            with pytest.raises(IssuerError) as caught:
                await issuer.fetch(KEY)
    finally:
        api.close()
    assert connected.is_set(), "OpenBao never called the TokenReview API"
    assert str(caught.value).startswith(
        "issuers.bao.auth: OpenBao refused the login at auth/kubernetes/login as role 'orders'"
    ), caught.value


async def test_the_vault_token_is_renewed_ahead_of_its_ttl_and_replaced_when_renewal_is_refused(
    bao, tmp_path
):
    """With a 3 s TTL, a read after 2.2 s renews the token (renew-self, no new login); once
    OpenBao has revoked it, the renewal is refused and the next read logs in again."""
    bao.add_role("orders-short", token_ttl_s=3, token_max_ttl_s=60)
    value = "kv-renewal-" + "5e6f7a8b9c0d1e2f"
    bao.put_secret({"api_key": value})
    before = set(bao.issued_tokens())
    async with aiohttp.ClientSession() as session:
        issuer = _issuer(bao, _token_file(tmp_path, bao), session, role="orders-short")
        assert (await issuer.fetch(KEY)).value.reveal() == value
        await asyncio.sleep(2.2)
        assert (await issuer.fetch(KEY)).value.reveal() == value
        logins = [t for t in bao.issued_tokens() if t not in before]
        assert len(logins) == 1
        assert bao.count("auth/token/renew-self") >= 1
        status, _ = bao.call("POST", "auth/token/revoke", {"token": logins[0]})
        assert status == 204
        await asyncio.sleep(2.5)  # past the renewal point of the renewed token
        renewals = bao.count("auth/token/renew-self")
        assert (await issuer.fetch(KEY)).value.reveal() == value
        assert bao.count("auth/token/renew-self") == renewals + 1  # tried, refused
        logins = [t for t in bao.issued_tokens() if t not in before]
        assert len(logins) == 2
        session = await issuer.fetch(SESSION)
        assert session.value.reveal() == logins[1] and session.token_type == "vault"
        assert await issuer.revoke(await issuer.fetch(KEY)) == "unsupported"
        assert bao.token_alive(logins[1])  # a KV value is not revoked by its reader
        assert await issuer.revoke(session) == "revoked"
    assert not bao.token_alive(logins[1])


async def test_openbao_down_serves_while_valid_then_503_and_recovers_when_back(
    api, credproxy, client, tmp_path
):
    """OpenBao stopped: the last value serves for serve_stale_s, then 503 with Retry-After; a
    new OpenBao on the same address (the dev server's memory is gone: configured again) is
    used without restart, credproxy logging in again since its old Vault token is unknown."""
    own = OpenBao(tmp_path / "own-bao").start()
    try:
        own.configure()
        value = "kv-outage-" + "a9b8c7d6e5f40312"
        own.put_secret({"api_key": value})
        api.expected = value
        text = _config(own, api, _token_file(tmp_path, own), issuer_extra="    serve_stale_s: 4")
        proc = credproxy(text)
        assert (await _get(client, proc.url))[0] == 200
        own.stop()
        assert (await _get(client, proc.url))[0] == 200  # still valid: served from the cache
        for _ in range(50):  # until serve_stale_s (4 s) runs out: polls, not a timed bound
            status, body, retry_after = await _get(client, proc.url)
            if status != 200:
                break
            await asyncio.sleep(0.2)
        assert status == 503 and "credential_unavailable" in body and retry_after
        assert value not in body

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


class PKIUpstream(ThreadedApp):
    """An HTTPS API that requires a client certificate chaining to OpenBao's PKI CA, and
    records the serial number and issuer of the one each request came with."""

    def __init__(self, ca: TestCA, bao_ca_pem: str) -> None:
        context = ca.server_context()
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=bao_ca_pem)
        super().__init__(tls=context)
        self.seen: list[tuple[int, str]] = []

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            tls = request.transport.get_extra_info("ssl_object") if request.transport else None
            der = tls.getpeercert(binary_form=True) if tls else None
            assert der is not None  # CERT_REQUIRED: the handshake failed otherwise
            cert = x509.load_der_x509_certificate(der)
            issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            self.seen.append((cert.serial_number, str(issuer)))
            return web.json_response({"serial": cert.serial_number})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def test_pki_client_certificate_is_presented_renewed_under_traffic_and_revoked_at_sigterm(
    bao, credproxy, client, tmp_path
):
    """A route with ``client_cert: {issuer: …}`` reaches an upstream that requires a client
    certificate from OpenBao's PKI: the key is made in credproxy's memory (pki/sign with a
    CSR), the certificate is renewed ahead of expiry while requests flow (none fails; the
    upstream sees each new serial), every certificate is audited by serial and listed in the
    inventory, and SIGTERM revokes the last one (its serial is on OpenBao's CRL) and the Vault
    token. No private key reaches a log, the audit trail or the app."""
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
    finally:
        upstream.stop()


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
