"""Break-glass: time-boxed exceptions to a route's policy, granted on the control plane only.

A grant names a route, a caller (a name under ``callers``, matched by the kernel's account as
any rule is), optionally methods and path globs, a duration (capped) and a reason (required).
It is consulted only when the route's own rules refuse a request, and every use under it is
audited loudly with the reason. Grants live in memory: a restart (or shutdown) ends them all.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..audit.trail import Audit
from ..config.model import CallerRule
from ..errors import InvalidControlRequest, UnknownName
from ..log import server_log
from ..metrics import Metrics
from .callers import Caller
from .policy import CallerMatcher, compile_glob

_DURATION = re.compile(r"^([0-9]+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_METHOD = re.compile(r"^[A-Z]{1,16}$")


def parse_duration(value: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d``."""
    match = _DURATION.match(value)
    if not match or int(match[1]) == 0:
        raise InvalidControlRequest(f"duration {value[:20]!r}: use e.g. 90s, 15m, 2h, 1d")
    return float(int(match[1]) * _SECONDS[match[2]])


@dataclass(eq=False)
class Grant:
    id: str
    route: str
    caller: str
    methods: tuple[str, ...] | None
    paths: tuple[str, ...]
    reason: str
    granted_by: dict[str, object]
    granted_at: float
    expires_at: float
    uses: int = 0
    _patterns: list[re.Pattern[str]] = field(default_factory=list, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id, "route": self.route, "caller": self.caller,
            "methods": list(self.methods) if self.methods else None, "paths": list(self.paths),
            "reason": self.reason, "granted_by": self.granted_by,
            "granted_at": round(self.granted_at, 3), "expires_at": round(self.expires_at, 3),
            "uses": self.uses,
        }  # fmt: skip


class BreakGlass:
    """The active grants of one process."""

    def __init__(
        self, audit: Audit, metrics: Metrics, *, max_duration_s: float, max_grants: int
    ) -> None:
        self._audit = audit
        self._metrics = metrics
        self.max_duration_s = max_duration_s
        self.max_grants = max_grants
        self._grants: dict[str, Grant] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def active(self) -> list[dict[str, Any]]:
        return [g.describe() for g in self._grants.values()]

    def grant(
        self,
        request: Mapping[str, Any],
        *,
        routes: set[str],
        callers: Mapping[str, CallerRule],
        granted_by: Caller,
    ) -> Grant:
        """Validate a grant request (route, caller, for, reason; methods, paths) and start it."""
        route, caller, reason = request.get("route"), request.get("caller"), request.get("reason")
        if not isinstance(route, str) or route not in routes:
            raise UnknownName(f"no route named {str(route)[:100]!r}")
        if not isinstance(caller, str) or caller not in callers:
            raise UnknownName(f"no caller named {str(caller)[:100]!r} under callers")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
            raise InvalidControlRequest("a reason (1 to 500 characters) is required")
        duration = request.get("for")
        duration_s = parse_duration(duration) if isinstance(duration, str) else 0.0
        if not 0 < duration_s <= self.max_duration_s:
            raise InvalidControlRequest(
                f"'for' must be a duration up to control.break_glass.max_duration_s "
                f"({self.max_duration_s:g}s)"
            )
        methods = _strings(request.get("methods"), "methods")
        if methods is not None and not all(_METHOD.match(m) for m in methods):
            raise InvalidControlRequest("methods are upper-case tokens such as GET")
        paths = _strings(request.get("paths"), "paths") or ("/**",)
        try:
            patterns = [compile_glob(p) for p in paths if p.startswith("/")]
        except re.error:
            patterns = []
        if len(patterns) != len(paths):
            raise InvalidControlRequest("paths are globs starting with /")
        if len(self._grants) >= self.max_grants:
            raise InvalidControlRequest(
                f"{len(self._grants)} grants are active: control.break_glass.max_grants"
            )
        now = time.time()
        grant = Grant(
            id=secrets.token_hex(6), route=route, caller=caller, methods=methods, paths=paths,
            reason=reason.strip(), granted_by=granted_by.attributes(), granted_at=now,
            expires_at=now + duration_s, _patterns=patterns,
        )  # fmt: skip
        self._grants[grant.id] = grant
        loop = asyncio.get_running_loop()
        self._timers[grant.id] = loop.call_later(duration_s, self._end, grant.id, "expired")
        self._audit.emit("policy.break_glass.granted", **grant.describe())
        server_log.warning(
            "BREAK-GLASS granted %s: route %s for caller %s until %s: %s",
            grant.id, route, caller, time.strftime("%H:%M:%SZ", time.gmtime(grant.expires_at)),
            grant.reason,
        )  # fmt: skip
        self._gauge(route)
        return grant

    def permits(
        self,
        route: str,
        caller: Caller,
        method: str,
        path: str,
        callers: Mapping[str, CallerRule],
    ) -> Grant | None:
        """The grant that lets this refused request through, its use audited; else None."""
        now = time.time()
        for grant in list(self._grants.values()):
            if grant.route != route or grant.caller not in callers:
                continue
            if grant.expires_at <= now:  # its timer is due: end it now, not after this request
                self._end(grant.id, "expired")
                continue
            if grant.methods is not None and method not in grant.methods:
                continue
            if not any(p.fullmatch(path) for p in grant._patterns):
                continue
            if not CallerMatcher(grant.caller, callers[grant.caller]).matches(caller):
                continue
            grant.uses += 1
            self._metrics.break_glass_uses.labels(route).inc()
            self._audit.emit(
                "policy.break_glass.used", id=grant.id, route=route, caller_name=grant.caller,
                caller=caller.attributes(), method=method[:16], path=path[:256],
                reason=grant.reason,
            )  # fmt: skip
            server_log.warning(
                "BREAK-GLASS use %s: %s %s on route %s by %s (%s)",
                grant.id, method[:16], path[:100], route, grant.caller, grant.reason,
            )  # fmt: skip
            return grant
        return None

    def close(self) -> None:
        """Shutdown: every grant ends (they are never persisted)."""
        for grant_id in list(self._grants):
            self._end(grant_id, "shutdown")

    def _end(self, grant_id: str, why: str) -> None:
        grant = self._grants.pop(grant_id, None)
        timer = self._timers.pop(grant_id, None)
        if timer is not None:
            timer.cancel()
        if grant is None:
            return
        self._audit.emit(
            "policy.break_glass.expired", id=grant.id, route=grant.route, caller_name=grant.caller,
            uses=grant.uses, reason=grant.reason, ended=why,
        )  # fmt: skip
        server_log.warning("BREAK-GLASS %s ended (%s) after %d use(s)", grant.id, why, grant.uses)
        self._gauge(grant.route)

    def _gauge(self, route: str) -> None:
        count = sum(g.route == route for g in self._grants.values())
        self._metrics.break_glass_active.labels(route).set(count)


def _strings(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidControlRequest(f"{name} must be a non-empty list of strings")
    return tuple(value)
