from tests.counterparts import config


async def test_request_through_credproxy_reaches_verifying_upstream(
    idp, upstream, credproxy, client
):
    """An app request through credproxy arrives at the resource server with a valid DPoP token."""
    proc = credproxy(config(idp=idp, upstream=upstream.origin, audience=upstream.audience))
    async with client.get(proc.url + "/payments/v1/charges?x=1") as response:
        body = await response.json()
    assert response.status == 200, body
    assert body["authorization_schemes"] == ["DPoP"]
