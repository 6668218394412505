"""The suite's Keycloak (tests/keycloak.py) as the issue asks for it: every test that uses it
runs beside the others in one pytest-xdist worker, so a session starts one Keycloak."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.counterparts import ROOT

# Prints each collected test's xdist group, after conftest has given them out.
GROUP_REPORT = """\
def pytest_collection_finish(session):
    for item in session.items:
        marker = item.get_closest_marker("xdist_group")
        print("GROUP", marker.args[0] if marker else "-", item.nodeid)
"""


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
