"""Operations and governance against the real IdP: the audit trail of a full scenario and the
evidence report over it, the live and offline inventory, SIGHUP reload (good and bad), SIGUSR1
audit reopen (logrotate) and an audit writer that drops — counted — rather than block."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from proxy.audit.trail import Audit
from tests.counterparts import ROOT, config, free_port, wait_until

OWNED = """\
  - name: refunds
    path_prefix: /refunds/
    upstream: {upstream}
    owner: team-refunds
    purpose: refund settlement
    credential: {{issuer: test-idp, audience: "{audience}", scope: payments.write, inject: bearer}}
    allow: [{{callers: [test-suite], methods: [POST]}}]
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT, timeout=30
    )


def _evidence(proc, *extra: str) -> tuple[int, dict[str, Any]]:
    result = _cli("evidence", "--audit", str(proc.audit_file), "--format", "json", *extra)
    return result.returncode, json.loads(result.stdout)


async def test_audit_trail_and_evidence_report(idp, upstream, credproxy, client):
    """A scenario's every credential appears issued, used (per request) and revoked or expired;
    the evidence report states the checks PASS, counts uses and denials, and FAILs — exit 1 — a
    forged use by a caller outside policy or after expiry."""
    text = config(
        idp=idp,
        upstream=upstream.origin,
        audience=upstream.short_audience,  # 5 s tokens: they expire during the test
        extra_route=OWNED.format(upstream=upstream.origin, audience=upstream.opaque_audience),
    ).replace('audit: {file: "{audit}"}', 'audit: {file: "{audit}", used: request}')
    proc = credproxy(text)
    for _ in range(3):
        async with client.get(proc.url + "/payments/api/x") as response:
            assert response.status == 200
    async with client.get(
        proc.url + "/payments/api/x", headers={"Origin": "https://evil.example"}
    ) as response:
        assert response.status == 403
    async with client.get(proc.url + "/refunds/api/x") as response:
        assert response.status == 403  # GET is not an allowed method there
    assert proc.stop() == 0  # SIGTERM: drain, then revoke what the IdP can revoke
    issued = proc.audit("credential.issued") + proc.audit("credential.refreshed")
    expiry = max(e["expires_at"] for e in issued if e["audience"] == upstream.short_audience)
    assert {tuple(e["routes"]) for e in issued} == {("payments",), ("refunds",)}
    await asyncio.sleep(max(0.0, expiry - time.time()) + 0.5)

    code, report = _evidence(proc, "-c", str(proc.config_file))
    assert code == 0, report["checks"]
    assert [c["status"] for c in report["checks"]] == ["PASS", "PASS", "PASS"]
    states = {c["fingerprint"]: c["state"] for c in report["credentials"]}
    assert {e["fingerprint"] for e in issued} == set(states)
    opaque = [e["fingerprint"] for e in issued if e["audience"] == upstream.opaque_audience]
    assert [states[f] for f in opaque] == ["revoked"]
    assert set(states.values()) == {"revoked", "expired"}
    assert sum(c["uses"] for c in report["credentials"]) == 3
    assert report["denied"] == {"browser_request_refused": 1, "path_not_allowed": 1}

    used = proc.audit("credential.used")[0]
    forged = {**used, "caller": {**used["caller"], "uid": 4242}, "ts": used["ts"] + 0.001}
    late = {**used, "ts": expiry + 60, "last_ts": expiry + 60}
    with proc.audit_file.open("a") as audit:
        audit.write(json.dumps(forged) + "\n" + json.dumps(late) + "\n")
    code, report = _evidence(proc, "-c", str(proc.config_file))
    assert code == 1
    assert [c["status"] for c in report["checks"]] == ["FAIL", "PASS", "FAIL"]
    code, later = _evidence(proc, "--since", "2099-01-01T00:00:00")
    assert code == 0 and later["events"] == 0  # nothing in the window
    code, recent = _evidence(proc, "--since", "1h")
    assert recent["events"] == report["events"]
    bad = _cli("evidence", "--audit", str(proc.audit_file), "--since", "yesterday")
    assert bad.returncode == 1 and "--since: 'yesterday'" in bad.stderr
    markdown = _cli("evidence", "--audit", str(proc.audit_file)).stdout
    assert "# credproxy evidence report" in markdown and "**FAIL**" in markdown
    assert "**SKIP** no use by a caller outside policy" in markdown  # no -c given


async def test_inventory_live_and_from_config(idp, upstream, credproxy, client, tmp_path):
    """GET /credentials (control socket) and `credproxy inventory` list each credential with owner, purpose,
    routes, expiry and use count, never a value; with the sidecar down, the config's view."""
    admin = free_port()
    text = config(
        idp=idp,
        upstream=upstream.origin,
        audience=upstream.audience,
        extra_route=OWNED.format(upstream=upstream.origin, audience=upstream.audience),
    ).replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{admin}")
    text = text.replace("    type: oauth2\n", "    type: oauth2\n    owner: platform-iam\n")
    proc = credproxy(text)
    for _ in range(2):
        async with client.get(proc.url + "/payments/api/x") as response:
            assert response.status == 200
    async with proc.control() as control, control.get("http://localhost/credentials") as response:
        raw = await response.text()
    [bearer, dpop] = sorted(json.loads(raw)["credentials"], key=lambda c: c["binding"])
    assert dpop["owner"] == "platform-iam" and dpop["use_count"] == 2
    assert [r["name"] for r in dpop["routes"]] == ["payments"]
    assert bearer["routes"] == [
        {"name": "refunds", "owner": "team-refunds", "purpose": "refund settlement"}
    ]
    assert bearer["use_count"] == 0 and bearer["expires_at"] > time.time()
    for token in [r["access_token"] for r in idp.records() if r.get("access_token")]:
        assert token not in raw
    live = _cli("inventory", "-c", str(proc.config_file))
    assert live.returncode == 0 and "| test-idp (oauth2) |" in live.stdout
    assert "team-refunds" in live.stdout and "not running" not in live.stdout
    proc.stop()
    offline = _cli("inventory", "-c", str(proc.config_file), "--json")
    listed = json.loads(offline.stdout)
    assert listed["live"] is False and "not answering" in offline.stderr
    assert len(listed["credentials"]) == 1  # one (issuer, audience, scope), two routes


async def test_sighup_reload_applies_a_good_config_and_keeps_a_bad_one_out(
    idp, upstream, credproxy, client
):
    """SIGHUP swaps routes and policy in without a restart, keeping the unchanged issuer's
    token; an invalid file is refused with path-named errors and the running config serves on."""
    text = config(idp=idp, upstream=upstream.origin, audience=upstream.audience)
    proc = credproxy(text)
    tokens_before = len([r for r in idp.records() if r.get("access_token")])
    async with client.get(proc.url + "/refunds/api/x") as response:
        assert response.status == 404
    grown = text.replace(
        "\naudit:",
        "\n" + OWNED.format(upstream=upstream.origin, audience=upstream.audience) + "audit:",
    )
    proc.config_file.write_text(grown.replace("{audit}", str(proc.audit_file)))
    proc.process.send_signal(signal.SIGHUP)
    wait_until(lambda: proc.audit("config.reloaded"), what="reload event")
    async with client.post(proc.url + "/refunds/api/x") as response:
        assert response.status == 200
    async with client.get(proc.url + "/payments/api/x") as response:
        assert response.status == 200
    new_tokens = [r for r in idp.records() if r.get("access_token")][tokens_before:]
    assert len(new_tokens) == 1  # the new route's bearer token; payments kept its DPoP token

    broken = grown.replace("path_prefix: /refunds/", "path_prefix: refunds")
    proc.config_file.write_text(broken.replace("{audit}", str(proc.audit_file)))
    proc.process.send_signal(signal.SIGHUP)
    wait_until(lambda: len(proc.audit("config.reloaded")) == 2, what="second reload event")
    [applied, rejected] = proc.audit("config.reloaded")
    assert applied["outcome"] == "applied" and applied["routes"] == ["payments", "refunds"]
    assert rejected["outcome"] == "rejected"
    assert any("routes[1].path_prefix" in e for e in rejected["errors"]), rejected["errors"]
    assert "reload of" in proc.log() and "routes[1].path_prefix" in proc.log()
    async with client.post(proc.url + "/refunds/api/x") as response:
        assert response.status == 200  # the previous config still serves
    async with client.get(proc.admin_url + "/metrics") as response:
        metrics = await response.text()
    assert 'credproxy_config_reloads_total{outcome="applied"} 1.0' in metrics
    assert 'credproxy_config_reloads_total{outcome="rejected"} 1.0' in metrics


async def test_a_reload_failing_unexpectedly_is_rejected_and_the_running_config_serves_on(
    idp, upstream, credproxy, client, tmp_path
):
    """A reload that fails other than with a config or identity error (a route ca_file that is
    not PEM: ssl.SSLError) is logged with its traceback, counted and audited as rejected, and
    the running config keeps serving."""
    text = config(idp=idp, upstream=upstream.origin, audience=upstream.audience)
    proc = credproxy(text)
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    broken = text.replace("    strip_headers:", f"    ca_file: {not_pem}\n    strip_headers:")
    proc.config_file.write_text(broken.replace("{audit}", str(proc.audit_file)))
    proc.process.send_signal(signal.SIGHUP)
    wait_until(lambda: proc.audit("config.reloaded"), what="reload event")
    [rejected] = proc.audit("config.reloaded")
    assert rejected["outcome"] == "rejected" and "SSLError" in rejected["errors"][0]
    assert "failed unexpectedly" in proc.log() and "Traceback" in proc.log()
    async with client.get(proc.url + "/payments/api/x") as response:
        assert response.status == 200
    async with client.get(proc.admin_url + "/metrics") as response:
        assert 'credproxy_config_reloads_total{outcome="rejected"} 1.0' in await response.text()


async def test_sigusr1_reopens_the_audit_file_after_logrotate(idp, upstream, credproxy, client):
    """After the file is moved away and SIGUSR1 sent, new events go to a new file at the path."""
    proc = credproxy(
        config(idp=idp, upstream=upstream.origin, audience=upstream.audience).replace(
            'audit: {file: "{audit}"}', 'audit: {file: "{audit}", used: request}'
        )
    )
    rotated = proc.audit_file.with_suffix(".1")
    proc.audit("credential.issued")  # settled
    proc.audit_file.rename(rotated)
    proc.process.send_signal(signal.SIGUSR1)  # the file is reopened before the next write
    await asyncio.sleep(0.3)
    async with client.get(proc.url + "/payments/api/x") as response:
        assert response.status == 200
    wait_until(proc.audit_file.exists, what="the new audit file")
    assert [e["event"] for e in proc.audit()] == ["credential.used"]
    assert "credential.issued" in rotated.read_text()
    assert "credential.used" not in rotated.read_text()
    assert "reopened" in proc.log()


def test_a_stalled_audit_disk_drops_and_counts_instead_of_blocking(tmp_path: Path, caplog):
    """Fault injector: a write that blocks (a stalled disk). emit() never waits; beyond the
    queue, events are dropped, counted, reported to the metric hook and logged."""
    audit = Audit(str(tmp_path / "audit.jsonl"), queue_size=100)
    path = tmp_path / "audit.jsonl"
    wait_until(lambda: "audit.started" in path.read_text(), what="the writer idle again")
    stalled, written = threading.Event(), []
    real = audit._stream

    class StalledDisk:
        closed = False

        def write(self, text: str) -> None:
            stalled.wait()  # until the test lets it go: emit() must not wait for this
            written.append(text)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            real.close()

    audit._stream = StalledDisk()  # type: ignore[assignment]
    drops: list[int] = []
    audit.on_drop = lambda: drops.append(1)
    try:
        for i in range(1000):
            audit.emit("credential.used", n=i)  # completes: it never waits for the disk
    finally:
        stalled.set()
    # the writer holds one batch (≤ the queue) at the stalled write, the queue holds the rest
    assert audit.dropped == len(drops) and 1000 - 201 <= audit.dropped <= 1000 - 100
    assert "audit queue full" in caplog.text
    audit.aclose()
    assert sum(chunk.count("\n") for chunk in written) == 1000 - audit.dropped
