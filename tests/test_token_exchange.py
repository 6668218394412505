"""RFC 8693 token exchange against the real oidc-provider (a registered token-exchange grant that
verifies the subject token with the cluster's key): the identity token file is exchanged for a
DPoP-bound access token, rotation of the file is picked up, a bad or expired one is refused."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from tests.counterparts import config, wait_until


def _exchange_config(idp, upstream, token_file, *, audience=None) -> str:
    return config(
        idp=idp, upstream=upstream.origin, audience=audience or upstream.audience
    ).replace(
        "    type: oauth2\n", f"    type: token_exchange\n    subject_token_file: {token_file}\n", 1
    )


def _subject_tokens_sent(idp, before: int) -> list[str]:
    return [r["subject_token"] for r in idp.records()[before:] if r.get("subject_token")]


async def test_identity_token_is_exchanged_for_a_bound_access_token(
    idp, upstream, credproxy, client, tmp_path
):
    """The projected token is exchanged (not client_credentials) and the result is DPoP-bound and accepted."""
    token_file = tmp_path / "sa-token"
    subject = idp.subject_token()
    token_file.write_text(subject + "\n")
    before_records, before_stats = len(idp.records()), idp.stats()["token_exchanges"]
    proc = credproxy(_exchange_config(idp, upstream, token_file))
    async with client.get(proc.url + "/payments/v1/charges") as response:
        body = await response.json()
    assert response.status == 200 and body["authorization_schemes"] == ["DPoP"] and body["jkt"]
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
    idp, upstream, credproxy, client, tmp_path
):
    """A subject token the IdP cannot verify, or one already expired, yields no credential:
    503 credential_unavailable and not ready."""
    token_file = tmp_path / "sa-token"
    untrusted = idp.subject_token(key=ec.generate_private_key(ec.SECP256R1()))
    expired = idp.subject_token(lifetime_s=-60)
    for name, subject in (("untrusted", untrusted), ("expired", expired)):
        token_file.write_text(subject)
        text = _exchange_config(idp, upstream, token_file)
        proc = credproxy(text, expect_ready=False, name=name)
        wait_until(lambda: "invalid_grant" in proc.log(), what="the IdP's refusal")  # noqa: B023
        async with client.get(proc.url + "/payments/v1/charges") as response:
            problem = await response.json()
            assert response.status == 503 and problem["code"] == "credential_unavailable", name
        async with client.get(proc.admin_url + "/readyz") as response:
            assert response.status == 503, name
        proc.stop()
