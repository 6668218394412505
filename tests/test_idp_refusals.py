"""A real IdP refusing credproxy (oidc-provider and Keycloak, their own error bodies): a client
key the IdP does not know, an assertion already expired (the sidecar's clock is behind), a
scope the client may not have, a disabled client. Each leaves the route without a credential —
503 credential_unavailable to the app — and the operator's log names the issuer, the token
endpoint and the IdP's error."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.counterparts import config, ec_private_pem, wait_until

CLOCK_SKEW = Path(__file__).with_name("clock_skew")


def _refused_log_line(proc, idp) -> str:
    """The operator's line for the refusal: issuer, token endpoint, status, the IdP's error."""
    marker = "issuers.test-idp: token endpoint "
    wait_until(lambda: marker in proc.log(), what="the IdP's refusal in the log")
    return str(next(line for line in proc.log().splitlines() if marker in line))


async def _assert_no_credential(proc, client) -> None:
    async with client.get(proc.url + "/payments/v1/charges") as response:
        problem = await response.json()
        assert response.status == 503 and problem["code"] == "credential_unavailable"
        assert "token" not in problem["detail"].lower() or "endpoint" not in problem["detail"]
    async with client.get(proc.admin_url + "/readyz") as response:
        assert response.status == 503


@pytest.mark.parametrize("case", ["unknown key", "expired assertion", "unknown scope"])
async def test_refusal_is_503_and_the_log_names_the_idp_error(
    oauth_idp, oauth_upstream, credproxy, client, tmp_path, case
):
    """The IdP's refusal (its HTTP status, error code and description) is in one log line;
    the app gets 503 credential_unavailable; nothing secret is in either."""
    idp, upstream = oauth_idp, oauth_upstream
    text = config(idp=idp, upstream=upstream.origin, audience=upstream.audience, inject="bearer")
    wrap: tuple[str, ...] = ()
    if case == "unknown key":
        stranger = tmp_path / "stranger.pem"
        stranger.write_bytes(ec_private_pem()[0])
        text = text.replace(str(idp.client_key_file), str(stranger))
    elif case == "expired assertion":  # 10 minutes behind: iat and exp in the past
        wrap = ("env", f"PYTHONPATH={CLOCK_SKEW}", "CREDPROXY_TEST_CLOCK_SKEW_S=-600")
    else:
        text = text.replace("scope: payments.write", "scope: payments.admin")
    proc = credproxy(text, expect_ready=False, wrap=wrap)
    line = _refused_log_line(proc, idp)
    print(f"{idp.name} {case}: {line}")
    expected = "invalid_scope" if case == "unknown scope" else "invalid_client"
    assert "answered HTTP 40" in line and expected in line
    await _assert_no_credential(proc, client)


async def test_disabled_client_is_refused_by_keycloak(
    keycloak, keycloak_upstream, credproxy, client
):
    """A client an administrator disabled in Keycloak: its refusal is logged, the route is 503."""
    text = config(
        idp=keycloak,
        upstream=keycloak_upstream.origin,
        audience=keycloak_upstream.audience,
        inject="bearer",
        client_auth="client_secret",
    ).replace(
        f"client_id: {keycloak.LEGACY_CLIENT_ID}", f"client_id: {keycloak.DISABLED_CLIENT_ID}"
    )
    proc = credproxy(text, expect_ready=False)
    line = _refused_log_line(proc, keycloak)
    print(f"keycloak disabled client: {line}")
    assert "answered HTTP 401: invalid_client" in line
    await _assert_no_credential(proc, client)
