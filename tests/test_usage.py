"""Credential use accounting: per-request events, or one aggregated event per route,
credential, caller and method per interval — with the totals the inventory shows."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from proxy.access.callers import Caller, from_socket
from proxy.audit.trail import Audit
from proxy.audit.usage import Usage


async def _uses(
    tmp_path: Path, mode: str, uses: list[tuple[Caller, str, str]]
) -> tuple[Usage, list[dict[str, Any]]]:
    """Record ``uses`` (caller, method, path) of one credential, close, and read the events."""
    path = tmp_path / "audit.jsonl"
    audit = Audit(str(path))
    usage = Usage(audit, mode=mode, interval_s=3600)
    for caller, method, target in uses:
        usage.record(route="r", issuer="i", label="l", fingerprint="f", caller=caller,
                     method=method, path=target)  # fmt: skip
    await usage.aclose()  # flushes
    audit.aclose()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return usage, [e for e in events if e["event"] != "audit.started"]


async def test_interval_mode_aggregates_by_caller_and_method(tmp_path):
    """Three uses by one process over two connections and one by another become two events,
    with counts and first/last times; totals count all four."""
    app, app_again = Caller("unix", 1000, pid=7), Caller("unix", 1000, pid=7)
    other = Caller("tcp", 1001)
    usage, events = await _uses(
        tmp_path, "interval", [(c, "GET", "/x") for c in (app, app_again, app, other)]
    )
    assert {(e["caller"]["uid"], e["count"]) for e in events} == {(1000, 3), (1001, 1)}
    assert all(e["event"] == "credential.used" and e["first_ts"] <= e["last_ts"] for e in events)
    assert usage.snapshot("i", "l")["use_count"] == 4


async def test_a_caller_attribute_learned_between_uses_starts_its_own_tally(tmp_path):
    """The tally key is cached per caller: a lookup that learns the executable between two
    uses must not fold the second use into the tally made before it."""
    path = tmp_path / "audit.jsonl"
    audit = Audit(str(path))
    usage = Usage(audit, mode="interval", interval_s=3600)
    ours, theirs = socket.socketpair()
    caller = from_socket(ours)
    use = {"route": "r", "issuer": "i", "label": "l", "fingerprint": "f", "method": "GET"}
    usage.record(caller=caller, path="/x", **use)
    assert caller.exe == os.path.realpath(sys.executable)  # a rule asked: looked up now
    usage.record(caller=caller, path="/x", **use)
    usage.record(caller=caller, path="/x", **use)
    await usage.aclose()
    audit.aclose()
    ours.close()
    theirs.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    uses = [e for e in events if e["event"] == "credential.used"]
    assert {(e["caller"].get("exe"), e["count"]) for e in uses} == {(None, 1), (caller.exe, 2)}


async def test_request_mode_audits_each_use_with_its_path(tmp_path):
    """One event per request, naming the path the policy saw."""
    _, [event] = await _uses(tmp_path, "request", [(Caller("unix", 0), "POST", "/v1/charges")])
    assert (event["path"], event["method"], event["count"]) == ("/v1/charges", "POST", 1)


async def test_off_mode_counts_for_the_inventory_but_audits_nothing(tmp_path):
    """audit.used: off keeps the inventory's counts and writes no credential.used event."""
    usage, events = await _uses(tmp_path, "off", [(Caller("unix", 0), "GET", "/")])
    assert events == [] and usage.snapshot("i", "l")["use_count"] == 1
