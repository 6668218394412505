"""``credproxy evidence`` is right for every issuer type: real runs of credproxy against their
counterparts (the oidc-provider, moto's STS, an API-key server, a JWT verifier), then the report
over the audit log they wrote — no false FAIL, and what each kind of credential is stated."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import boto3

from tests.aws_counterparts import REGION, Relay, aws_config
from tests.counterparts import ROOT, config
from tests.test_aws import APP_CONFIG
from tests.test_static_and_jwt import _config as static_and_jwt_config
from tests.test_static_and_jwt import servers  # noqa: F401 - the fixture
from tests.test_token_exchange import _exchange_config


def _evidence(proc) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "evidence", "--audit", str(proc.audit_file),
         "-c", str(proc.config_file), "--format", "json"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    return result.returncode, json.loads(result.stdout)


def _statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["check"]: c["status"] for c in report["checks"]}


def _by_issuer(report: dict[str, Any], issuer: str) -> list[dict[str, Any]]:
    return [c for c in report["credentials"] if c["issuer"] == issuer]


async def test_static_secret_used_past_its_reread_and_rotated_passes(servers, credproxy, client):  # noqa: F811
    """A static key used long after its first re-read (unchanged, so no event) is not "used after
    its expiry": it has none, it is listed as legacy (an OPEN check names it), and a rotated file
    makes the old key ``replaced`` by the new one; the evidence exits 0."""
    api, jwt_server, key_file, jwt_key = servers
    proc = credproxy(static_and_jwt_config(api, jwt_server, key_file, jwt_key).replace(
        'audit: {file: "{audit}"}', 'audit: {file: "{audit}", used: request}'
    ))  # fmt: skip
    started = time.monotonic()
    while time.monotonic() - started < 5:  # past two re-reads (reread_s: 2)
        async with client.get(proc.url + "/h/v1/items") as response:
            assert response.status == 200
        await asyncio.sleep(0.5)
    key_file.write_text("legacy-key-rotated-fedcba9876\n")
    for _ in range(100):
        async with client.get(proc.url + "/q/v1/items") as response:
            if response.status == 200:
                break
        await asyncio.sleep(0.1)
    assert proc.stop() == 0
    issued = [
        e for e in proc.audit()
        if e["event"] in ("credential.issued", "credential.refreshed") and e["issuer"] == "legacy-key"
    ]  # fmt: skip
    assert [e["expires_at"] for e in issued] == [None, None]
    assert all(e["reread_s"] == 2 for e in issued)

    code, report = _evidence(proc)
    assert code == 0, report["checks"]
    statuses = _statuses(report)
    assert statuses["no credential was used after its expiry"] == "PASS"
    assert statuses["every credential ended revoked or expired"] == "PASS"
    assert statuses["no use by a caller outside policy"] == "PASS"
    assert statuses["legacy secrets (no expiry: each lives until its owner rotates it)"] == "OPEN"
    old, new = sorted(_by_issuer(report, "legacy-key"), key=lambda c: c["issued_at"])
    assert (old["state"], new["state"]) == ("replaced", "active")
    assert old["legacy"] and new["legacy"] and old["late_uses"] == 0 and old["uses"] >= 10
    assert report["legacy_in_use"] == ["legacy-key"]


def test_a_log_from_before_gives_a_static_secret_no_expiry():
    """Older logs gave a static secret ``expires_at`` = its next re-read: the evidence reads a
    legacy event as no expiry, so later uses of the unchanged secret are not failed."""
    from proxy.governance import evidence

    lines = [
        {"ts": 100.0, "event": "credential.issued", "issuer": "k", "fingerprint": "f1",
         "expires_at": 105.0, "lifetime_s": 5.0, "legacy": True},
        {"ts": 500.0, "event": "credential.used", "issuer": "k", "fingerprint": "f1",
         "count": 3, "last_ts": 500.0, "route": "r", "caller": {"uid": 0}},
    ]  # fmt: skip
    report = evidence.build(json.dumps(line) for line in lines)
    statuses = [status for status, _, _ in report.checks(now=600.0)]
    assert statuses[:2] == ["PASS", "PASS"] and report.credentials["f1"].uses == 3


def test_a_renewed_token_is_not_late_and_reissues_add_up():
    """``credential.renewed`` (the issuer handed back the same token with a later expiry) moves
    its expiry; the same fingerprint issued again (another worker, a restart) keeps its uses."""
    from proxy.governance import evidence

    def use(ts: float, count: int) -> dict[str, Any]:
        return {"ts": ts, "event": "credential.used", "fingerprint": "t", "count": count,
                "last_ts": ts, "route": "r", "caller": {"uid": 0}}  # fmt: skip

    issued = {"ts": 100.0, "event": "credential.issued", "issuer": "i", "fingerprint": "t",
              "expires_at": 160.0, "lifetime_s": 60.0}  # fmt: skip
    lines = [issued, use(150.0, 2), {**issued, "ts": 151.0}, use(155.0, 1),
             {"ts": 158.0, "event": "credential.renewed", "fingerprint": "t",
              "expires_at": 220.0}, use(200.0, 4)]  # fmt: skip
    report = evidence.build(json.dumps(line) for line in lines)
    assert report.credentials["t"].uses == 7 and report.credentials["t"].late_uses == 0
    assert report.checks(now=300.0)[0][0] == "PASS"
    without_renewal = evidence.build(json.dumps(line) for line in lines if line["ts"] != 158.0)
    assert without_renewal.checks(now=300.0)[0][0] == "FAIL"


async def test_self_signed_jwt_evidence_is_per_request(servers, credproxy, client):  # noqa: F811
    """JWTs minted per request: one credential, per request, uses counted, nothing to end."""
    api, jwt_server, key_file, jwt_key = servers
    proc = credproxy(static_and_jwt_config(api, jwt_server, key_file, jwt_key))
    jwt_server.jwks_url = proc.admin_url + "/.well-known/jwks.json"
    for _ in range(4):
        async with client.post(proc.url + "/jwt/v1/orders") as response:
            assert response.status == 200
    assert proc.stop() == 0
    code, report = _evidence(proc)
    assert code == 0, report["checks"]
    [minted] = _by_issuer(report, "self")
    assert minted["per_request"] and minted["expires_at"] is None and minted["uses"] == 4
    assert minted["state"] == "active" and not minted["legacy"]


async def test_oauth2_and_token_exchange_evidence_passes(
    idp, upstream, credproxy, client, tmp_path
):
    """OAuth2 client credentials and RFC 8693 exchange, 5 s tokens refreshed under traffic:
    every use falls within its token's life, every token ends revoked or expired."""
    token_file = tmp_path / "sa-token"
    token_file.write_text(idp.subject_token())
    texts = {
        "oauth2": config(idp=idp, upstream=upstream.origin, audience=upstream.short_audience),
        "token_exchange": _exchange_config(
            idp, upstream, token_file, audience=upstream.short_audience
        ),
    }
    procs = {kind: credproxy(text, name=kind) for kind, text in texts.items()}
    started = time.monotonic()
    while time.monotonic() - started < 7:  # past one 5 s token
        for proc in procs.values():
            async with client.get(proc.url + "/payments/api/x") as response:
                assert response.status == 200
        await asyncio.sleep(0.25)
    expiries = []
    for proc in procs.values():
        assert proc.stop() == 0
        expiries += [e["expires_at"] for e in proc.audit() if e.get("expires_at")]
    await asyncio.sleep(max(0.0, max(expiries) - time.time()) + 0.5)
    for kind, proc in procs.items():
        code, report = _evidence(proc)
        assert code == 0, (kind, report["checks"])
        assert set(_statuses(report).values()) == {"PASS"}, (kind, report["checks"])
        credentials = report["credentials"]
        assert len(credentials) >= 2 and sum(c["uses"] for c in credentials) >= 20, kind
        assert {c["state"] for c in credentials} <= {"revoked", "expired"}, kind


def test_aws_sts_and_static_keys_evidence(moto, credproxy, tmp_path):
    """AWS: STS credentials capped at 6 s rotate under traffic with no late use and all end
    expired; static keys from a file are legacy, with no expiry, and pass."""
    relay = Relay(moto.port)
    try:
        sts = credproxy(
            aws_config(moto, relay.url).replace(
                "    region: us-east-1\n", "    region: us-east-1\n    max_lifetime_s: 6\n", 1
            ),
            name="sts",
        )
        keys = tmp_path / "static-keys.json"
        keys.write_text(json.dumps({"access_key_id": moto.admin["aws_access_key_id"],
                                    "secret_access_key": moto.admin["aws_secret_access_key"]}))  # fmt: skip
        static = credproxy(
            aws_config(moto, relay.url).replace(
                f"    role_arn: {moto.role_arn}\n    token_file: {moto.token_file}\n",
                f"    static_credentials_file: {keys}\n",
            ),
            name="static",
        )
        apps = [
            boto3.client("s3", endpoint_url=f"{proc.url}/s3", region_name=REGION,
                         config=APP_CONFIG)
            for proc in (sts, static)
        ]  # fmt: skip
        started = time.monotonic()
        while time.monotonic() - started < 8:
            for app in apps:
                app.list_objects_v2(Bucket=moto.bucket)
            time.sleep(0.2)
        assert sts.stop() == 0 and static.stop() == 0
    finally:
        relay.close()
    time.sleep(max(0.0, max(e["expires_at"] for e in sts.audit("credential.refreshed")) - time.time()) + 0.5)  # fmt: skip
    code, report = _evidence(sts)
    assert code == 0 and set(_statuses(report).values()) == {"PASS"}, report["checks"]
    assert len(report["credentials"]) >= 2
    assert {c["state"] for c in report["credentials"]} == {"expired"}
    code, report = _evidence(static)
    assert code == 0, report["checks"]
    [legacy] = report["credentials"]
    assert legacy["legacy"] and legacy["expires_at"] is None and legacy["state"] == "active"
    assert legacy["uses"] >= 20 and report["legacy_in_use"] == ["aws"]
