"""A misbehaving IdP (issue 9): failures the real oidc-provider does not produce on demand — 500s,
429 with Retry-After, answers past the timeout, malformed JSON, absurd expires_in, a wrong
token_type, a token with a bare CR, a moved token endpoint, a certificate nobody trusts.
credproxy keeps serving while a valid token exists, backs off observably, never piles up
requests, and logs what went wrong."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.counterparts import LEDGER, PREAMBLE, ThreadedApp, wait_until


class FaultyIdP(ThreadedApp):
    """Fault injector: OIDC discovery and a token endpoint answering as ``mode`` says, plus
    ``/api/*``, an API accepting the tokens it issued. Records every token request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = "ok"
        self.expires_in: Any = 60
        self.retry_after = "2"
        self.token_path = "/token"
        self.requests: list[tuple[float, str]] = []  # (time, path) of token requests
        self.in_flight = self.max_in_flight = 0
        self.issued: set[str] = set()

    def app(self) -> web.Application:
        async def discovery(request: web.Request) -> web.Response:
            return web.json_response(
                {"issuer": self.origin, "token_endpoint": self.origin + self.token_path}
            )

        async def token(request: web.Request) -> web.Response:
            self.requests.append((time.monotonic(), request.path))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await self._answer(request)
            finally:
                self.in_flight -= 1

        async def api(request: web.Request) -> web.Response:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in self.issued:
                return web.json_response({"error": "invalid_token"}, status=401)
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_post("/{path:token.*}", token)
        app.router.add_route("*", "/api/{tail:.*}", api)
        return app

    async def _answer(self, request: web.Request) -> web.Response:
        if request.path != self.token_path:
            return web.json_response({"error": "not_found"}, status=404)
        mode = self.mode
        if mode == "500":
            return web.json_response({"error": "server_error"}, status=500)
        if mode == "429":
            headers = {"Retry-After": self.retry_after}
            return web.json_response({"error": "slow_down"}, status=429, headers=headers)
        if mode == "slow":
            await asyncio.sleep(5)
        if mode == "garbage":
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        value = "tok-" + secrets.token_urlsafe(16)
        if mode == "cr_token":  # a bare CR: some parsers end the header line there
            value += "\rX-Forged: 1"
        LEDGER.secret(value)
        self.issued.add(value)
        token_type = "mac" if mode == "wrong_type" else "Bearer"
        body = {"access_token": value, "token_type": token_type, "expires_in": self.expires_in}
        return web.json_response(body)

    def count(self, since: float = 0.0) -> int:
        return len([t for t, _ in self.requests if t >= since])


def _config(idp: FaultyIdP, tmp_path, *, extra: str = "", ca_file: str | None = None) -> str:
    trust = f"    ca_file: {ca_file}\n" if ca_file else ""
    secret = tmp_path / "client-secret"
    secret.write_text("faulty-idp-client-secret\n")
    LEDGER.secret("faulty-idp-client-secret")
    return f"""\
{PREAMBLE}issuers:
  faulty:
    type: oauth2
    issuer_url: {idp.origin}
    client_id: orders
    client_auth: client_secret
    client_secret_file: {secret}
    request_timeout_s: 1
    backoff_max_s: 2
{extra}{trust}routes:
  - name: api
    path_prefix: /api/
    strip_prefix: false
    upstream: {idp.origin}
{trust}    credential: {{issuer: faulty, inject: bearer}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
"""


@pytest.fixture
def faulty():
    idp = FaultyIdP()
    idp.start()
    yield idp
    idp.stop()


async def _metric(client: aiohttp.ClientSession, proc: Any, prefix: str) -> float:
    async with client.get(proc.admin_url + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_failing_idp_valid_token_keeps_serving_with_bounded_single_flight_retries(
    faulty, credproxy, client, tmp_path
):
    """The IdP starts failing (500) right after issuing an 8 s token: requests keep succeeding
    until it expires, then get 503 + Retry-After; retries back off (metric), one at a time
    even under 50 concurrent requests; when the IdP is back, so is the route."""
    faulty.expires_in = 8
    proc = credproxy(_config(faulty, tmp_path, extra="    refresh_ahead_s: 7\n"))
    issued_at = time.monotonic()
    faulty.mode = "500"
    served = 0
    while time.monotonic() - issued_at < 5:
        async with client.get(proc.url + "/api/x") as response:
            assert response.status == 200
            served += 1
        await asyncio.sleep(0.1)
    assert await _metric(client, proc, "credproxy_credential_backoff_seconds{") > 0
    assert (
        await _metric(
            client, proc, 'credproxy_credential_issued_total{issuer="faulty",outcome="failure"}'
        )
        >= 1
    )
    wait_until(lambda: time.monotonic() - issued_at > 8, what="the token's expiry")
    window = time.monotonic()
    answers = await asyncio.gather(*(client.get(proc.url + "/api/x") for _ in range(50)))
    assert {r.status for r in answers} == {503}
    assert all(int(r.headers["Retry-After"]) >= 1 for r in answers)
    for r in answers:
        r.release()
    await asyncio.sleep(2)
    assert faulty.max_in_flight == 1  # single-flight: never two token requests at once
    assert faulty.count(since=window) <= 3  # backoff (≤ 2 s), not one request per app request
    faulty.mode = "ok"
    for _ in range(60):
        async with client.get(proc.url + "/api/x") as response:
            if response.status == 200:
                break
        await asyncio.sleep(0.1)
    assert response.status == 200 and served > 10


async def test_retry_after_from_the_idp_is_honoured(faulty, credproxy, client, tmp_path):
    """429 with Retry-After: 3 — the next token request waits at least that long, although
    the configured backoff (≤ 2 s) would have retried sooner."""
    faulty.mode, faulty.retry_after = "429", "3"
    proc = credproxy(_config(faulty, tmp_path), expect_ready=False)
    wait_until(lambda: faulty.count() >= 2, timeout_s=15, what="two token requests")
    first, second = faulty.requests[0][0], faulty.requests[1][0]
    assert second - first >= 2.9
    assert "HTTP 429: slow_down" in proc.log()


@pytest.mark.parametrize(
    ("mode", "expires_in", "logged"),
    [
        ("garbage", 60, "answered something that is not JSON"),
        ("slow", 60, "did not answer within 1s"),
        ("ok", 0, "unusable expires_in: 0"),
        ("ok", -5, "unusable expires_in: -5"),
        ("ok", "soon", "unusable expires_in: 'soon'"),
        ("wrong_type", 60, "issued token_type 'mac', expected 'Bearer'"),
        ("cr_token", 60, "answered without a usable access_token"),
    ],
)
async def test_malformed_idp_answers_are_refused_clearly(
    faulty, credproxy, client, tmp_path, mode, expires_in, logged
):
    """Each broken answer leaves the route without a credential (503 problem, not ready), is
    logged naming the issuer and what was wrong, and credproxy keeps serving."""
    faulty.mode, faulty.expires_in = mode, expires_in
    proc = credproxy(_config(faulty, tmp_path), expect_ready=False)
    wait_until(lambda: logged in proc.log(), timeout_s=10, what=logged)
    assert "issuers.faulty" in proc.log()
    async with client.get(proc.url + "/api/x") as response:
        assert response.status == 503
        assert (await response.json())["code"] == "credential_unavailable"
    async with client.get(proc.admin_url + "/readyz") as response:
        assert response.status == 503
    faulty.mode, faulty.expires_in = "ok", 60
    wait_until(lambda: faulty.issued, timeout_s=10, what="recovery")


async def test_absurd_lifetime_is_capped(faulty, credproxy, client, tmp_path):
    """expires_in of ten years is treated as max_lifetime_s: refreshed like any short token."""
    faulty.expires_in = 10 * 365 * 86400
    proc = credproxy(_config(faulty, tmp_path, extra="    max_lifetime_s: 600\n"))
    [issued] = proc.audit("credential.issued")
    assert issued["lifetime_s"] == 600
    async with proc.control() as control, control.get("http://localhost/credentials") as response:
        [credential] = (await response.json())["credentials"]
    assert credential["expires_at"] <= time.time() + 600


async def test_moved_token_endpoint_is_rediscovered(faulty, credproxy, client, tmp_path):
    """The discovery document changes its token_endpoint and the old one answers 404: after
    that failure credproxy discovers again and gets its next token from the new endpoint."""
    proc = credproxy(_config(faulty, tmp_path))
    faulty.token_path = "/token-v2"
    async with (
        proc.control() as control,
        control.post("http://localhost/credentials/revoke") as response,
    ):
        assert response.status == 200  # rotates the token: the next one comes from the IdP
    wait_until(lambda: any(p == "/token-v2" for _, p in faulty.requests), what="new endpoint")
    assert [p for _, p in faulty.requests][:2] == ["/token", "/token"]  # the 404 in between
    async with client.get(proc.url + "/api/x") as response:
        assert response.status == 200


async def test_idp_certificate_not_trusted_is_a_clear_tls_error(credproxy, client, tmp_path):
    """An https IdP whose certificate the sidecar does not trust gets no client secret sent:
    the log says TLS failed for that URL; with the right ca_file it works."""
    from tests.tls import TestCA

    ca = TestCA(tmp_path)
    idp = FaultyIdP(tls=ca.server_context())
    idp.start()
    try:
        proc = credproxy(_config(idp, tmp_path), expect_ready=False, name="untrusted")
        wait_until(lambda: "TLS to https://127.0.0.1" in proc.log(), what="the TLS error")
        assert idp.requests == []
        trusted = credproxy(_config(idp, tmp_path, ca_file=str(ca.ca_file)), name="trusted")
        async with client.get(trusted.url + "/api/x") as response:
            assert response.status == 200
        trusted.stop()
    finally:
        idp.stop()
