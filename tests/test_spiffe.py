"""SPIFFE workload identity end to end, through ``credproxy run``, against a real SPIRE server
and agent (tests/spire.py): JWT-SVIDs as credentials and as the root of the other issuers,
rotation, an agent that goes away and comes back, and what the trail says of SVIDs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.counterparts import PREAMBLE, ROOT
from tests.spire import CREDPROXY_ID, Spire, SVIDUpstream

X509_TTL_S = 20  # the agent rotates at half-life: a rotation every ~10 s
JWT_TTL_S = 20


@pytest.fixture(scope="session")
def spire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spire]:
    """One SPIRE server and agent for the session; credproxy's entry: uid 0 (the test suite)."""
    server = Spire(tmp_path_factory.mktemp("spire")).start()
    try:
        server.register(CREDPROXY_ID, uid=0, x509_ttl_s=X509_TTL_S, jwt_ttl_s=JWT_TTL_S)
        server.wait_for_svid(CREDPROXY_ID)
        print(f"SPIRE server and agent ready in {time.monotonic() - server.began:.1f}s")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def svid_upstream(spire: Spire) -> Iterator[SVIDUpstream]:
    upstream = SVIDUpstream(spire)
    upstream.start()
    yield upstream
    upstream.stop()


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
    print(f"first request through a jwt_svid route (SVID fetch included): {first_request_s:.3f}s")


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
