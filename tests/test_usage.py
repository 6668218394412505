"""Credential use accounting: per-request events, or one aggregated event per route,
credential, caller and method per interval — with the totals the inventory shows."""

from __future__ import annotations

import json
from typing import Any

from proxy.audit import Audit
from proxy.callers import Caller
from proxy.usage import Usage


def _events(audit: Audit, path) -> list[dict[str, Any]]:
    audit.aclose()
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_interval_mode_aggregates_by_caller_and_method(tmp_path):
    """Three uses by one process over two connections and one by another become two events,
    with counts and first/last times; totals count all four."""
    path = tmp_path / "audit.jsonl"
    audit = Audit(str(path))
    usage = Usage(audit, mode="interval", interval_s=3600)
    app, app_again, other = (
        Caller("unix", 1000, pid=7),
        Caller("unix", 1000, pid=7),
        Caller("tcp", 1001),
    )
    for caller in (app, app_again, app, other):
        usage.record(route="r", issuer="i", label="l", fingerprint="f", caller=caller,
                     method="GET", path="/x")  # fmt: skip
    await usage.aclose()  # flushes
    events = _events(audit, path)
    counts = {(e["caller"]["uid"], e["count"]) for e in events}
    assert counts == {(1000, 3), (1001, 1)}
    assert all(e["event"] == "credential.used" and e["first_ts"] <= e["last_ts"] for e in events)
    assert usage.snapshot("i", "l")["use_count"] == 4


async def test_request_mode_audits_each_use_with_its_path(tmp_path):
    """One event per request, naming the path the policy saw."""
    path = tmp_path / "audit.jsonl"
    audit = Audit(str(path))
    usage = Usage(audit, mode="request", interval_s=60)
    usage.record(route="r", issuer="i", label="l", fingerprint="f", caller=Caller("unix", 0),
                 method="POST", path="/v1/charges")  # fmt: skip
    await usage.aclose()
    [event] = _events(audit, path)
    assert (event["path"], event["method"], event["count"]) == ("/v1/charges", "POST", 1)


async def test_off_mode_counts_for_the_inventory_but_audits_nothing(tmp_path):
    """audit.used: off keeps the inventory's counts and writes no credential.used event."""
    path = tmp_path / "audit.jsonl"
    audit = Audit(str(path))
    usage = Usage(audit, mode="off", interval_s=60)
    usage.record(route="r", issuer="i", label="l", fingerprint="f", caller=Caller("unix", 0),
                 method="GET", path="/")  # fmt: skip
    await usage.aclose()
    assert _events(audit, path) == [] and usage.snapshot("i", "l")["use_count"] == 1
