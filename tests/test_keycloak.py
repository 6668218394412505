"""The suite's Keycloak (tests/keycloak.py) as the issue asks for it: the realm is the compose
example's, started with the same features there, and every test that uses it runs beside the
others in one pytest-xdist worker, so a session starts one Keycloak."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from proxy.demo.spire import TRUST_DOMAIN
from tests.counterparts import ROOT
from tests.keycloak import BUILD_OPTIONS, FEATURES, REALM_FILE, Keycloak
from tests.spire import CREDPROXY_ID

COMPOSE = ROOT / "examples" / "compose"

# Prints each collected test's xdist group, after conftest has given them out.
GROUP_REPORT = """\
def pytest_collection_finish(session):
    for item in session.items:
        marker = item.get_closest_marker("xdist_group")
        print("GROUP", marker.args[0] if marker else "-", item.nodeid)
"""


def test_the_compose_example_runs_the_suites_realm_with_the_suites_features():
    """The realm the suite imports is examples/compose/realm.json, and compose starts Keycloak
    with the features the suite builds it with, so its clients work there as tested."""
    assert REALM_FILE == COMPOSE / "realm.json"
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    command = compose["services"]["idp"]["command"]
    assert command[:2] == ["start-dev", "--import-realm"]
    assert f"--features={FEATURES}" in command and f"--features={FEATURES}" in BUILD_OPTIONS
    assert "spiffe" in FEATURES.split(",") and "client-auth-federated" in FEATURES.split(",")


def test_the_realms_spiffe_client_is_credproxys_spiffe_id_through_the_spiffe_provider():
    """Client orders-spiffe authenticates with federated-jwt through the SPIFFE identity
    provider of the tests' trust domain, and names credproxy's SPIFFE ID (tests/spire.py)."""
    realm = json.loads(REALM_FILE.read_text())
    [provider] = [p for p in realm["identityProviders"] if p["providerId"] == "spiffe"]
    assert provider["config"]["trustDomain"] == f"spiffe://{TRUST_DOMAIN}"
    assert provider["config"]["bundleEndpoint"].startswith("${CREDPROXY_SPIFFE_BUNDLE_ENDPOINT:")
    [client] = [c for c in realm["clients"] if c["clientId"] == Keycloak.SPIFFE_CLIENT_ID]
    assert client["clientAuthenticatorType"] == "federated-jwt"
    assert client["attributes"]["jwt.credential.issuer"] == provider["alias"]
    assert client["attributes"]["jwt.credential.sub"] == CREDPROXY_ID


def test_every_keycloak_case_runs_in_the_keycloak_worker(tmp_path: Path):
    """Every collected test that uses Keycloak — by the fixture, or as the keycloak case of a
    fixture parametrised over IdPs (oauth_idp, mtls_idp, private_idp, spiffe_oauth_idp) — is
    in xdist group "keycloak": with -n 2 a second worker never starts a second Keycloak."""
    (tmp_path / "group_report.py").write_text(GROUP_REPORT)
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "group_report", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**_outside_pytest(), "PYTHONPATH": f"{ROOT}:{tmp_path}"},
    )  # fmt: skip
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    groups = [
        line.split(" ", 2)[1:]
        for line in collected.stdout.splitlines()
        if line.startswith("GROUP ")
    ]
    keycloak_case = re.compile(r"\[(?:.*-)?keycloak(?:-.*)?\]$")
    uses_keycloak = [(group, node) for group, node in groups if keycloak_case.search(node)]
    assert len(uses_keycloak) >= 20, uses_keycloak  # the parametrised OAuth tests are there
    assert [node for group, node in uses_keycloak if group != "keycloak"] == []


def _outside_pytest() -> dict[str, str]:
    """The environment without this session's (an xdist worker's PYTEST_XDIST_WORKER)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
