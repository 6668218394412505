"""The OpenBao issuer against a real ``bao server -dev``: login with the workload's token by JWT
role, a KV v2 field injected as a legacy secret (rotation picked up without restart), the Vault
token renewed, replaced when refused and revoked at SIGTERM, and OpenBao outages ridden out."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import loader
from proxy.config.issuers import OpenBaoIssuerConfig
from proxy.config.model import IdentityConfig
from proxy.credentials.dpop import DPoPKey
from proxy.credentials.issuers import make_issuer
from proxy.credentials.token_cache import CacheKey
from proxy.errors import ConfigError, IssuerError
from tests.counterparts import PREAMBLE, ThreadedApp, wait_until
from tests.openbao import KV_PATH, ROLE, OpenBao

KEY = CacheKey("bao", None, None, False)


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
    assert [(e["legacy"], e["version"]) for e in issued] == [(True, version), (True, version + 1)]
    audit_text = proc.audit_file.read_text()
    assert first not in audit_text and second not in audit_text

    vault_tokens = [t for t in bao.issued_tokens() if t not in already]
    assert len(vault_tokens) == 1  # one login, reused for every read
    assert bao.token_alive(vault_tokens[0])

    async with proc.control() as control:  # `credproxy revoke --issuer bao`
        async with control.post("http://localhost/credentials/revoke?issuer=bao") as response:
            assert response.status == 200
            (result,) = (await response.json())["revoked"]
    assert result["outcome"] == "unsupported"  # the KV value itself is its owner's to rotate
    assert not bao.token_alive(vault_tokens[0]), "the control plane's revoke left it alive"
    assert (await _get(client, proc.url))[0] == 200
    wait_until(lambda: len(set(bao.issued_tokens()) - already) == 2, what="a fresh login")
    vault_tokens = [t for t in bao.issued_tokens() if t not in already]

    assert proc.stop() == 0
    assert not bao.token_alive(vault_tokens[1]), "the Vault token outlived the sidecar"
    assert "vault token" in proc.log() and "revoked (revoke)" in proc.log()
    for text in (proc.log(), audit_text, proc.audit_file.read_text()):
        assert not any(token in text for token in vault_tokens)


def _issuer(bao: OpenBao, token_file: Path, session: aiohttp.ClientSession, role: str = ROLE):
    config = OpenBaoIssuerConfig.model_validate(
        {
            "type": "openbao",
            "address": bao.address,
            "auth": {"role": role, "token_file": token_file},
            "secret": {"path": KV_PATH, "field": "api_key"},
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
        await issuer.revoke(await issuer.fetch(KEY))
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


def _parse_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        loader.parse(text)
    return caught.value.errors


def test_check_config_explains_openbao_misconfigurations_by_path():
    """Missing role, an inline Vault token, an address with a path, a path that climbs, and no
    token to log in with are each reported with their config path."""
    errors = _parse_errors(
        PREAMBLE
        + """\
issuers:
  a: {type: openbao, address: "https://bao.example:8200/v1", auth: {role: r, token_file: /t}, secret: {path: p, field: f}}
  b: {type: vault, address: "https://bao.example", token: s.abc, auth: {role: r, token_file: /t}, secret: {path: p, field: f}}
  c: {type: openbao, address: "https://bao.example", auth: {token_file: /t}, secret: {path: "../sys", field: f}}
  d: {type: openbao, address: "https://bao.example", auth: {role: r}, secret: {path: p, field: f}}
  e: {type: openbao, address: "http://bao.example", auth: {role: r, token_file: /t}, secret: {path: p, field: f}}
routes:
  - {name: r, path_prefix: /r/, upstream: "https://api.example", credential: {issuer: a, inject: bearer}}
"""
    )
    text = "\n".join(errors)
    assert "issuers.a" in text and "without /v1" in text
    assert "issuers.b" in text and "never uses a stored Vault token" in text
    assert "issuers.c.openbao.auth.role" in text or "issuers.c.auth.role" in text
    assert "issuers.c" in text and "secret.path" in text
    assert "issuers.d.auth.token_file: needed to log in" in text
    assert "issuers.e" in text and "plain http" in text


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
