"""The evidence report an auditor reads: from the audit log alone, each credential's life
(issued → used → revoked or expired), denied attempts, legacy secrets still in use, and three
checks — no use past expiry, every credential ended, no use by a caller outside policy.

What the events mean, per kind of credential:

- a token (oauth2, token_exchange, aws STS): ``credential.issued`` / ``refreshed`` give its
  ``expires_at``; ``credential.renewed`` moves it (the issuer handed the same token back with a
  later expiry); it ends revoked or expired, and a use after its expiry fails the check.
- a legacy secret (static, aws ``static_credentials_file``; ``legacy: true``): no expiry of its
  own — it lives until its owner rotates it. The file is re-read every ``reread_s``; a value
  re-read unchanged writes nothing, a new value is a ``refreshed`` event that *replaces* the
  previous one of the same issuer, audience, scope and binding. Its uses are never late, it is
  listed as legacy, and an OPEN check names it (older logs gave it ``expires_at`` = the next
  re-read: ignored).
- per-request credentials (self_signed_jwt; ``per_request: true``): one JWT per request, each
  living seconds; the event names the minting, which never expires nor needs ending.

The same fingerprint issued again (another worker, a restart under the deployment's fingerprint
key) is the same credential: its uses add up.
"""

from __future__ import annotations

import datetime
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..access.callers import Caller
from ..access.policy import RoutePolicy
from ..config.model import Config

_DURATION = re.compile(r"^([0-9]+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, *, now: float) -> float:
    """``24h``, ``30m``, ``7d`` back from now, or an ISO 8601 time (UTC unless it says)."""
    match = _DURATION.match(value)
    if match:
        return now - int(match[1]) * _SECONDS[match[2]]
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since: {value!r} is neither like 24h/30m/7d nor an ISO time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


@dataclass
class Credential:
    fingerprint: str
    issuer: str
    audience: str | None
    issued_at: float
    expires_at: float | None  # None: minted per request (seconds of life each)
    lifetime_s: float | None
    legacy: bool
    uses: int = 0
    last_use: float | None = None
    revoked_at: float | None = None
    revocation: str | None = None  # outcome at the issuer: revoked, unsupported, failed
    late_uses: int = 0  # uses recorded after expires_at
    per_request: bool = False  # minted per request: expires_at is None
    replaced_at: float | None = None  # legacy: a newer secret from the same source was read

    def state(self, now: float) -> str:
        if self.revoked_at is not None and self.revocation == "revoked":
            return "revoked"
        if self.replaced_at is not None:
            return "replaced"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass
class Report:
    start: float | None = None
    end: float | None = None
    events: int = 0
    unreadable_lines: int = 0
    credentials: dict[str, Credential] = field(default_factory=dict)
    current: dict[tuple[Any, ...], str] = field(default_factory=dict)  # source → fingerprint
    denied: Counter[str] = field(default_factory=Counter)
    reloads: Counter[str] = field(default_factory=Counter)
    outside_policy: list[dict[str, Any]] = field(default_factory=list)
    policy_checked: bool = False
    uses_checked: int = 0
    break_glass: dict[str, dict[str, Any]] = field(default_factory=dict)  # windows by grant id
    under_break_glass: list[dict[str, Any]] = field(default_factory=list)

    def checks(self, now: float) -> list[tuple[str, str, str]]:
        """(status PASS/FAIL/OPEN/SKIP, check, detail)."""
        late = [c for c in self.credentials.values() if c.late_uses]
        active = [c for c in self.credentials.values() if c.state(now) == "active"]
        unended = [c for c in active if c.expires_at is not None]
        out = [
            (
                "FAIL" if late else "PASS",
                "no credential was used after its expiry",
                ", ".join(f"{c.fingerprint} ×{c.late_uses}" for c in late)
                or f"{self.uses_checked} use event(s) checked",
            ),
            (
                "OPEN" if unended else "PASS",
                "every credential ended revoked or expired",
                ", ".join(
                    f"{c.fingerprint} valid until {_time(c.expires_at or 0)}" for c in unended
                )
                or f"{len(self.credentials)} credential(s)",
            ),
        ]
        legacy = [c for c in self.credentials.values() if c.legacy]
        if legacy:
            current = [c for c in legacy if c.state(now) == "active"]
            out.append(
                (
                    "OPEN",
                    "legacy secrets (no expiry: each lives until its owner rotates it)",
                    f"{len(current)} current, {len(legacy) - len(current)} replaced, "
                    f"{sum(c.uses for c in legacy)} use(s); issuers "
                    + ", ".join(sorted({c.issuer for c in current} or {"-"})),
                )
            )
        if self.break_glass:
            uses = sum(len(w["uses"]) for w in self.break_glass.values())
            out.append(
                (
                    "OPEN",
                    "break-glass windows (exceptions to policy, each with its reason)",
                    f"{len(self.break_glass)} window(s), {uses} use(s) under them",
                )
            )
        if not self.policy_checked:
            out.append(("SKIP", "no use by a caller outside policy", "pass -c CONFIG to check"))
        else:
            out.append(
                (
                    "FAIL" if self.outside_policy else "PASS",
                    "no use by a caller outside policy",
                    "; ".join(
                        f"{u['route']} by {u['caller']} at {_time(u['ts'])}"
                        for u in self.outside_policy[:10]
                    )
                    or f"{self.uses_checked} use event(s) checked against the config"
                    + (
                        f"; {len(self.under_break_glass)} outside it under break-glass"
                        if self.under_break_glass
                        else ""
                    ),
                ),
            )
        return out


def build(
    lines: Iterable[str], *, since: float | None = None, config: Config | None = None
) -> Report:
    report = Report(policy_checked=config is not None)
    policies = (
        {r.name: RoutePolicy(r.allow, config.callers) for r in config.routes} if config else {}
    )
    for line in lines:
        try:
            event = json.loads(line)
            ts = float(event["ts"])
            kind = str(event["event"])
        except (ValueError, KeyError, TypeError):
            report.unreadable_lines += bool(line.strip())
            continue
        if since is not None and ts < since:
            continue
        report.events += 1
        report.start = ts if report.start is None else min(report.start, ts)
        report.end = ts if report.end is None else max(report.end, ts)
        if kind in ("credential.issued", "credential.refreshed"):
            _issued(report, event, ts)
        elif kind == "credential.renewed":
            _renewed(report, event)
        elif kind == "credential.used":
            _used(report, event, ts, policies)
        elif kind == "credential.revoked":
            credential = report.credentials.get(str(event.get("fingerprint")))
            if credential is not None:
                credential.revoked_at, credential.revocation = ts, str(event.get("outcome"))
        elif kind == "request.denied":
            report.denied[str(event.get("reason"))] += 1
        elif kind == "config.reloaded":
            report.reloads[str(event.get("outcome"))] += 1
        elif kind.startswith("policy.break_glass."):
            _break_glass(report, kind, event, ts)
    _excuse_break_glass_uses(report)
    return report


def _break_glass(report: Report, kind: str, event: dict[str, Any], ts: float) -> None:
    grant_id = str(event.get("id"))
    window = report.break_glass.setdefault(grant_id, {
        "id": grant_id, "route": event.get("route"), "caller": event.get("caller_name"),
        "reason": event.get("reason"), "granted_at": None, "granted_by": None,
        "expires_at": None, "ended_at": None, "ended": None, "uses": [],
    })  # fmt: skip
    if kind == "policy.break_glass.granted":
        window.update(
            caller=event.get("caller"), granted_at=ts, granted_by=event.get("granted_by"),
            expires_at=event.get("expires_at"), methods=event.get("methods"),
            paths=event.get("paths"),
        )  # fmt: skip
    elif kind == "policy.break_glass.used":
        window["uses"].append({
            "ts": ts, "caller": event.get("caller"), "method": event.get("method"),
            "path": event.get("path"),
        })  # fmt: skip
    elif kind == "policy.break_glass.expired":
        window.update(ended_at=ts, ended=event.get("ended"))


def _excuse_break_glass_uses(report: Report) -> None:
    """A use outside the config's policy that a break-glass grant let through (same route and
    caller as a recorded break-glass use) is listed under that window, not failed."""
    covered = {
        (w["route"], json.dumps(u["caller"], sort_keys=True))
        for w in report.break_glass.values()
        for u in w["uses"]
    }
    kept = []
    for use in report.outside_policy:
        if (use["route"], json.dumps(use["caller"], sort_keys=True)) in covered:
            report.under_break_glass.append(use)
        else:
            kept.append(use)
    report.outside_policy = kept


def _issued(report: Report, event: dict[str, Any], ts: float) -> None:
    fingerprint = str(event.get("fingerprint") or event.get("key_id") or "?")
    legacy = bool(event.get("legacy"))
    per_request = bool(event.get("per_request"))
    expires = event.get("expires_at")
    # a legacy secret has no expiry (older logs put its next re-read there), nor a minting
    expires_at = float(expires) if isinstance(expires, int | float) and not legacy else None
    source = (event.get("issuer"), event.get("audience"), event.get("scope"), event.get("binding"))
    previous = report.credentials.get(report.current.get(source, fingerprint))
    if previous is not None and previous.fingerprint != fingerprint and previous.legacy:
        previous.replaced_at = ts  # rotated at its owner; the file now holds another secret
    report.current[source] = fingerprint
    known = report.credentials.get(fingerprint)
    if known is not None:  # the same credential again: another worker, a restart
        known.replaced_at = None
        if known.expires_at is not None and expires_at is not None:
            known.expires_at = max(known.expires_at, expires_at)
        return
    report.credentials[fingerprint] = Credential(
        fingerprint=fingerprint,
        issuer=str(event.get("issuer")),
        audience=event.get("audience"),
        issued_at=ts,
        expires_at=expires_at,
        lifetime_s=None if legacy else event.get("lifetime_s"),
        legacy=legacy,
        per_request=per_request,
    )


def _renewed(report: Report, event: dict[str, Any]) -> None:
    """The issuer handed the same token back with a later expiry."""
    credential = report.credentials.get(str(event.get("fingerprint")))
    expires = event.get("expires_at")
    if credential is None or credential.expires_at is None or not isinstance(expires, int | float):
        return
    credential.expires_at = max(credential.expires_at, float(expires))


def _used(
    report: Report, event: dict[str, Any], ts: float, policies: dict[str, RoutePolicy]
) -> None:
    count = int(event.get("count", 1))
    last = float(event.get("last_ts", ts))
    report.uses_checked += 1
    credential = report.credentials.get(str(event.get("fingerprint")))
    if credential is not None:
        credential.uses += count
        credential.last_use = max(credential.last_use or 0.0, last)
        if credential.expires_at is not None and last > credential.expires_at:
            credential.late_uses += count
    policy = policies.get(str(event.get("route")))
    if policies and not _allowed(policy, event):
        report.outside_policy.append(
            {"route": event.get("route"), "caller": event.get("caller"), "ts": ts}
        )


def _allowed(policy: RoutePolicy | None, event: dict[str, Any]) -> bool:
    caller, method, path = event.get("caller"), event.get("method"), event.get("path")
    if policy is None or not isinstance(caller, dict):
        return False
    return policy.permits(
        Caller.recorded(caller), str(method), str(path) if path is not None else None
    )


def _time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def markdown(report: Report, *, source: str, now: float) -> str:
    span = (
        f"{_time(report.start)} → {_time(report.end)}"
        if report.start is not None and report.end is not None
        else "no events"
    )
    out = [
        "# credproxy evidence report",
        "",
        f"Audit log `{source}`: {report.events} event(s), {span}"
        + (f"; {report.unreadable_lines} unreadable line(s)" if report.unreadable_lines else "")
        + ".",
        "",
        "## Checks",
        "",
        *(f"- **{status}** {check}: {detail}" for status, check, detail in report.checks(now)),
        "",
        "## Credentials",
        "",
        "| fingerprint | issuer | audience | issued | lifetime s | uses | last use | end |",
        "|---|---|---|---|---:|---:|---|---|",
    ]
    for c in sorted(report.credentials.values(), key=lambda c: c.issued_at):
        out.append(
            f"| `{c.fingerprint}`{' (legacy)' if c.legacy else ''} | {c.issuer} | "
            f"{c.audience or '-'} | {_time(c.issued_at)} | {_lifetime(c)} | "
            f"{c.uses} | {_time(c.last_use) if c.last_use else '-'} | {_end(c, now)} |"
        )
    lifetimes = [c.lifetime_s for c in report.credentials.values() if c.lifetime_s]
    legacy = sorted({c.issuer for c in report.credentials.values() if c.legacy and c.uses})
    out += [
        "",
        f"Longest lifetime seen: {max(lifetimes):g} s." if lifetimes else "No cached credential.",
        "Legacy secrets still in use: " + (", ".join(legacy) if legacy else "none") + ".",
        "",
        "## Denied requests",
        "",
        "| reason | count |",
        "|---|---:|",
        *(f"| {reason} | {count} |" for reason, count in report.denied.most_common()),
    ]
    if report.reloads:
        reloads = ", ".join(f"{k}: {v}" for k, v in sorted(report.reloads.items()))
        out += ["", f"Config reloads: {reloads}."]
    if report.break_glass:
        out += ["", "## Break-glass windows", "",
                "| id | route | caller | granted | until | ended | uses | reason |",
                "|---|---|---|---|---|---|---:|---|"]  # fmt: skip
        for w in report.break_glass.values():
            granted = _time(w["granted_at"]) if w["granted_at"] else "before the log"
            until = _time(w["expires_at"]) if w["expires_at"] else "-"
            ended = f"{w['ended']} {_time(w['ended_at'])}" if w["ended_at"] else "not in the log"
            out.append(
                f"| `{w['id']}` | {w['route']} | {w['caller']} | {granted} | {until} | {ended} "
                f"| {len(w['uses'])} | {w['reason']} |"
            )
            for u in w["uses"]:
                out.append(f"|  | ↳ {u['method']} {u['path']} | uid {(u['caller'] or {}).get('uid')} "
                           f"| {_time(u['ts'])} |  |  |  |  |")  # fmt: skip
    return "\n".join(out) + "\n"


def _lifetime(credential: Credential) -> str:
    if credential.legacy:
        return "none (legacy)"
    if credential.per_request or credential.lifetime_s is None:
        return "per request"
    return f"{credential.lifetime_s:g}"


def _end(credential: Credential, now: float) -> str:
    state = credential.state(now)
    if state == "revoked" and credential.revoked_at is not None:
        return f"revoked {_time(credential.revoked_at)}"
    if state == "replaced" and credential.replaced_at is not None:
        return f"replaced {_time(credential.replaced_at)} (rotated at its owner)"
    if credential.legacy:
        return "in use, no expiry (legacy)"
    if credential.revocation is not None and credential.revoked_at is not None:
        return f"{state} (revocation {credential.revocation} {_time(credential.revoked_at)})"
    if state == "expired" and credential.expires_at is not None:
        return f"expired {_time(credential.expires_at)}"
    return state


def as_json(report: Report, *, source: str, now: float) -> dict[str, Any]:
    return {
        "source": source,
        "events": report.events,
        "unreadable_lines": report.unreadable_lines,
        "start": report.start,
        "end": report.end,
        "checks": [
            {"status": status, "check": check, "detail": detail}
            for status, check, detail in report.checks(now)
        ],
        "credentials": [
            {**vars(c), "state": c.state(now)}
            for c in sorted(report.credentials.values(), key=lambda c: c.issued_at)
        ],
        "denied": dict(report.denied),
        "legacy_in_use": sorted(
            {c.issuer for c in report.credentials.values() if c.legacy and c.uses}
        ),
        "reloads": dict(report.reloads),
        "break_glass": list(report.break_glass.values()),
    }
