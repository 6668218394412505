"""Revocation (invariant 5, RFC 7009) against the real IdP: on demand from the admin listener and
at shutdown; every revocation is an audit event; a failed one never blocks the exit."""

from __future__ import annotations

from tests.counterparts import config, idp_and_upstream


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


async def test_admin_revoke_revokes_at_the_idp_and_fetches_a_new_token(
    idp, upstream, credproxy, client
):
    """POST /credentials/revoke revokes the cached token at the IdP (introspection: inactive) and rotates it."""
    before = len(idp.records())
    proc = credproxy(_opaque_config(idp, upstream))
    [token] = _issued_since(idp, before)
    assert idp.introspect(token)["active"] is True
    async with client.post(proc.admin_url + "/credentials/revoke?route=payments") as response:
        assert response.status == 200
        assert (await response.json())["revoked"][0]["outcome"] == "revoked"
    assert idp.introspect(token)["active"] is False
    revoked = proc.audit("credential.revoked")
    [issued] = proc.audit("credential.issued")  # the token above: fingerprints are keyed
    assert [(e["fingerprint"], e["outcome"], e["reason"]) for e in revoked] == [
        (issued["fingerprint"], "revoked", "admin")
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
    async with client.post(proc.admin_url + "/credentials/revoke") as response:
        assert [r["outcome"] for r in (await response.json())["revoked"]] == ["unsupported"]
    assert [e["outcome"] for e in proc.audit("credential.revoked")] == ["unsupported"]


async def test_admin_revoke_refuses_browsers_and_unknown_routes(idp, upstream, credproxy, client):
    """A web page cannot trigger revocation (Origin refused); an unknown route is 404."""
    proc = credproxy(_opaque_config(idp, upstream))
    async with client.post(
        proc.admin_url + "/credentials/revoke", headers={"Origin": "https://evil.example"}
    ) as response:
        assert response.status == 403
    async with client.post(proc.admin_url + "/credentials/revoke?route=nope") as response:
        assert response.status == 404
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
