"""RFC 8693 token exchange against the real oidc-provider (a registered token-exchange grant that
verifies the subject token with the cluster's key): the identity token file is exchanged for a
DPoP-bound access token, rotation of the file is picked up, a bad or expired one is refused."""

from __future__ import annotations

import jwt

from tests.counterparts import config, wait_until


def _exchange_config(idp, upstream, token_file, *, audience=None) -> str:
    return config(
        idp=idp, upstream=upstream.origin, audience=audience or upstream.exchange_audience
    ).replace(
        "    type: oauth2\n",
        f"    type: token_exchange\n    subject_token_file: {token_file}\n"
        + idp.EXCHANGE_ISSUER_FIELDS,
        1,
    )


def _subject_tokens_sent(idp, before: int) -> list[str]:
    return [r["subject_token"] for r in idp.records()[before:] if r.get("subject_token")]


async def test_identity_token_is_exchanged_for_a_bound_access_token(
    oauth_idp, oauth_upstream, credproxy, client, tmp_path
):
    """The identity token is exchanged (not client_credentials) for a DPoP-bound token for the
    route's audience, which the API accepts."""
    idp, upstream = oauth_idp, oauth_upstream
    token_file = tmp_path / "sa-token"
    subject = idp.subject_token()
    token_file.write_text(subject + "\n")
    records = idp.records()
    before_records = len(records) if records is not None else 0
    before_stats = idp.stats()["token_exchanges"] if records is not None else 0
    proc = credproxy(_exchange_config(idp, upstream, token_file))
    async with client.get(proc.url + "/payments/v1/charges") as response:
        body = await response.json()
    assert response.status == 200 and body["authorization_schemes"] == ["DPoP"] and body["jkt"]
    assert body["aud"] in (upstream.exchange_audience, [upstream.exchange_audience])
    if records is None:  # Keycloak: the exchanged token is the subject's, for orders-service
        subject_claims = jwt.decode(subject, options={"verify_signature": False})
        assert body["sub"] == subject_claims["sub"] and body["client_id"] == idp.CLIENT_ID
        return
    assert idp.stats()["token_exchanges"] - before_stats == 1
    assert _subject_tokens_sent(idp, before_records) == [subject]


async def test_rotated_identity_token_file_is_used_for_the_next_exchange(
    idp, upstream, credproxy, client, tmp_path
):
    """A new token written to the file is what the next exchange sends; no restart."""
    token_file = tmp_path / "sa-token"
    first = idp.subject_token()
    token_file.write_text(first)
    before = len(idp.records())
    credproxy(_exchange_config(idp, upstream, token_file, audience=upstream.short_audience))
    second = idp.subject_token()
    token_file.write_text(second)
    wait_until(
        lambda: second in _subject_tokens_sent(idp, before),
        timeout_s=15,
        what="an exchange with the new token",
    )
    assert _subject_tokens_sent(idp, before)[0] == first


async def test_untrusted_or_expired_identity_token_is_refused(
    oauth_idp, oauth_upstream, credproxy, client, tmp_path
):
    """A subject token the IdP cannot verify, or one no longer valid (expired, revoked), yields
    no credential: 503 credential_unavailable, not ready, and the IdP's refusal in the log."""
    token_file = tmp_path / "sa-token"
    for name, subject in oauth_idp.refused_subject_tokens().items():
        token_file.write_text(subject)
        text = _exchange_config(oauth_idp, oauth_upstream, token_file)
        proc = credproxy(text, expect_ready=False, name=name)
        refused = "token endpoint"
        wait_until(lambda: refused in proc.log(), what="the IdP's refusal")  # noqa: B023
        line = next(line for line in proc.log().splitlines() if refused in line)
        print(f"{oauth_idp.name} {name}: {line}")
        assert "answered HTTP 400: invalid_" in line, line
        async with client.get(proc.url + "/payments/v1/charges") as response:
            problem = await response.json()
            assert response.status == 503 and problem["code"] == "credential_unavailable", name
        async with client.get(proc.admin_url + "/readyz") as response:
            assert response.status == 503, name
        proc.stop()


async def test_projected_token_as_a_jwt_authorization_grant_at_keycloak(
    keycloak, keycloak_upstream, credproxy, client, tmp_path
):
    """grant: jwt_bearer (RFC 7523) against Keycloak's JWT authorization grant: a projected
    service-account token, trusted through the realm's ``kubernetes`` identity provider, gets
    a DPoP-bound token for the workload's user that the API accepts; a forged one gets none."""
    token_file = tmp_path / "sa-token"
    token_file.write_text(keycloak.projected_token())
    # no resource: Keycloak 26.7.3 fails on resource indicators with this grant (HTTP 400 for a
    # NullPointerException); the scope's audience mapper names the API
    text = (
        _exchange_config(keycloak, keycloak_upstream, token_file)
        .replace(keycloak.EXCHANGE_ISSUER_FIELDS, "    grant: jwt_bearer\n")
        .replace(f' audience: "{keycloak_upstream.exchange_audience}",', "")
    )
    proc = credproxy(text)
    async with client.get(proc.url + "/payments/v1/charges") as response:
        body = await response.json()
    assert response.status == 200, body
    assert body["authorization_schemes"] == ["DPoP"] and body["jkt"]
    assert body["aud"] == keycloak.API_CLIENT_ID and body["scope"] == "payments.write"
    proc.stop()
    token_file.write_text(keycloak.projected_token(forged=True))
    proc = credproxy(text, expect_ready=False, name="forged")
    wait_until(lambda: "token endpoint" in proc.log(), what="Keycloak's refusal")
    assert "answered HTTP 400: invalid_grant" in proc.log()
    async with client.get(proc.url + "/payments/v1/charges") as response:
        assert response.status == 503
