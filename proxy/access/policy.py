"""Who may use a route: caller × method × path → allow, or a 403. Default deny, fail closed.

Caller attributes come from ``callers.Caller`` (the kernel's account); an attribute that could
not be determined never matches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ..config.model import AllowRule, CallerRule
from ..errors import CallerNotAllowed, PathNotAllowed
from .callers import Caller


def compile_glob(pattern: str) -> re.Pattern[str]:
    """``*`` matches within one segment, a ``**`` segment matches any number of segments."""
    regex = ""
    for part in pattern.split("/")[1:]:
        if part == "**":
            regex += "(?:/[^/]*)*"
        else:
            regex += "/" + "[^/]*".join(re.escape(piece) for piece in part.split("*"))
    return re.compile(regex)


class CallerMatcher:
    __slots__ = ("name", "_rule")

    def __init__(self, name: str, rule: CallerRule) -> None:
        self.name = name
        self._rule = rule

    @property
    def needs_process(self) -> bool:
        """Whether the rule names an attribute read from the processes holding the socket."""
        rule = self._rule
        return (rule.exe, rule.exe_sha256, rule.cgroup, rule.gid) != (None, None, None, None)

    def matches(self, caller: Caller) -> bool:
        rule = self._rule
        if not caller.identified:
            return False  # unknown never matches, not even any_local
        if rule.any_local:
            return True
        # Cheapest first: uid needs no lookup; pid-derived attributes read /proc once each.
        return (
            (rule.uid is None or (caller.uid is not None and caller.uid == rule.uid))
            and (rule.gid is None or (caller.gid is not None and caller.gid == rule.gid))
            and (rule.exe is None or (caller.exe is not None and caller.exe == rule.exe))
            and (rule.cgroup is None or _under(caller.cgroup, rule.cgroup))
            and (rule.exe_sha256 is None or caller.exe_sha256 == rule.exe_sha256)
        )


def _under(cgroup: str | None, prefix: str) -> bool:
    if cgroup is None:
        return False
    prefix = prefix.rstrip("/")
    return cgroup == prefix or cgroup.startswith(prefix + "/") or prefix == ""


class _CompiledRule:
    __slots__ = ("callers", "methods", "paths")

    def __init__(self, rule: AllowRule, callers: Mapping[str, CallerRule]) -> None:
        self.callers = [CallerMatcher(name, callers[name]) for name in rule.callers]
        self.methods = frozenset(rule.methods) if rule.methods is not None else None
        self.paths = [compile_glob(p) for p in rule.paths]


class Admission:
    """The check at accept, before a byte is read: a connection whose caller matches no rule
    under ``callers`` (so no route could ever allow it) is closed right there."""

    def __init__(self, callers: Mapping[str, CallerRule]) -> None:
        self._matchers = [CallerMatcher(name, rule) for name, rule in callers.items()]

    def admits(self, caller: Caller) -> bool:
        return any(matcher.matches(caller) for matcher in self._matchers)


class RoutePolicy:
    """The compiled ``allow`` rules of one route. ``needs_process``: a rule names a process
    attribute, so the socket's holders are scanned again for each request (``Caller.recheck``)."""

    def __init__(self, rules: Sequence[AllowRule], callers: Mapping[str, CallerRule]) -> None:
        self._rules = [_CompiledRule(rule, callers) for rule in rules]
        self.needs_process = any(m.needs_process for r in self._rules for m in r.callers)

    def permits(self, caller: Caller, method: str, path: str | None) -> bool:
        """Whether a rule allows this caller and method, and path when known: the evidence
        report's check of recorded uses."""
        return any(
            any(m.matches(caller) for m in rule.callers)
            and (rule.methods is None or method in rule.methods)
            and (path is None or any(p.fullmatch(path) for p in rule.paths))
            for rule in self._rules
        )

    def check(self, caller: Caller, method: str, path: str) -> str:
        """Return the name of the caller rule that allowed the request, or raise a 403.
        Per request: plain loops, no generator per rule."""
        known_caller = False
        for rule in self._rules:
            for matcher in rule.callers:
                if matcher.matches(caller):
                    break
            else:
                continue
            known_caller = True
            if rule.methods is None or method in rule.methods:
                for pattern in rule.paths:
                    if pattern.fullmatch(path):
                        return matcher.name
        if known_caller:
            raise PathNotAllowed(f"{method} {path} is not allowed for this caller")
        raise CallerNotAllowed("no allow rule of this route matches the caller")
