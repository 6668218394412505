"""Break-glass (issue 16, finding 3): a time-boxed, reasoned exception to a route's policy,
granted only on the control plane, audited on every use, visible in inventory, metrics and
evidence, and gone when it expires."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from tests.counterparts import ROOT, config
from tests.test_control import _attack, shared_dir  # noqa: F401 - a fixture

REASON = "INC-4242: orders-app down, ops replays stuck charges"


def _config(idp, upstream, *, top: str = "") -> str:
    """The route allows only the app (uid 1000); the test process (root) is 'ops', refused."""
    return (
        config(idp=idp, upstream=upstream.origin, audience=upstream.audience, top=top)
        .replace(
            "callers:\n  test-suite: {uid: 0}\n", "callers:\n  app: {uid: 1000}\n  ops: {uid: 0}\n"
        )
        .replace("allow: [{callers: [test-suite]}]", "allow: [{callers: [app]}]")
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT,
        timeout=60, check=False,
    )  # fmt: skip


async def _wait_for_event(proc, event: str) -> dict[str, object]:
    for _ in range(300):
        if found := proc.audit(event):
            return dict(found[0])
        await asyncio.sleep(0.1)
    raise TimeoutError(event)


async def test_grant_lets_a_refused_caller_through_until_it_expires(
    idp, upstream, credproxy, client
):
    """A grant (CLI → control socket) lets the refused caller use the route with the granted method only; every use is audited with the reason; inventory, the metric and evidence show the window; after expiry the route refuses again."""
    proc = credproxy(_config(idp, upstream))
    async with client.get(proc.url + "/payments/api/x") as response:
        assert (await response.json())["code"] == "caller_not_allowed"
    file = str(proc.config_file)
    granted = _cli("break-glass", "-c", file, "--route", "payments", "--caller", "ops",
                   "--methods", "GET", "--for", "4s", "--reason", REASON)  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    for _ in range(2):
        async with client.get(proc.url + "/payments/api/x") as response:
            assert response.status == 200
    async with client.post(proc.url + "/payments/api/x") as response:
        assert (await response.json())["code"] == "caller_not_allowed"  # GET only
    listed = json.loads(_cli("inventory", "-c", file, "--json").stdout)
    [grant] = listed["break_glass"]
    assert (grant["route"], grant["caller"], grant["uses"], grant["reason"]) == (
        "payments", "ops", 2, REASON,
    )  # fmt: skip
    async with client.get(proc.admin_url + "/metrics") as response:
        assert 'credproxy_break_glass_active{route="payments"} 1.0' in await response.text()
    expired = await _wait_for_event(proc, "policy.break_glass.expired")
    assert (expired["uses"], expired["reason"], expired["ended"]) == (2, REASON, "expired")
    async with client.get(proc.url + "/payments/api/x") as response:
        assert (await response.json())["code"] == "caller_not_allowed"
    async with client.get(proc.admin_url + "/metrics") as response:
        assert 'credproxy_break_glass_active{route="payments"} 0.0' in await response.text()
    [issued] = proc.audit("policy.break_glass.granted")
    assert issued["reason"] == REASON and issued["granted_by"]["uid"] == 0
    uses = proc.audit("policy.break_glass.used")
    assert [(u["method"], u["reason"], u["caller"]["uid"]) for u in uses] == [
        ("GET", REASON, 0)
    ] * 2
    report = _cli("evidence", "--audit", str(proc.audit_file), "-c", file, "--format", "json")
    [window] = json.loads(report.stdout)["break_glass"]
    assert (window["route"], window["reason"], len(window["uses"])) == ("payments", REASON, 2)
    assert window["ended"] == "expired"
    markdown = _cli("evidence", "--audit", str(proc.audit_file), "-c", file).stdout
    assert "## Break-glass windows" in markdown and REASON in markdown


async def test_grants_need_a_reason_respect_caps_and_only_allowed_callers(
    idp,
    upstream,
    credproxy,
    shared_dir,  # noqa: F811 - the fixture
):
    """No reason, a duration over the cap, more grants than the cap, an unknown route, an oversized body and a caller outside control.allow are each refused, nothing is granted by them, and shutdown ends the grant."""
    socket_path = shared_dir / "control.sock"
    caps = "{max_duration_s: 3600, max_grants: 1}"
    proc = credproxy(_config(idp, upstream, top=(
        f'control: {{listen: "unix:{socket_path}", socket_mode: "0666", body_max_bytes: 1024, '
        f"break_glass: {caps}}}"
    )))  # fmt: skip
    url = "http://localhost/break-glass"
    wanted = {"route": "payments", "caller": "ops", "for": "15m", "reason": REASON}
    async with proc.control() as control:
        for change, code in (
            ({"reason": " "}, "invalid_control_request"),
            ({"for": "2h"}, "invalid_control_request"),
            ({"route": "nope"}, "unknown_name"),
            ({"caller": "ghost"}, "unknown_name"),
            ({"reason": "x" * 2000}, "invalid_control_request"),  # body over 1024 bytes
        ):
            async with control.post(url, json={**wanted, **change}) as response:
                assert (await response.json())["code"] == code, change
        async with control.post(url, json=wanted) as response:
            assert response.status == 201
        async with control.post(url, json=wanted) as response:
            assert "max_grants" in (await response.json())["detail"]
        async with control.get(url) as response:
            assert len((await response.json())["break_glass"]) == 1
    refused = _attack("unix", str(socket_path), "POST", "/break-glass", as_nobody=True)
    assert refused == {"status": 403, "code": "control_caller_not_allowed"}
    assert len(proc.audit("policy.break_glass.granted")) == 1
    assert proc.stop() == 0  # grants live in memory only: a restart ends them, audited
    [ended] = proc.audit("policy.break_glass.expired")
    assert (ended["ended"], ended["reason"]) == ("shutdown", REASON)


async def test_with_several_workers_a_grant_is_refused_rather_than_partly_applied(
    idp, upstream, credproxy, client
):
    """With --workers 2 a grant held by one process would let a fraction of the requests
    through: the control plane refuses it, says why, and the route still refuses the caller."""
    proc = credproxy(_config(idp, upstream), args=("--workers", "2"))
    file = str(proc.config_file)
    refused = _cli("break-glass", "-c", file, "--route", "payments", "--caller", "ops",
                   "--for", "1m", "--reason", REASON)  # fmt: skip
    assert refused.returncode == 1
    assert "--workers 1" in refused.stderr
    assert not proc.audit("policy.break_glass.granted")
    async with client.get(proc.url + "/payments/api/x") as response:
        assert (await response.json())["code"] == "caller_not_allowed"
