"""SPIFFE workload identity end to end, through ``credproxy run``, against a real SPIRE server
and agent (tests/spire.py): JWT-SVIDs as credentials and as the root of the other issuers,
rotation, an agent that goes away and comes back, and what the trail says of SVIDs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from proxy.credentials.jose import b64url
from proxy.demo.spire import TRUST_DOMAIN
from tests.aws_counterparts import REGION, Relay
from tests.counterparts import (
    LEDGER,
    NOBODY,
    PREAMBLE,
    ROOT,
    IdP,
    ResourceServer,
    attack,
    wait_until,
)
from tests.disk import holds, open_regular_files, written_since
from tests.keycloak import Keycloak
from tests.spire import (
    CREDPROXY_ID,
    SPIFFE_CLIENT,
    MTLSUpstream,
    Spire,
    SVIDUpstream,
    SVIDVerifier,
    record_jwt_svid,
    record_svid_keys,
)
from tests.tls import TestCA

WRITE_WITNESS = Path(__file__).with_name("write_witness")  # its sitecustomize.py


def spiffe_config(spire: Spire, upstream: str, *, extra: str = "") -> str:
    return f"""{PREAMBLE}
identity:
  spiffe: {{socket: "{spire.socket_uri}"}}
issuers:
  workload: {{type: spiffe}}
routes:
  - name: svc
    path_prefix: /svc/
    upstream: {upstream}
    credential: {{issuer: workload, inject: jwt_svid}}
    allow: [{{callers: [test-suite]}}]
{extra}
audit: {{file: "{{audit}}"}}
log: {{format: json}}
"""


async def test_jwt_svid_route_sends_a_jwt_svid_for_the_upstream_verified_against_spires_bundle(
    spire, svid_upstream, credproxy, client
):
    """(b) inject: jwt_svid — the upstream verifies the JWT-SVID with SPIRE's published bundle,
    for its own origin as audience, and sees credproxy's SPIFFE ID; the trail names the SVIDs
    by ID, serial and fingerprint, never by key or token."""
    proc = credproxy(spiffe_config(spire, svid_upstream.origin))
    started = time.monotonic()
    async with client.get(proc.url + "/svc/hello") as response:
        body = await response.json()
        assert response.status == 200, body
    first_request_s = time.monotonic() - started
    assert body == {"spiffe_id": CREDPROXY_ID, "path": "/hello"}
    assert svid_upstream.verifier.subjects[-1] == CREDPROXY_ID
    async with client.get(proc.url + "/svc/again") as response:
        assert response.status == 200
    assert svid_upstream.verifier.seen[-1] == svid_upstream.verifier.seen[-2]  # cached
    received = proc.audit("svid.received")
    assert received and received[0]["spiffe_id"] == CREDPROXY_ID
    assert {"serial", "cert_fingerprint", "expires_at"} <= received[0].keys()
    issued = proc.audit("credential.issued")
    assert [(e["issuer"], e["audience"]) for e in issued] == [("workload", svid_upstream.origin)]
    trail = proc.audit_file.read_text() + proc.log()
    assert "PRIVATE KEY" not in trail
    assert svid_upstream.verifier.seen[-1] not in trail
    async with client.get(proc.admin_url + "/metrics") as response:
        metrics = await response.text()
    fetch = {  # the JWT-SVID fetch from the agent, as the token cache timed it
        line.split("{")[0].rsplit("_", 1)[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("credproxy_credential_refresh_duration_seconds_")
        and 'issuer="workload"' in line
        and ("_sum{" in line or "_count{" in line)
    }
    assert fetch["count"] >= 1
    print(
        f"JWT-SVID fetch (at warm-up): {1000 * fetch['sum'] / fetch['count']:.1f} ms; first "
        f"request through a jwt_svid route (JWT-SVID cached): {1000 * first_request_s:.1f} ms"
    )


def _late_route(upstream: SVIDUpstream) -> str:
    return f"""\
  - name: late
    path_prefix: /late/
    upstream: {upstream.origin}
    credential: {{issuer: workload, inject: jwt_svid}}
    allow: [{{callers: [test-suite]}}]
"""


def _metric(metrics: str, name: str, label: str = "") -> list[float]:
    """The values of one metric's samples (those whose labels contain ``label``)."""
    return [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith((name + " ", name + "{")) and label in line
    ]


async def test_concurrent_first_requests_share_one_jwt_svid_fetch(spire, credproxy, client):
    """Single-flight: 30 requests arriving together at a route with no JWT-SVID yet (no warm-up)
    cause one fetch from the agent (one credential.issued, one timed refresh) and all carry the
    same JWT-SVID, which the upstream verifies against SPIRE's bundle."""
    upstream = SVIDUpstream(spire)
    upstream.start()
    try:
        proc = credproxy(spiffe_config(spire, upstream.origin) + "warm_up: false\n")
        assert proc.audit("credential.issued") == []
        started = time.monotonic()
        responses = await asyncio.gather(
            *(client.get(f"{proc.url}/svc/together/{i}") for i in range(30))
        )
        first_s = time.monotonic() - started
        for response in responses:
            assert response.status == 200, await response.text()
            response.release()
        assert len(upstream.verifier.seen) == 30 and upstream.rejected == 0
        assert len(set(upstream.verifier.seen)) == 1
        assert len(proc.audit("credential.issued")) == 1
        async with client.get(proc.admin_url + "/metrics") as response:
            metrics = await response.text()
        name = "credproxy_credential_refresh_duration_seconds"
        assert _metric(metrics, name + "_count", 'issuer="workload"') == [1.0]
        fetch_s = _metric(metrics, name + "_sum", 'issuer="workload"')[0]
        print(
            f"JWT-SVID fetch on first use: {1000 * fetch_s:.1f} ms; 30 concurrent first "
            f"requests answered in {1000 * first_s:.1f} ms"
        )
    finally:
        upstream.stop()


HANG_S = aiohttp.ClientTimeout(total=30)  # a bound on a hang, not a measure of speed


async def test_a_jwt_svid_fetch_waiting_on_a_frozen_agent_blocks_no_other_request(
    spire, svid_upstream, credproxy, client
):
    """Nothing blocks the event loop: with the agent frozen (SIGSTOP), a request whose JWT-SVID
    must be fetched waits on the agent while a route whose JWT-SVID is cached keeps answering
    200; the agent thawed, the waiting request is answered 200 with a JWT-SVID for its own
    upstream."""
    late = SVIDUpstream(spire)
    late.start()
    try:
        socket_uri = f'socket: "{spire.socket_uri}"'
        config = spiffe_config(spire, svid_upstream.origin, extra=_late_route(late))
        proc = credproxy(
            config.replace(socket_uri, socket_uri + ", timeout_s: 120") + "warm_up: false\n"
        )
        async with client.get(proc.url + "/svc/cached") as response:
            assert response.status == 200
        answer = await _late_answer_with_the_agent_frozen(spire, proc, client)
    finally:
        late.stop()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert late.verifier.subjects == [CREDPROXY_ID]


async def _late_answer_with_the_agent_frozen(spire, proc, client) -> bytes:
    """Send GET /late/ with the agent frozen, check that /svc/ answers meanwhile and /late/ does
    not, thaw the agent and return /late/'s answer."""
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    waiting = socket.create_connection((host, int(port)), timeout=60)
    try:
        spire.freeze_agent()
        try:
            head = f"GET /late/x HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
            waiting.sendall(head.encode())
            for i in range(3):  # each answered while the fetch for /late/ waits on the agent
                async with client.get(f"{proc.url}/svc/meanwhile/{i}", timeout=HANG_S) as answer:
                    assert answer.status == 200
            waiting.setblocking(False)
            with pytest.raises(BlockingIOError):
                waiting.recv(1)  # /late/ has no answer yet: its fetch is still waiting
            waiting.settimeout(60)
        finally:
            spire.thaw_agent()
        return await asyncio.to_thread(_read_all, waiting)
    finally:
        waiting.close()


def _read_all(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_the_socket_defaults_to_spiffe_endpoint_socket(
    spire, svid_upstream, credproxy, client, monkeypatch
):
    """With no identity.spiffe in the config, credproxy run takes the Workload API socket from
    SPIFFE_ENDPOINT_SOCKET (the SPIFFE standard's variable) and serves JWT-SVIDs from it."""
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", spire.socket_uri)
    config = spiffe_config(spire, svid_upstream.origin)
    config = config.replace(f'identity:\n  spiffe: {{socket: "{spire.socket_uri}"}}\n', "")
    assert "identity" not in config
    proc = credproxy(config)
    async with client.get(proc.url + "/svc/from-env") as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["spiffe_id"] == CREDPROXY_ID
    assert f"SPIFFE Workload API: {spire.socket_uri}" in proc.log()


async def test_inventory_and_metrics_name_the_svid_its_expiry_and_jwt_authorities(
    spire, svid_upstream, credproxy, client
):
    """Governance: the inventory's identity row names the X.509-SVID credproxy holds (ID,
    serial, fingerprint as audited) and the JWT authorities of the bundles it watches (the key
    IDs SPIRE publishes); credproxy_svid_expiry_seconds is that SVID's expiry."""
    proc = credproxy(spiffe_config(spire, svid_upstream.origin))
    rows = await _inventory(proc)
    identity = next(r for r in rows if r["kind"] == "identity")
    assert identity["spiffe_id"] == CREDPROXY_ID and identity["svid_rooted"] is True
    audited = {e["serial"]: e for e in proc.audit("svid.received") + proc.audit("svid.rotated")}
    assert identity["serial"] in audited
    svid = audited[identity["serial"]]
    assert identity["fingerprint"] == svid["cert_fingerprint"]
    assert identity["expires_at"] == svid["expires_at"]
    published = sorted(k["kid"] for k in spire.jwks()["keys"] if k.get("use") == "jwt-svid")
    assert published and identity["jwt_authorities"] == {f"spiffe://{TRUST_DOMAIN}": published}
    async with client.get(proc.admin_url + "/metrics") as response:
        metrics = await response.text()
    expiry = _metric(metrics, "credproxy_svid_expiry_seconds")
    assert len(expiry) == 1 and expiry[0] in {e["expires_at"] for e in audited.values()}
    assert expiry[0] > time.time()


def test_watch_streams_reconnect_with_jittered_exponential_backoff():
    """After each failure in a row the wait before reopening a watch stream doubles from 0.2 s
    up to backoff_max_s, drawn from the ceiling's upper half (jitter), never zero."""
    from proxy.spiffe.workload_api import reconnect_delay_s

    for failures, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (6, 6.4), (8, 25.6), (9, 30), (99, 30)]:
        delays = [reconnect_delay_s(failures, 30.0) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (failures, min(delays))
        assert len(set(delays)) > 1  # jittered


def _check_config(tmp_path, text: str, env: dict[str, str] | None = None):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        capture_output=True, text=True, cwd=ROOT, check=False,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )  # fmt: skip


SVID_EVERYWHERE = f"""{PREAMBLE}
issuers:
  workload: {{type: spiffe}}
  idp: {{type: token_exchange, issuer_url: "https://idp.example", client_id: c,
         client_auth: jwt_svid, subject_token: jwt_svid}}
  cloud: {{type: aws, role_arn: "arn:aws:iam::123456789012:role/r", region: eu-west-1,
           web_identity: jwt_svid}}
routes:
  - name: svc
    path_prefix: /svc/
    upstream: https://svc.example
    credential: {{issuer: workload, inject: jwt_svid}}
    allow: [{{callers: [test-suite]}}]
"""


def test_check_config_explains_that_svids_need_a_workload_api_socket(tmp_path):
    """Every issuer rooted in an SVID is named when no socket is configured, with what to set;
    SPIFFE_ENDPOINT_SOCKET is the default, and a socket that is not there is a warning."""
    result = _check_config(tmp_path, SVID_EVERYWHERE)
    assert result.returncode == 1
    for where in ("issuers.workload", "issuers.idp", "issuers.cloud"):
        assert f"{where}: needs an SVID from the SPIFFE Workload API" in result.stderr
    assert "identity.spiffe.socket" in result.stderr and "SPIFFE_ENDPOINT_SOCKET" in result.stderr
    missing = tmp_path / "agent.sock"
    result = _check_config(
        tmp_path, SVID_EVERYWHERE, env={"SPIFFE_ENDPOINT_SOCKET": f"unix://{missing}"}
    )
    assert result.returncode == 0, result.stderr
    assert f"SPIFFE_ENDPOINT_SOCKET: {missing} does not exist here" in result.stdout + result.stderr


def test_jwt_svid_goes_only_with_a_spiffe_issuer_and_options_are_checked(tmp_path):
    """inject: jwt_svid with another issuer type, and client_auth jwt_svid with a key file, are
    refused by path."""
    text = f"""{PREAMBLE}
identity: {{spiffe: {{socket: "unix:///run/spire/agent/public/api.sock"}}}}
issuers:
  key: {{type: static, secret_file: /s}}
  idp: {{type: oauth2, issuer_url: "https://idp.example", client_id: c, client_auth: jwt_svid,
         client_key_file: /k}}
routes:
  - name: svc
    path_prefix: /svc/
    upstream: https://svc.example
    credential: {{issuer: key, inject: jwt_svid}}
"""
    result = _check_config(tmp_path, text)
    assert result.returncode == 1
    assert (
        "routes[0].credential.inject: 'jwt_svid' does not go with an issuer of type static"
        in result.stderr
    )
    assert "issuers.idp" in result.stderr and "remove client_key_file" in result.stderr


def _oauth_config(spire: Spire, idp: IdP, server: ResourceServer) -> str:
    return f"""{PREAMBLE}
identity:
  spiffe: {{socket: "{spire.socket_uri}"}}
issuers:
  exchange:
    type: token_exchange
    issuer_url: {idp.issuer}
    client_id: {SPIFFE_CLIENT}
    client_auth: jwt_svid
    client_assertion_type: jwt-spiffe
    subject_token: jwt_svid
  client:
    type: oauth2
    issuer_url: {idp.issuer}
    client_id: {SPIFFE_CLIENT}
    client_auth: jwt_svid
    client_assertion_type: jwt-bearer
routes:
  - name: exchanged
    path_prefix: /exchanged/
    upstream: {server.origin}
    credential: {{issuer: exchange, audience: "{server.audience}", scope: payments.write}}
    allow: [{{callers: [test-suite]}}]
  - name: client
    path_prefix: /client/
    upstream: {server.origin}
    credential: {{issuer: client, audience: "{server.audience}", scope: payments.read}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: json}}
"""


async def test_token_exchange_and_client_auth_rooted_in_jwt_svids(
    spire, spiffe_idp, credproxy, client
):
    """(a) token exchange with a JWT-SVID subject, the client authenticated by a JWT-SVID as the
    OAuth SPIFFE draft's jwt-spiffe assertion; and client_credentials with a JWT-SVID as an RFC
    7523 jwt-bearer assertion: the IdP verifies each against SPIRE's bundle, and the resource
    server accepts the DPoP-bound tokens it issued (200)."""
    idp, server = spiffe_idp
    before = idp.stats()
    proc = credproxy(_oauth_config(spire, idp, server))
    for route in ("exchanged", "client"):
        async with client.get(f"{proc.url}/{route}/api/hello") as response:
            assert response.status == 200, (route, await response.text())
    after = idp.stats()
    assert after["token_exchanges"] == before["token_exchanges"] + 1
    auth = after["spiffe_client_auth"]
    assert auth["jwt-spiffe"] == before["spiffe_client_auth"]["jwt-spiffe"] + 1
    assert auth["jwt-bearer"] == before["spiffe_client_auth"]["jwt-bearer"] + 1
    assert auth["rejected"] == before["spiffe_client_auth"]["rejected"]
    records = idp.records()
    exchange = [r for r in records if r.get("subject_token")][-1]
    subject = SVIDVerifier(spire, idp.issuer).verify("Bearer " + exchange["subject_token"])
    assert subject == CREDPROXY_ID  # the subject token was a JWT-SVID for the IdP
    issued = {e["issuer"] for e in proc.audit("credential.issued")}
    assert issued == {"exchange", "client"}
    rows = await _inventory(proc)
    rooted = {r["issuer"]: r["svid_rooted"] for r in rows}
    assert rooted == {"spiffe-workload-api": True, "exchange": True, "client": True}


@dataclass
class SpiffeIdP:
    """An IdP that authenticates a client by its JWT-SVID, the SPIRE it trusts, an API it
    serves, and the client whose SPIFFE ID is credproxy's."""

    spire: Spire
    idp: IdP | Keycloak
    upstream: ResourceServer
    client_id: str

    def record_assertions(self, answered: float) -> None:
        """Enter the JWT-SVIDs credproxy presented in the leak ledger. oidc-provider records
        each assertion; Keycloak cannot, so it is the agent's cached JWT-SVID for the realm's
        issuer (credproxy's assertion audience), fetched once the clock is past the second of
        credproxy's answer ``answered``: one minted no later is the one credproxy presented."""
        if isinstance(self.idp, Keycloak):
            wait_until(lambda: int(time.time()) > int(answered), what="the next second")
            claims = record_jwt_svid(self.spire, self.idp.issuer)
            assert claims["iat"] <= int(answered), "the agent minted another JWT-SVID"
        else:
            assert any(record.get("client_assertion") for record in self.idp.records())


@pytest.fixture(params=["oidc-provider", "keycloak"])
def spiffe_oauth_idp(request: pytest.FixtureRequest) -> SpiffeIdP:
    """oidc-provider trusting the session's SPIRE bundle, or Keycloak's federated client
    authentication (feature spiffe): an identity provider of type SPIFFE that reads the bundle
    endpoint of its own SPIRE (``keycloak_spire``), and client orders-spiffe of authenticator
    federated-jwt naming that provider and credproxy's SPIFFE ID."""
    if request.param == "keycloak":
        keycloak = request.getfixturevalue("keycloak")
        return SpiffeIdP(
            request.getfixturevalue("keycloak_spire"),
            keycloak,
            request.getfixturevalue("keycloak_upstream"),
            keycloak.SPIFFE_CLIENT_ID,
        )
    idp, server = request.getfixturevalue("spiffe_idp")
    return SpiffeIdP(request.getfixturevalue("spire"), idp, server, SPIFFE_CLIENT)


def _jwt_svid_client_config(spiffe: SpiffeIdP, client_id: str) -> str:
    server = spiffe.upstream
    return f"""{PREAMBLE}
identity:
  spiffe: {{socket: "{spiffe.spire.socket_uri}"}}
issuers:
  idp:
    type: oauth2
    issuer_url: {spiffe.idp.issuer}
    client_id: {client_id}
    client_auth: jwt_svid
    client_assertion_type: jwt-spiffe
routes:
  - name: payments
    path_prefix: /payments/
    upstream: {server.origin}
    credential: {{issuer: idp, audience: "{server.audience}", scope: payments.write, inject: dpop}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: json}}
"""


async def test_client_credentials_authenticated_by_a_jwt_svid_alone(
    spiffe_oauth_idp, credproxy, client
):
    """client_auth jwt_svid (jwt-spiffe) against oidc-provider and Keycloak: with no key or
    secret of credproxy's, the IdP knows the client by the JWT-SVID's SPIFFE ID, verified
    against SPIRE's bundle (Keycloak: read from SPIRE's bundle endpoint), and the API accepts
    the DPoP-bound token it issues to that client; the same JWT-SVID presented as another
    client gets no token (503, the IdP's refusal logged)."""
    spiffe = spiffe_oauth_idp
    server = spiffe.upstream
    proc = credproxy(_jwt_svid_client_config(spiffe, spiffe.client_id))
    async with client.get(f"{proc.url}/payments/v1/charges") as response:
        body = await response.json()
    spiffe.record_assertions(time.time())
    assert response.status == 200, body
    assert body["authorization_schemes"] == ["DPoP"] and body["jkt"]
    assert body["client_id"] == spiffe.client_id and body["scope"] == "payments.write"
    assert body["aud"] in (server.audience, [server.audience])
    [issued] = proc.audit("credential.issued")
    assert issued["issuer"] == "idp"
    proc.stop()

    other = _jwt_svid_client_config(spiffe, spiffe.idp.CLIENT_ID)
    proc = credproxy(other, expect_ready=False, name="another-client")
    refused = "issuers.idp: token endpoint "
    wait_until(lambda: refused in proc.log(), what="the IdP's refusal")
    line = next(line for line in proc.log().splitlines() if refused in line)
    print(f"{spiffe.idp.name} JWT-SVID as {spiffe.idp.CLIENT_ID}: {line}")
    assert "answered HTTP 40" in line and ": invalid_" in line, line
    async with client.get(f"{proc.url}/payments/v1/charges") as response:
        problem = await response.json()
    assert response.status == 503 and problem["code"] == "credential_unavailable"


async def test_the_subject_jwt_svid_is_for_subject_audience(spire, spiffe_idp, credproxy, client):
    """subject_audience chooses the subject JWT-SVID's audience: the exchange carries a JWT-SVID
    for it (verified against SPIRE's bundle), and the IdP, which takes only subject tokens for
    itself, refuses it: invalid_grant, and the app gets 503 credential_unavailable."""
    idp, server = spiffe_idp
    elsewhere = "https://elsewhere.example"
    before = len(idp.records())
    proc = credproxy(f"""{PREAMBLE}
identity:
  spiffe: {{socket: "{spire.socket_uri}"}}
issuers:
  exchange:
    type: token_exchange
    issuer_url: {idp.issuer}
    client_id: {SPIFFE_CLIENT}
    client_auth: jwt_svid
    subject_token: jwt_svid
    subject_audience: {elsewhere}
routes:
  - name: exchanged
    path_prefix: /exchanged/
    upstream: {server.origin}
    credential: {{issuer: exchange, audience: "{server.audience}", scope: payments.write}}
    allow: [{{callers: [test-suite]}}]
warm_up: false
audit: {{file: "{{audit}}"}}
log: {{format: json}}
""")
    async with client.get(f"{proc.url}/exchanged/api/hello") as response:
        problem = await response.json(content_type=None)
    assert response.status == 503 and problem["code"] == "credential_unavailable", problem
    exchanges = [r for r in idp.records()[before:] if r.get("subject_token")]
    assert exchanges and all(r["error"] == "invalid_grant" for r in exchanges)
    subject = SVIDVerifier(spire, elsewhere).verify("Bearer " + exchanges[0]["subject_token"])
    assert subject == CREDPROXY_ID


async def _inventory(proc) -> list[dict[str, object]]:
    async with proc.control() as control, control.get("http://localhost/credentials") as answer:
        assert answer.status == 200
        return list((await answer.json())["credentials"])


def test_aws_web_identity_is_a_jwt_svid_for_sts(spire, moto, credproxy):
    """aws web_identity: jwt_svid — AssumeRoleWithWebIdentity carries a JWT-SVID for
    sts.amazonaws.com (verified here against SPIRE's bundle: moto does not verify it), and the
    credentials it returns sign requests moto verifies."""
    relay = Relay(moto.port)
    try:
        proc = credproxy(f"""{PREAMBLE}
identity:
  spiffe: {{socket: "{spire.socket_uri}"}}
issuers:
  aws:
    type: aws
    role_arn: {moto.role_arn}
    web_identity: jwt_svid
    region: {REGION}
    sts_endpoint: {relay.url}
routes:
  - name: s3
    path_prefix: /s3/
    upstream: {moto.url}
    credential: {{issuer: aws, inject: sigv4, service: s3, region: {REGION}}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: json}}
""")
        request = urllib.request.Request(f"{proc.url}/s3/{moto.bucket}?list-type=2")
        with urllib.request.urlopen(request, timeout=20) as response:
            assert response.status == 200
        sent = b"".join(relay.requests).decode(errors="replace")
        token = urllib.parse.parse_qs(sent.split("\r\n\r\n", 1)[1])["WebIdentityToken"][0]
        verifier = SVIDVerifier(spire, "sts.amazonaws.com")
        assert verifier.verify("Bearer " + token) == CREDPROXY_ID
    finally:
        relay.close()


def _count(proc, event: str) -> int:
    """Events of one kind in the audit file so far (a plain count: no wait for the writer)."""
    text = proc.audit_file.read_text() if proc.audit_file.exists() else ""
    return text.count(f'"{event}"')


async def test_svids_rotate_twice_under_steady_traffic_with_no_failed_request(
    spire, svid_upstream, credproxy, client
):
    """(e) With 20 s SVIDs the agent rotates the X.509-SVID twice (audited with the old and new
    serials) and credproxy refreshes the JWT-SVID ahead of expiry (the upstream verifies the new
    one), while requests keep flowing: not one fails."""
    proc = credproxy(spiffe_config(spire, svid_upstream.origin))
    statuses: dict[int, int] = {}
    first = len(svid_upstream.verifier.seen)
    for _ in range(1200):  # bounded in count; the two rotations are the events waited for
        if _count(proc, "svid.rotated") >= 2 and len(set(svid_upstream.verifier.seen[first:])) >= 2:
            break
        async with client.get(proc.url + "/svc/steady") as response:
            statuses[response.status] = statuses.get(response.status, 0) + 1
        await asyncio.sleep(0.05)
        if sum(statuses.values()) % 100 == 0:
            record_svid_keys(spire)
    assert list(statuses) == [200], statuses
    assert len(set(svid_upstream.verifier.seen[first:])) >= 2, "no JWT-SVID refresh seen"
    rotated = proc.audit("svid.rotated")
    assert len({e["serial"] for e in rotated}) == len(rotated) >= 2
    assert all(e["serial"] != e["previous_serial"] for e in rotated)
    assert all(e["spiffe_id"] == CREDPROXY_ID and "key" not in e for e in rotated)
    assert proc.audit("credential.refreshed")  # the JWT-SVID, refreshed ahead of its expiry
    print(f"rotations: {len(rotated)} X.509-SVID, {_count(proc, 'credential.refreshed')} "
          f"JWT-SVID; requests: {sum(statuses.values())}, failed: 0")  # fmt: skip


async def test_agent_gone_serves_while_valid_then_503_and_recovers_without_restart(
    spire, svid_upstream, credproxy, client
):
    """(f) With the agent stopped, requests keep succeeding on the cached JWT-SVID, then get
    503 + Retry-After once it expired and /readyz says the SVID is missing; the agent back,
    credproxy reconnects by itself and serves again. Workload API errors are counted."""
    proc = credproxy(spiffe_config(spire, svid_upstream.origin))
    async with client.get(proc.url + "/svc/before") as response:
        assert response.status == 200
    spire.stop_agent()
    try:
        served = 0
        for _ in range(600):  # bounded in count: the SVID's expiry is the event waited for
            async with client.get(proc.url + "/svc/during") as response:
                if response.status != 200:
                    problem = await response.json(content_type=None)
                    break
                served += 1
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("still served after 600 polls with the agent stopped")
        assert served > 0  # the cached JWT-SVID kept serving
        assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
        assert problem["code"] == "credential_unavailable"
        for _ in range(300):
            async with client.get(proc.admin_url + "/readyz") as ready:
                if (await ready.json())["svid"] == "missing":  # the X.509-SVID expired too
                    assert ready.status == 503
                    break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("/readyz still says the SVID is current after 300 polls")
        assert "the agent is not reachable on that socket" in proc.log()
    finally:
        spire.start_agent()
    for _ in range(300):
        async with client.get(proc.url + "/svc/after") as response:
            if response.status == 200:
                break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("no recovery within 300 polls of the agent's return")
    for _ in range(300):  # the X.509-SVID stream is open again too: ready
        async with client.get(proc.admin_url + "/readyz") as ready:
            if ready.status == 200:
                break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("/readyz not ready within 300 polls of the agent's return")
    async with client.get(proc.admin_url + "/metrics") as response:
        metrics = await response.text()
    assert 'credproxy_workload_api_errors_total{call="FetchJWTSVID",code="UNAVAILABLE"}' in metrics
    assert "credproxy_svid_expiry_seconds" in metrics


def test_a_uid_without_an_entry_gets_nothing_and_no_svid_reaches_the_disk(
    spire, svid_upstream, mtls_upstream, credproxy, tmp_path
):
    """(g) uid 65534 has no registration entry: the agent gives it no identity, and credproxy's
    caller policy refuses it (no JWT-SVID leaves for it). And credproxy never writes SVID
    material, with a JWT-SVID route and a client_cert: svid route (the key handed to OpenSSL)
    in use: no file it could have written since its start holds a key or a JWT-SVID it held,
    the files it has open are its log and audit only, and the only file it opened for writing
    (an audit hook saw every open, rename and copy, so a file written and deleted again would
    show) is its audit file."""
    started = time.time()
    refused = spire.fetch_x509_as(NOBODY)
    assert refused.returncode != 0 and "no identity issued" in refused.stderr
    witness = tmp_path / "writes.tsv"
    python_path = os.pathsep.join(filter(None, [str(WRITE_WITNESS), os.environ.get("PYTHONPATH")]))
    wrap = ("env", f"PYTHONPATH={python_path}", f"CREDPROXY_WRITE_WITNESS={witness}")
    mtls = f"""\
  - name: mtls
    path_prefix: /mtls/
    upstream: {mtls_upstream.origin}
    client_cert: svid
    upstream_spiffe_id: {UPSTREAM_ID}
    credential: {{issuer: workload, inject: jwt_svid}}
    allow: [{{callers: [test-suite]}}]
"""
    proc = credproxy(spiffe_config(spire, svid_upstream.origin, extra=mtls), wrap=wrap)
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    seen_before = len(svid_upstream.verifier.seen)
    answer = attack("get", f"{host}:{port}", "/svc/steal", user=NOBODY)
    assert answer["status"] in (403, None), answer  # refused, or closed at accept
    assert len(svid_upstream.verifier.seen) == seen_before
    keys = record_svid_keys(spire)
    with urllib.request.urlopen(f"{proc.url}/svc/mine", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{proc.url}/mtls/mine", timeout=10) as response:
        assert json.load(response)["client_spiffe_id"] == CREDPROXY_ID  # the SVID was loaded
    keys += record_svid_keys(spire)
    tokens = [t.encode() for t in svid_upstream.verifier.seen]
    pems = [line.encode() for k in keys for line in _pem_lines(k)]
    needles = [*keys, *pems, *tokens]
    assert needles
    regular = open_regular_files(proc.process.pid)
    assert regular <= {str(proc.log_file), str(proc.audit_file), str(witness)}, regular
    assert proc.stop() == 0
    writes = [line.split("\t", 1) for line in witness.read_text().splitlines()]
    assert ["open", str(proc.audit_file)] in writes  # the witness saw credproxy's writes
    # besides the audit file: the key of the audit's fingerprints, created at start (by a
    # temporary file renamed into place), no SVID material
    fingerprint_key = str(proc.audit_file.with_name(".credproxy-fingerprint.key"))
    paths = {path for _, path in writes if not path.startswith("fd:")}
    others = {p for p in paths if p != fingerprint_key and not p.startswith(fingerprint_key + ".")}
    assert others == {str(proc.audit_file)}, writes
    hits = [
        str(path)
        for path in written_since(started, [Path(tempfile.gettempdir()), Path("/var/tmp"),
                                             Path("/dev/shm"), ROOT, Path.home()])
        if spire.agent_dir not in path.parents and holds(path, needles)
    ]  # fmt: skip
    assert hits == []


def _pem_lines(der: bytes) -> list[str]:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_der_private_key(der, password=None)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return [line for line in pem.splitlines() if not line.startswith("-----")]


UPSTREAM_ID = "spiffe://credproxy.test/ns/payments/sa/api"


@pytest.fixture(scope="module")
def mtls_upstream(spire, tmp_path_factory) -> Iterator[MTLSUpstream]:
    upstream = MTLSUpstream(spire, tmp_path_factory.mktemp("mtls"), UPSTREAM_ID, CREDPROXY_ID)
    upstream.start()
    yield upstream
    upstream.stop()


def _mtls_config(spire: Spire, upstream: MTLSUpstream) -> str:
    def route(name: str, options: str) -> str:
        return f"""\
  - name: {name}
    path_prefix: /{name}/
    upstream: {upstream.origin}
    {options}
    credential: {{issuer: workload, inject: jwt_svid}}
    allow: [{{callers: [test-suite]}}]
"""

    mtls = route("mtls", f"client_cert: svid\n    upstream_spiffe_id: {UPSTREAM_ID}")
    other = "spiffe://credproxy.test/ns/payments/sa/other"
    impostor = route("impostor", f"client_cert: svid\n    upstream_spiffe_id: {other}")
    nocert = route("nocert", f"upstream_spiffe_id: {UPSTREAM_ID}")
    return f"""{PREAMBLE}
identity:
  spiffe: {{socket: "{spire.socket_uri}"}}
issuers:
  workload: {{type: spiffe}}
routes:
{mtls}{impostor}{nocert}
audit: {{file: "{{audit}}"}}
log: {{format: json}}
"""


async def test_mtls_with_the_x509_svid_to_an_upstream_authenticated_by_spiffe_id(
    spire, mtls_upstream, credproxy, client
):
    """(c) client_cert: svid — the upstream, which requires a client certificate chained to
    SPIRE's bundle, sees credproxy's SPIFFE ID; the upstream is verified by its own SPIFFE ID
    (upstream_spiffe_id, no hostname); the certificate follows rotation, in memory only: the
    request after an audited rotation presents the new SVID. Without client_cert the same
    upstream refuses the handshake: 502."""
    proc = credproxy(_mtls_config(spire, mtls_upstream))
    async with client.get(proc.url + "/mtls/charge") as response:
        body = await response.json()
        assert response.status == 200, body
    assert body == {"client_spiffe_id": CREDPROXY_ID, "path": "/charge"}
    first = mtls_upstream.serials[-1]
    assert {e["serial"] for e in proc.audit("svid.received")} == {first}
    rotations = _count(proc, "svid.rotated")
    for _ in range(300):  # rotation: the next request, the new SVID
        if _count(proc, "svid.rotated") != rotations:
            break
        async with client.get(proc.url + "/mtls/during") as response:
            assert response.status == 200
        await asyncio.sleep(0.1)  # pace: the agent rotates at half-life, ~10 s
    else:
        raise AssertionError("no rotation within 300 requests")
    async with client.get(proc.url + "/mtls/after") as response:
        assert response.status == 200
    rotated = {e["serial"] for e in proc.audit("svid.rotated")}
    assert mtls_upstream.serials[-1] in rotated and mtls_upstream.serials[-1] != first
    before = len(mtls_upstream.requests)
    async with client.get(proc.url + "/nocert/x") as response:
        problem = await response.json(content_type=None)
    # TLS 1.3: the server's refusal of a missing client certificate arrives after the client's
    # handshake, as an alert in place of the answer: upstream_protocol_error, not _tls_error
    assert response.status == 502, problem
    assert problem["code"] in ("upstream_tls_error", "upstream_protocol_error"), problem
    assert len(mtls_upstream.requests) == before


async def test_an_upstream_with_another_spiffe_id_gets_nothing_502(
    spire, mtls_upstream, credproxy, client
):
    """(d) upstream_spiffe_id names another workload than the one answering: 502
    upstream_tls_error with a detail naming both IDs, and no request reaches it."""
    proc = credproxy(_mtls_config(spire, mtls_upstream))
    before = len(mtls_upstream.requests)
    async with client.get(proc.url + "/impostor/charge", data=b"secret order") as response:
        problem = await response.json(content_type=None)
    assert response.status == 502 and problem["code"] == "upstream_tls_error", problem
    assert len(mtls_upstream.requests) == before
    assert UPSTREAM_ID in proc.log() and "sa/other" in proc.log()


PROTOCOLS = pytest.mark.parametrize(
    ("protocol", "alpn"),
    [("http1.1", ["http/1.1"]), ("h2", ["h2"]), ("auto", ["h2"])],
    ids=["http1.1", "h2", "auto"],
)


@PROTOCOLS
async def test_an_upstream_with_another_spiffe_id_receives_not_one_byte(
    spire, credproxy, client, tmp_path, protocol, alpn
):
    """(d) an impostor with a valid X.509-SVID of SPIRE's trust domain, but not the ID the
    route names, records every byte it receives after the handshake, for each upstream_protocol
    (HTTP/2 by ALPN too). credproxy checks the SPIFFE ID before it sends anything: 502
    upstream_tls_error naming both IDs, and the impostor got no request line, no preface, no
    header, no JWT-SVID."""
    cert, key = spire.mint_x509(UPSTREAM_ID, tmp_path)
    other = "spiffe://credproxy.test/ns/payments/sa/other"
    proc, problem, received = await _impostor(
        spire, credproxy, client, (cert, key), alpn, f"upstream_protocol: {protocol}", other
    )
    assert problem["status"] == 502 and problem["code"] == "upstream_tls_error", problem
    assert received == []
    assert UPSTREAM_ID in proc.log() and "sa/other" in proc.log()


@PROTOCOLS
async def test_the_right_spiffe_id_from_outside_the_trust_bundle_receives_not_one_byte(
    spire, credproxy, client, tmp_path, protocol, alpn
):
    """(d) the SPIFFE ID alone is not trusted: an impostor whose certificate carries exactly
    the ID the route names, issued by a CA outside SPIRE's bundle, fails the chain check: 502
    upstream_tls_error, and it received nothing after the handshake."""
    cert, key = TestCA(tmp_path).issue("api", server=True, stem="forged", uris=(UPSTREAM_ID,))
    proc, problem, received = await _impostor(
        spire, credproxy, client, (cert, key), alpn, f"upstream_protocol: {protocol}", UPSTREAM_ID
    )
    assert problem["status"] == 502 and problem["code"] == "upstream_tls_error", problem
    assert received == []
    assert "certificate verify failed" in proc.log()


async def _impostor(
    spire: Spire,
    credproxy: Any,
    client: aiohttp.ClientSession,
    certificate: tuple[Path, Path],
    alpn: list[str],
    options: str,
    expected_id: str,
) -> tuple[Any, dict[str, Any], list[bytes]]:
    """An upstream presenting ``certificate`` (and requiring a client certificate from SPIRE's
    bundle) that records every byte it receives after its handshake; a route to it with
    client_cert: svid and upstream_spiffe_id ``expected_id``. One request: (credproxy, the
    problem answered, the bytes the impostor received)."""
    import ssl

    bundle = certificate[0].with_name("spire-bundle.pem")
    bundle.write_text(spire.bundle_pem())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(bundle))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(*certificate)
    context.set_alpn_protocols(alpn)
    received: list[bytes] = []
    accepted = 0
    finished = asyncio.Event()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Accepts, shakes hands as the impostor, and keeps every byte that follows."""
        nonlocal accepted
        accepted += 1
        try:
            await writer.start_tls(context)
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                received.append(chunk)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass  # credproxy aborted or failed the handshake, or aborted right after it
        finally:
            writer.close()
            finished.set()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proc = credproxy(f"""{PREAMBLE}
identity:
  spiffe: {{socket: "{spire.socket_uri}"}}
issuers:
  workload: {{type: spiffe}}
routes:
  - name: impostor
    path_prefix: /impostor/
    upstream: https://127.0.0.1:{port}
    {options}
    client_cert: svid
    upstream_spiffe_id: {expected_id}
    credential: {{issuer: workload, inject: jwt_svid}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: json}}
""")
        async with client.get(proc.url + "/impostor/charge", data=b"an order") as response:
            problem = await response.json(content_type=None)
        assert accepted >= 1  # it was reached
        await asyncio.wait_for(finished.wait(), 10)  # and has read all credproxy sent
    finally:
        server.close()
    return proc, problem, received


class CertificateBoundSVIDAPI(MTLSUpstream):
    """An API with an X.509-SVID of its own that requires a client certificate chained to
    SPIRE's bundle and accepts an access token from the IdP only when it is bound (RFC 8705
    ``cnf.x5t#S256``) to the client certificate of this very connection."""

    def __init__(self, spire: Spire, workdir: Path, jwks: dict[str, object]) -> None:
        super().__init__(spire, workdir, UPSTREAM_ID, CREDPROXY_ID)
        self.keys = jwt.PyJWKSet.from_dict(jwks)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            LEDGER.secret(token)
            assert request.transport is not None
            der = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            try:
                kid = jwt.get_unverified_header(token)["kid"]
                key = next(k for k in self.keys.keys if k.key_id == kid)
                claims = jwt.decode(token, key.key, algorithms=["ES256"], audience=self.origin)
            except (jwt.PyJWTError, KeyError, StopIteration) as exc:
                return web.json_response({"error": str(exc)}, status=401)
            if claims.get("cnf", {}).get("x5t#S256") != b64url(hashlib.sha256(der).digest()):
                challenge = 'Bearer error="invalid_token", error_description="not bound here"'
                return web.json_response(
                    {"error": "unbound"}, status=401, headers={"WWW-Authenticate": challenge}
                )
            self.requests.append(str(claims.get("client_id")))
            return web.json_response({"client_id": claims.get("client_id")})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def test_tls_client_auth_with_the_x509_svid_and_certificate_bound_tokens(
    spire, credproxy, client, tmp_path
):
    """oauth2 tls_client_auth with client_cert: svid — the IdP (over TLS) authenticates the
    client by the SPIFFE ID in its X.509-SVID (tls_client_auth_san_uri) and binds the token to
    that certificate; the route presents the same SVID to the API, which accepts the token only
    over that connection."""
    ca = TestCA(tmp_path)
    idp = IdP(tmp_path, tls=ca)
    idp.spiffe_mtls_clients = [("spiffe-mtls", CREDPROXY_ID)]
    idp.spiffe_bundle_pem = spire.bundle_pem()
    public = {k: v for k, v in idp._signing_jwk.items() if k != "d"}
    api = CertificateBoundSVIDAPI(spire, tmp_path / "api", {"keys": [public]})
    idp.add_resource(api.origin, ttl_s=300)
    idp.start()
    api.start()
    try:
        proc = credproxy(f"""{PREAMBLE}
identity:
  spiffe: {{socket: "{spire.socket_uri}"}}
issuers:
  idp:
    type: oauth2
    issuer_url: {idp.issuer}
    ca_file: {ca.ca_file}
    client_id: spiffe-mtls
    client_auth: tls_client_auth
    client_cert: svid
routes:
  - name: api
    path_prefix: /api/
    upstream: {api.origin}
    upstream_spiffe_id: {UPSTREAM_ID}
    credential: {{issuer: idp, audience: "{api.origin}", inject: bearer}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: json}}
""")
        async with client.get(proc.url + "/api/orders") as response:
            body = await response.json()
            assert response.status == 200, body
        assert body == {"client_id": "spiffe-mtls"}
    finally:
        api.stop()
        idp.records()
        idp.stop()


def test_the_spiffe_demo_passes(spire):
    """``credproxy demo --spiffe`` (the README's SPIFFE tour) runs its own SPIRE and passes."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--spiffe"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo passed" in result.stdout and "svid.received" in result.stdout


async def test_each_worker_is_attested_and_serves_jwt_svids(
    spire, svid_upstream, credproxy, client
):
    """With --workers 2, every worker talks to the agent itself (grpc is loaded after the fork)
    and every request through either gets a JWT-SVID the upstream verifies."""
    proc = credproxy(spiffe_config(spire, svid_upstream.origin), args=("--workers", "2"))
    for i in range(20):
        async with aiohttp.ClientSession() as fresh:  # new connections: both workers answer
            async with fresh.get(f"{proc.url}/svc/w{i}") as response:
                assert response.status == 200, await response.text()
    assert proc.log().count("SPIFFE Workload API: unix://") == 2


async def test_without_an_agent_readyz_is_false_and_requests_get_503_with_the_reason_logged(
    credproxy, client, tmp_path
):
    """No agent behind the socket at start: credproxy starts, /readyz stays 503 with the SVID
    missing, a route answers 503 + Retry-After, and the log says the agent is not reachable."""
    socket = tmp_path / "no-agent.sock"
    config = f"""{PREAMBLE}
identity:
  spiffe: {{socket: "unix://{socket}"}}
issuers:
  workload: {{type: spiffe}}
routes:
  - name: svc
    path_prefix: /svc/
    upstream: https://svc.example
    credential: {{issuer: workload, inject: jwt_svid}}
    allow: [{{callers: [test-suite]}}]
"""
    proc = credproxy(config, expect_ready=False)
    async with client.get(proc.admin_url + "/readyz") as ready:
        assert ready.status == 503 and (await ready.json())["svid"] == "missing"
    async with client.get(proc.url + "/svc/x") as response:
        problem = await response.json(content_type=None)
        assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
    assert problem["code"] == "credential_unavailable"
    wait_until(lambda: "the agent is not reachable on that socket" in proc.log(), 10, "log")
