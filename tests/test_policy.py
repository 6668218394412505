"""Policy and guards without processes: caller matching (fail closed), globs, Host/Origin rules."""

import pytest

from proxy.access.callers import UNKNOWN, Caller
from proxy.access.policy import Admission, RoutePolicy, compile_glob
from proxy.config.loader import parse
from proxy.config.model import AllowRule, CallerRule
from proxy.errors import (
    BrowserRefused,
    CallerNotAllowed,
    HostNotAllowed,
    MethodRefused,
    PathNotAllowed,
)
from proxy.inbound.guard import Guard

CALLERS = {
    "app": CallerRule(uid=1000),
    "pinned": CallerRule(uid=1000, exe="/usr/local/bin/orders"),
    "anyone": CallerRule(any_local=True),
}


def _caller(uid, exe=None):
    caller = Caller("unix", uid, gid=uid, pid=4242)
    caller._exe = exe  # what /proc/4242/exe would say
    return caller


def test_globs_match_single_and_multiple_segments():
    """'*' stays within a segment, '**' spans any number, including none."""
    assert compile_glob("/v1/*/status").fullmatch("/v1/abc/status")
    assert not compile_glob("/v1/*/status").fullmatch("/v1/a/b/status")
    assert compile_glob("/v1/charges/**").fullmatch("/v1/charges")
    assert compile_glob("/v1/charges/**").fullmatch("/v1/charges/a/b")
    assert not compile_glob("/v1/charges/**").fullmatch("/v1/chargesX")
    assert compile_glob("/**").fullmatch("/")
    assert compile_glob("/v1/*.json").fullmatch("/v1/a.json")
    assert not compile_glob("/v1/a.b").fullmatch("/v1/aXb")  # '.' is literal


def test_default_deny_and_caller_then_path_reasons():
    """No rules refuses everyone; a matching caller with the wrong path is path_not_allowed."""
    with pytest.raises(CallerNotAllowed):
        RoutePolicy([], CALLERS).check(_caller(1000), "GET", "/")
    policy = RoutePolicy(
        [AllowRule(callers=("app",), methods=("GET",), paths=("/v1/**",))], CALLERS
    )
    assert policy.check(_caller(1000), "GET", "/v1/x") == "app"
    with pytest.raises(PathNotAllowed):
        policy.check(_caller(1000), "DELETE", "/v1/x")
    with pytest.raises(PathNotAllowed):
        policy.check(_caller(1000), "GET", "/admin")
    with pytest.raises(CallerNotAllowed):
        policy.check(_caller(1001), "GET", "/v1/x")


def test_rules_are_tried_in_turn_and_name_the_caller_entry_that_matched():
    """A rule whose callers do not match hands over to the next; the answer names the first
    matching caller entry of the rule that allows the request."""
    policy = RoutePolicy(
        [
            AllowRule(callers=("pinned",), paths=("/admin/**",)),
            AllowRule(callers=("pinned", "app"), methods=("GET",), paths=("/v1/**",)),
        ],
        CALLERS,
    )
    orders, other = _caller(1000, exe="/usr/local/bin/orders"), _caller(1000, exe="/tmp/x")
    assert policy.check(orders, "GET", "/admin/x") == "pinned"
    assert policy.check(orders, "GET", "/v1/x") == "pinned"
    assert policy.check(other, "GET", "/v1/x") == "app"
    with pytest.raises(PathNotAllowed):
        policy.check(other, "GET", "/admin/x")
    with pytest.raises(PathNotAllowed):
        policy.check(other, "POST", "/v1/x")


def test_unknown_attributes_and_unknown_callers_fail_closed_even_for_any_local():
    """A caller whose uid or exe could not be determined never matches a rule naming them, and
    a caller the kernel did not positively identify matches no rule, any_local included."""
    pinned = RoutePolicy([AllowRule(callers=("pinned",))], CALLERS)
    with pytest.raises(CallerNotAllowed):
        pinned.check(_caller(1000, exe=None), "GET", "/")
    with pytest.raises(CallerNotAllowed):
        pinned.check(_caller(1000, exe="/tmp/orders"), "GET", "/")
    assert pinned.check(_caller(1000, exe="/usr/local/bin/orders"), "GET", "/") == "pinned"
    with pytest.raises(CallerNotAllowed):
        RoutePolicy([AllowRule(callers=("app",))], CALLERS).check(UNKNOWN, "GET", "/")
    anyone = RoutePolicy([AllowRule(callers=("anyone",))], CALLERS)
    with pytest.raises(CallerNotAllowed):
        anyone.check(UNKNOWN, "GET", "/")
    assert anyone.check(_caller(65534), "GET", "/") == "anyone"
    recorded = Caller.recorded({"transport": "tcp", "uid": 0})  # an old audit line, or inode 0
    with pytest.raises(CallerNotAllowed):
        anyone.check(recorded, "GET", "/")


def test_caller_rules_need_an_attribute_and_any_local_stands_alone():
    """An empty caller rule is an error; any_local must be explicit and alone."""
    with pytest.raises(ValueError, match="at least one"):
        CallerRule()
    with pytest.raises(ValueError, match="cannot be combined"):
        CallerRule(any_local=True, uid=0)


def test_guard_refuses_foreign_hosts_browsers_and_connect():
    """Loopback literals, localhost and configured names pass; anything else is refused."""
    guard = Guard(["payments.local"])
    for host in ("localhost", "127.0.0.1", "127.9.9.9", "::1", "payments.local"):
        guard.check("GET", host, {}, forward_proxy=False)
    hosts: list[str | None] = ["evil.example", "127.0.0.1.nip.io", None, "0.0.0.0"]
    for foreign in hosts:
        with pytest.raises(HostNotAllowed):
            guard.check("GET", foreign, {}, forward_proxy=False)
    with pytest.raises(BrowserRefused):
        guard.check("GET", "localhost", {"Origin": "http://localhost"}, forward_proxy=False)
    with pytest.raises(BrowserRefused):
        guard.check("GET", "localhost", {"Sec-Fetch-Site": "same-site"}, forward_proxy=False)
    guard.check("GET", "localhost", {"Sec-Fetch-Site": "none"}, forward_proxy=False)
    with pytest.raises(MethodRefused):
        guard.check("CONNECT", "localhost", {}, forward_proxy=False)


def test_a_cgroup_rule_matches_whole_path_segments_only():
    """A cgroup rule is a prefix of whole segments: /kubepods admits /kubepods and what lies
    under /kubepods/, never a sibling such as /kubepods-evil."""
    config = parse(
        "listen: 127.0.0.1:0\n"
        "issuers: {k: {type: static, secret_file: /k}}\n"
        "callers: {pods: {cgroup: /kubepods}, slash: {cgroup: /kubepods/}}\n"
        "routes: [{name: r, path_prefix: /, upstream: 'https://a.example',\n"
        "  credential: {issuer: k, inject: bearer}, allow: [{callers: [pods]}, {callers: [slash]}]}]\n"
    )
    policy = RoutePolicy(config.routes[0].allow, config.callers)
    admission = Admission(config.callers)

    def in_cgroup(cgroup: str | None):
        caller = _caller(1000)
        caller._cgroup = cgroup  # what /proc/4242/cgroup would say
        return caller

    for inside in ("/kubepods", "/kubepods/", "/kubepods/burstable/pod1/c2"):
        assert policy.check(in_cgroup(inside), "GET", "/") == "pods"
        assert admission.admits(in_cgroup(inside))
    for outside in ("/kubepods-evil", "/kubepods-evil/x", "/kubepodsx/burstable", "/", None):
        with pytest.raises(CallerNotAllowed):
            policy.check(in_cgroup(outside), "GET", "/")
        assert not admission.admits(in_cgroup(outside))
