"""Revocation (invariant 5, RFC 7009) against the real IdP: on demand from the control plane and
at shutdown; every revocation is an audit event; a failed one never blocks the exit. On demand,
revocation is coalesced and rate-limited per credential, and rotates before it revokes: it never
turns an IdP outage into an app outage (invariant 10)."""

from __future__ import annotations

import asyncio

import pytest

from tests.counterparts import config, idp_and_upstream

REVOKE = "http://localhost/credentials/revoke"


def _opaque_config(idp, upstream, **kwargs):
    """A route whose tokens are opaque: oidc-provider can revoke those, not structured JWTs."""
    return config(
        idp=idp,
        upstream=upstream.origin,
        audience=upstream.opaque_audience,
        inject="bearer",
        **kwargs,
    )


def _issued_since(idp, before: int) -> list[str]:
    return [r["access_token"] for r in idp.records()[before:] if r.get("access_token")]


async def test_control_revoke_revokes_at_the_idp_and_fetches_a_new_token(
    idp, upstream, credproxy, client
):
    """POST /credentials/revoke on the control socket revokes the cached token at the IdP (introspection: inactive) and rotates it."""
    before = len(idp.records())
    proc = credproxy(_opaque_config(idp, upstream))
    [token] = _issued_since(idp, before)
    assert idp.introspect(token)["active"] is True
    async with proc.control() as control, control.post(REVOKE + "?route=payments") as response:
        assert response.status == 200
        [result] = (await response.json())["revoked"]
    assert (result["outcome"], result["answered"]) == ("revoked", "now")
    assert idp.introspect(token)["active"] is False
    revoked = proc.audit("credential.revoked")
    [issued] = proc.audit("credential.issued")  # the token above: fingerprints are keyed
    assert result["fingerprint"] == issued["fingerprint"]
    assert [(e["fingerprint"], e["outcome"], e["reason"]) for e in revoked] == [
        (issued["fingerprint"], "revoked", "control")
    ]
    async with client.get(proc.admin_url + "/readyz") as response:
        assert response.status == 200  # a replacement was fetched at once
    replacement = _issued_since(idp, before)[-1]
    assert replacement != token and idp.introspect(replacement)["active"] is True
    async with client.get(proc.admin_url + "/metrics") as response:
        assert (
            'credproxy_credential_revoked_total{issuer="test-idp",outcome="revoked"} 1.0'
            in await response.text()
        )


async def test_structured_jwt_tokens_are_reported_unsupported(idp, upstream, credproxy, client):
    """oidc-provider cannot revoke JWT access tokens (unsupported_token_type): said, counted and audited."""
    proc = credproxy(config(idp=idp, upstream=upstream.origin, audience=upstream.audience))
    async with proc.control() as control, control.post(REVOKE) as response:
        assert [r["outcome"] for r in (await response.json())["revoked"]] == ["unsupported"]
    assert [e["outcome"] for e in proc.audit("credential.revoked")] == ["unsupported"]


async def test_control_revoke_refuses_browsers_and_unknown_routes(idp, upstream, credproxy, client):
    """A web page cannot trigger revocation (Origin, Sec-Fetch-Site refused); an unknown route is 404; the admin listener has no revoke."""
    proc = credproxy(_opaque_config(idp, upstream))
    async with proc.control() as control:
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            async with control.post(REVOKE, headers=headers) as response:
                assert response.status == 403
                assert (await response.json())["code"] == "browser_request_refused"
        async with control.post(REVOKE + "?route=nope") as response:
            assert response.status == 404
            assert (await response.json())["code"] == "unknown_name"
    async with client.post(proc.admin_url + "/credentials/revoke") as response:
        assert response.status == 404
        assert (await response.json())["code"] == "not_found"
    assert proc.audit("credential.revoked") == []


def test_shutdown_revokes_cached_tokens(idp, upstream, credproxy):
    """SIGTERM revokes the cached token at the IdP before exiting 0."""
    before = len(idp.records())
    proc = credproxy(_opaque_config(idp, upstream))
    [token] = _issued_since(idp, before)
    assert proc.stop() == 0
    assert idp.introspect(token)["active"] is False
    assert [(e["outcome"], e["reason"]) for e in proc.audit("credential.revoked")] == [
        ("revoked", "shutdown")
    ]


def test_failed_revocation_at_shutdown_is_logged_and_the_exit_still_clean(tmp_path, credproxy):
    """With the IdP gone, the revocation fails, is logged and audited as failed, and credproxy exits 0."""
    with idp_and_upstream(tmp_path) as (idp, server):
        proc = credproxy(_opaque_config(idp, server))
        idp.stop()
        assert proc.stop(timeout_s=20) == 0
    assert "revocation of" in proc.log() and "failed" in proc.log()
    assert [e["outcome"] for e in proc.audit("credential.revoked")] == ["failed"]


async def test_30_concurrent_revokes_make_one_token_request_and_one_revocation(
    idp, upstream, credproxy
):
    """30 concurrent revokes of one credential join one rotation: at most one token request and one revocation call reach the IdP, and a revoke soon after is answered 'recent' with no round-trip."""
    proc = credproxy(_opaque_config(idp, upstream))
    before = len(idp.records())
    async with proc.control() as control:

        async def revoke() -> dict[str, str]:
            async with control.post(REVOKE) as response:
                assert response.status == 200
                [result] = (await response.json())["revoked"]
                return dict(result)

        results = await asyncio.gather(*(revoke() for _ in range(30)))
        calls = idp.records()[before:]
        assert sum("access_token" in r for r in calls) == 1  # one replacement
        assert sum("revocation" in r for r in calls) == 1  # one RFC 7009 call
        assert {r["outcome"] for r in results} == {"revoked"}
        assert len({r["fingerprint"] for r in results}) == 1
        # one rotation answers "now"; the others joined it, or (over the 8 connections one uid
        # may hold) came after it and were answered "recent"
        answered = [r["answered"] for r in results]
        assert answered.count("now") == 1 and set(answered) <= {"now", "joined", "recent"}
        later = await revoke()
    assert (later["outcome"], later["answered"]) == ("revoked", "recent")
    assert len(idp.records()) == before + 2  # the recent answer cost nothing at the IdP
    assert len(proc.audit("credential.revoked")) == 1


async def test_revoke_during_idp_outage_keeps_the_app_served_and_revokes_later(
    tmp_path, credproxy, client
):
    """With the IdP down a revoke is deferred: the still-valid token keeps serving the app (200, not 503), the answer, audit and metrics say deferred, and after the IdP returns the old token is revoked with the rotation."""
    with idp_and_upstream(tmp_path) as (idp, server):
        text = config(idp=idp, upstream=server.origin, audience=server.audience)
        proc = credproxy(text.replace("    client_auth:", "    backoff_max_s: 1\n    client_auth:"))
        async with client.get(proc.url + "/payments/api/x") as response:
            assert response.status == 200
        [issued] = proc.audit("credential.issued")
        idp.stop()
        async with proc.control() as control, control.post(REVOKE) as response:
            assert response.status == 200
            [result] = (await response.json())["revoked"]
        assert result["outcome"] == "deferred" and result["fingerprint"] == issued["fingerprint"]
        for _ in range(5):
            async with client.get(proc.url + "/payments/api/x") as response:
                assert response.status == 200  # the IdP outage is not an app outage
        [deferred] = proc.audit("credential.revoked")
        assert (deferred["outcome"], deferred["fingerprint"]) == ("deferred", issued["fingerprint"])
        async with client.get(proc.admin_url + "/metrics") as response:
            metrics = await response.text()
        assert (
            'credproxy_credential_revoked_total{issuer="test-idp",outcome="deferred"} 1.0'
            in metrics
        )
        assert "credproxy_credential_revocations_pending{" in metrics
        idp.start()
        for _ in range(200):  # the rotation retries with backoff; then the deferred revocation
            done = [e for e in proc.audit("credential.revoked") if e.get("deferred")]
            if done:
                break
            await asyncio.sleep(0.1)
        [late] = done
        assert late["fingerprint"] == issued["fingerprint"]
        assert late["outcome"] == "unsupported"  # JWT access tokens: oidc-provider cannot revoke
        async with client.get(proc.url + "/payments/api/x") as response:
            assert response.status == 200


async def _token_in_use(proc, client, upstream) -> str:
    async with client.get(proc.url + "/payments/v1/x") as response:
        assert response.status == 200
    return str(upstream.seen()[-1][0])


@pytest.mark.parametrize("inject", ["bearer", "dpop"])
async def test_revocation_on_demand_and_at_shutdown_as_the_idp_does_it(
    oauth_idp, oauth_upstream, credproxy, client, inject
):
    """The token in use is revoked on demand (control) and its replacement at shutdown; the
    IdP's introspection then says inactive (Keycloak: JWT access tokens; oidc-provider: opaque
    ones, which the resource server introspects too)."""
    idp, upstream = oauth_idp, oauth_upstream
    audience = upstream.introspectable_audience
    proc = credproxy(config(idp=idp, upstream=upstream.origin, audience=audience, inject=inject))
    first = await _token_in_use(proc, client, upstream)
    assert idp.introspect(first)["active"] is True
    async with proc.control() as control, control.post(REVOKE) as response:
        assert response.status == 200
        [result] = (await response.json())["revoked"]
    assert result["outcome"] == "revoked"
    assert idp.introspect(first)["active"] is False
    second = await _token_in_use(proc, client, upstream)
    assert second != first and idp.introspect(second)["active"] is True
    assert proc.stop() == 0
    assert idp.introspect(second)["active"] is False
    assert [(e["outcome"], e["reason"]) for e in proc.audit("credential.revoked")] == [
        ("revoked", "control"),
        ("revoked", "shutdown"),
    ]
