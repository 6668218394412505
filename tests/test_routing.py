"""Route matching: longest prefix, Host precedence, segment boundaries, prefix stripping; path
normalization and override headers, also against a running credproxy."""

import asyncio
import json
from collections.abc import Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.config.credential import DPoPCredential
from proxy.config.model import RouteConfig
from proxy.inbound.routing import RouteTable, Target, request_host
from tests.counterparts import LEDGER, PREAMBLE
from tests.raw_upstream import RawUpstream


def _route(name, prefix=None, host=None, strip=True, path=None):
    return RouteConfig(
        name=name,
        path_prefix=prefix,
        host=host,
        strip_prefix=strip,
        upstream="https://u.example",
        credential=DPoPCredential(issuer="i"),
        path=path,
    )


TABLE = RouteTable(
    [
        _route("api", "/api/"),
        _route("api-v2", "/api/v2/"),
        _route("kept", "/keep/", strip=False),
        _route("host", host="payments.local"),
        _route("host-api", "/api/", host="payments.local"),
    ]
)


def test_longest_prefix_wins_and_prefix_is_stripped():
    """/api/v2/x goes to the more specific route, forwarded without its prefix."""
    assert TABLE.match(None, "/api/v2/x") == (1, "/x")
    assert TABLE.match(None, "/api/v1/x") == (0, "/v1/x")
    assert TABLE.match(None, "/api") == (0, "/")


def test_prefix_matches_whole_segments_only():
    """/apix is not under /api/."""
    assert TABLE.match(None, "/apix/1") is None


def test_kept_prefix_and_host_routes():
    """strip_prefix false keeps the path; a Host route takes its host, a Host+prefix route wins there."""
    assert TABLE.match(None, "/keep/a") == (2, "/keep/a")
    assert TABLE.match("payments.local", "/anything") == (3, "/anything")
    assert TABLE.match("payments.local", "/api/x") == (4, "/x")
    assert TABLE.match("other.local", "/anything") is None


def test_request_host_parsing():
    """Ports and IPv6 brackets are removed, case folded."""
    assert request_host("Payments.Local:15001") == "payments.local"
    assert request_host("[::1]:8080") == "::1"
    assert request_host(None) is None


def test_target_urls_and_htu():
    """The upstream path is prefixed, the forwarded bytes kept as sent; htu omits the query
    and the default port."""
    target = Target.of("https://u.example:443/base/")
    assert target.origin == "https://u.example"
    assert target.path_qs_for("/x%2Fy?q=%20") == "/base/x%2Fy?q=%20"
    assert target.htu_for("/x") == "https://u.example/base/x"
    root = Target.of("http://127.0.0.1:8080")
    assert root.htu_for("/") == "http://127.0.0.1:8080/" and root.path_qs_for("/a?b") == "/a?b"


# -- path modes: forward what the app sent, or refuse (invariant 11) ----------------------------

MODES = RouteTable(
    [
        _route("api", "/api/"),
        _route("blob", "/blob/", path="opaque"),
        _route("admin", "/admin/"),
    ]
)


def test_normalized_route_forwards_canonical_paths_as_sent():
    """A path normalizing leaves unchanged is forwarded as sent, escapes' hex case included."""
    assert MODES.route(None, "/api/v1/caf%c3%a9;v=1") == (0, "/v1/caf%c3%a9;v=1")
    assert MODES.route(None, "/api/v1/%C3%A9~x") == (0, "/v1/%C3%A9~x")
    assert MODES.route(None, "/nowhere") is None


@pytest.mark.parametrize(
    "raw",
    ["/api/a/./b", "/api/a/../b", "/api/a/%2e%2E/b", "/api/a/.", "/api/%7Euser", "/api/%41", "/%61pi/x"],
)  # fmt: skip
def test_normalized_route_refuses_what_normalizing_would_rewrite(raw):
    """Dot segments and escaped unreserved characters are refused with path_not_canonical,
    named after the route, never rewritten."""
    from proxy.errors import PathNotCanonical

    with pytest.raises(PathNotCanonical) as refused:
        MODES.route(None, raw)
    assert refused.value.code == "path_not_canonical"
    assert refused.value.route == ("api" if raw.startswith("/api/") else None)


def test_normalized_route_keeps_the_routing_refusals():
    """'//', encoded '/', double encoding, '..;' and NFKC punctuation stay refused; '..' out
    of the route is path_escapes_route."""
    from proxy.errors import InvalidPath, PathEscapesRoute

    for raw in ("/api/a//b", "/api/a%2Fb", "/api/%252e%252e/x", "/api/..;/x", "/api/%EF%BC%8F"):
        with pytest.raises(InvalidPath):
            MODES.route(None, raw)
    for raw in ("/api/../admin/x", "/api/%2e%2e/blob/x"):
        with pytest.raises(PathEscapesRoute):
            MODES.route(None, raw)


@pytest.mark.parametrize(
    "raw",
    ["/blob/dir/../dots.txt", "/blob/dir//double.txt", "/blob/a%2Fb", "/blob/%7E%41", "/blob/./x",
     "/blob/a%20b/caf%C3%A9", "/blob/%252e", "/blob/..;/x", "/blob/%EF%BC%8F", "/blob/a\\b", "/blob/"],
)  # fmt: skip
def test_opaque_route_forwards_the_raw_bytes_after_its_prefix(raw):
    """On an opaque route nothing is normalized or refused for its form: the bytes after the
    prefix are forwarded (and checked by the policy) exactly as sent."""
    assert MODES.route(None, raw) == (1, raw[len("/blob") :])


@pytest.mark.parametrize("raw", ["/blob/a%00b", "/blob/a\x00b", "/blob/a\rb", "/blob/a\nb"])
def test_opaque_route_still_refuses_nul_cr_lf(raw):
    """NUL, CR and LF, raw or NUL as %00, are refused even on an opaque route."""
    from proxy.errors import InvalidPath

    with pytest.raises(InvalidPath) as refused:
        MODES.route(None, raw)
    assert refused.value.route == "blob"


def test_opaque_is_matched_on_the_raw_prefix():
    """An encoded prefix does not reach an opaque route: it is refused as not canonical."""
    from proxy.errors import PathNotCanonical

    with pytest.raises(PathNotCanonical):
        MODES.route(None, "/bl%6Fb/x")


def test_sigv4_s3_routes_default_to_opaque_others_to_normalized():
    """path defaults to opaque for sigv4 to s3 (named or from the host), normalized elsewhere;
    an explicit path wins."""
    from proxy.config.credential import SigV4Credential

    def sigv4(upstream, service=None, path=None):
        return RouteConfig(
            name="r", path_prefix="/r/", upstream=upstream, path=path,
            credential=SigV4Credential(issuer="aws", inject="sigv4", service=service, region="us-east-1"),
        )  # fmt: skip

    assert sigv4("https://s3.us-east-1.amazonaws.com").path_mode == "opaque"
    assert sigv4("http://127.0.0.1:9000", service="s3").path_mode == "opaque"
    assert sigv4("http://127.0.0.1:9000", service="s3", path="normalized").path_mode == "normalized"
    assert sigv4("https://dynamodb.us-east-1.amazonaws.com").path_mode == "normalized"
    assert _route("x", "/x/").path_mode == "normalized"


@pytest.mark.parametrize(
    ("answer_as", "protocol"),
    [("s3_xml", "rest-xml"), ("aws_xml", "query"), ("aws_xml", "ec2"), ("aws_json", "json"), ("aws_json", "rest-json")],
)  # fmt: skip
def test_refusals_in_aws_formats_parse_in_botocore(answer_as, protocol):
    """botocore's own parser for each protocol reads credproxy's code and detail from a refusal
    written in that route's format."""
    from botocore.parsers import create_parser

    from proxy.errors import PathNotCanonical

    refusal = PathNotCanonical(route="s3")
    refusal.answer_as = answer_as
    headers, body = refusal.answer()
    parsed = create_parser(protocol).parse(
        {"status_code": refusal.status, "headers": headers, "body": body}, None
    )
    assert parsed["Error"]["Code"] == "path_not_canonical"
    assert parsed["Error"]["Message"] == refusal.public_detail


def test_guard_knows_its_own_listener_in_absolute_form():
    """An absolute-form authority names the listener when it is loopback, localhost or a
    configured local name with the port of the socket it arrived on; a route host, another
    port, https or a Unix socket never do."""
    from proxy.inbound.guard import Guard

    guard = Guard(["svc.local", "payments.local"], ["svc.local"])
    sockname = ("127.0.0.1", 15001)
    for host in ("127.0.0.1", "localhost", "::1", "svc.local", "127.0.0.2"):
        assert guard.is_listener("http", host, 15001, sockname), host
    assert not guard.is_listener("http", "payments.local", 15001, sockname)
    assert not guard.is_listener("http", "example.com", 15001, sockname)
    assert not guard.is_listener("http", "127.0.0.1", 80, sockname)
    assert not guard.is_listener("https", "127.0.0.1", 15001, sockname)
    assert not guard.is_listener("http", "localhost", 15001, "/run/credproxy/app.sock")


def test_normalize_path_decodes_unreserved_and_removes_dot_segments():
    """RFC 3986 §6.2.2: unreserved escapes decoded, others upper-cased, dot segments removed."""
    from proxy.inbound.routing import normalize_path

    assert normalize_path("/a/%7e%41/%c3%a9") == ("/a/~A/%C3%A9", "/a/~A/%C3%A9")
    assert normalize_path("/a/%2E%2E/b") == ("/a/../b", "/b")
    assert normalize_path("/a/./b/.")[1] == "/a/b/"
    assert normalize_path("/../../x")[1] == "/x"


def test_normalize_path_refuses_ambiguous_forms():
    """Encoded '/', '\\' and NUL, backslashes, empty segments and bad escapes are refused."""
    import pytest

    from proxy.errors import InvalidPath
    from proxy.inbound.routing import normalize_path

    for raw in ("/a%2fb", "/a%2Fb", "/a%5cb", "/a%00", "/a\\b", "/a//b", "/a%4", "/a%g1"):
        with pytest.raises(InvalidPath):
            normalize_path(raw)


ATTACK_PATHS = [
    "/v1/charges/..;/admin",  # Tomcat/Spring: '..;' is '..'
    "/v1/charges/.;x=1/../../admin",
    "/v1/charges/%252e%252e/admin",  # decoded twice by some upstreams
    "/v1/charges/%25%32%65%25%32%65/admin",
    "/v1/charges/%2E%2E%3B/admin",
    "/v1/charges/..%3bjsessionid=1/admin",
    "/v1/charges/%c0%ae%c0%ae/admin",  # overlong UTF-8 '.'
    "/v1/charges/%e0%80%ae%e0%80%ae/admin",
    "/v1/charges/%ef%bc%8e%ef%bc%8e/admin",  # fullwidth dots, '..' under NFKC
    "/v1/charges/%ff",
    # non-ASCII that NFKC folds to ASCII punctuation: '../admin', '..\\admin', '..;/', '%2e%2e/'
    "/v1/charges/%EF%BC%8E%EF%BC%8E%EF%BC%8Fadmin",  # ．．／
    "/v1/charges/..%EF%BC%8Fadmin",  # ／ fullwidth solidus
    "/v1/charges/..%EF%BC%BCadmin",  # ＼ fullwidth reverse solidus
    "/v1/charges/%E2%80%A5%EF%BC%8Fadmin",  # ‥ two dot leader
    "/v1/charges/%EF%B9%92%EF%B9%92/admin",  # ﹒﹒ small full stops
    "/v1/charges/..%EF%BC%9B/admin",  # ； fullwidth semicolon
    "/v1/charges/%EF%B9%AA2e%EF%B9%AA2e/admin",  # ﹪ small percent sign
    "/v1/charges/x%EF%BC%9Fy",  # ？ a query in disguise
]
# Percent-encoded, as a request line carries non-ASCII (raw UTF-8 there is a malformed request).
LEGIT_NON_ASCII = ["/v1/charges/caf%C3%A9", "/v1/charges/%E6%97%A5%E6%9C%AC"]


def test_normalize_path_refuses_what_upstreams_read_differently():
    """Dot segments with parameters, double encoding and escapes that are not UTF-8 are refused;
    parameters elsewhere, '%25' before non-hex and valid UTF-8 still pass."""
    import pytest

    from proxy.errors import InvalidPath
    from proxy.inbound.routing import normalize_path

    for raw in [*ATTACK_PATHS, "/v1/charges/．．／admin", "/v1/charges/..＼admin"]:
        with pytest.raises(InvalidPath):
            normalize_path(raw)  # raw text too: a URL override header may carry it
    assert normalize_path("/a/b;v=1/%c3%a9/100%25off")[1] == "/a/b;v=1/%C3%A9/100%25off"
    for raw in [*LEGIT_NON_ASCII, "/files/café", "/files/日本/Ångström"]:
        assert normalize_path(raw)[1] == raw


def test_overridden_names_every_method_and_path_an_upstream_may_serve_instead():
    """Method overrides (a list too) and URL overrides (absolute, with query, dotted) are
    what the policy must also allow; a URL override that is no path is refused."""
    import pytest
    from multidict import CIMultiDict

    from proxy.errors import InvalidPath
    from proxy.inbound.routing import overridden

    headers = CIMultiDict(
        [("X-HTTP-Method-Override", "delete"), ("X-Original-URL", "http://h/a/../admin?x=1")]
    )
    assert overridden(headers, "POST", "/v1") == [
        ("DELETE", "/admin"), ("DELETE", "/v1"), ("POST", "/admin")
    ]  # fmt: skip
    assert overridden(CIMultiDict({"X-Method-Override": "GET, PUT"}), "GET", "/v1") == [
        ("PUT", "/v1")
    ]
    with pytest.raises(InvalidPath):
        overridden(CIMultiDict({"X-Rewrite-URL": "admin"}), "GET", "/v1")


# -- end to end: the attacks through a running credproxy, at an upstream that records all -------

OVERRIDES = [
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("X-Override-URL", "/admin"),
    ("X-Original-URI", "/admin"),
]


@pytest.fixture
def recorder():
    upstream = RawUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def sidecar(recorder, credproxy, tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text("routing-test-key-0123456789\n")
    LEDGER.secret("routing-test-key-0123456789")
    common = f"""upstream: "{recorder.origin}"
    credential: {{issuer: key, inject: header, header: X-Api-Key}}"""
    return credproxy(f"""\
{PREAMBLE}issuers:
  key: {{type: static, secret_file: {key_file}}}
routes:
  - name: charges
    path_prefix: /pay/
    {common}
    allow: [{{callers: [test-suite], methods: [GET, POST], paths: ["/v1/charges/**"]}}]
  - name: overridable
    path_prefix: /ovr/
    allow_method_override: true
    {common}
    allow: [{{callers: [test-suite], methods: [POST], paths: ["/v1/charges/**"]}}]
audit: {{file: "{{audit}}"}}
""")


async def _send(proc, target: str, headers: Sequence[tuple[str, str]] = ()) -> tuple[int, bytes]:
    """One POST with ``target`` exactly as given (no client normalizes it); status and body."""
    port = int(proc.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    writer.write(
        f"POST {target} HTTP/1.1\r\nHost: localhost\r\n{lines}"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode()
    )
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("path", ATTACK_PATHS)
async def test_paths_an_upstream_reads_as_another_are_refused_before_the_upstream(
    path, sidecar, recorder
):
    """Each disguised way out of /v1/charges/** is a 400 invalid_path; the upstream sees nothing."""
    status, body = await _send(sidecar, "/pay" + path)
    assert status == 400 and json.loads(body)["code"] == "invalid_path"
    assert recorder.received == b""


async def test_override_headers_never_reach_the_upstream_by_default(sidecar, recorder):
    """An allowed POST carrying every method/URL override header is forwarded without them."""
    status, _ = await _send(sidecar, "/pay/v1/charges/1", OVERRIDES)
    [request] = recorder.requests
    assert status == 200 and request.target == "/v1/charges/1"
    assert not {name.lower() for name, _ in request.headers} & {n.lower() for n, _ in OVERRIDES}


@pytest.mark.parametrize(("name", "value"), OVERRIDES)
async def test_an_allowed_override_is_checked_by_the_policy(name, value, sidecar, recorder):
    """On a route allowing overrides, the overridden method or path must be allowed too (403
    and nothing upstream otherwise); an allowed one is forwarded with its header."""
    status, body = await _send(sidecar, "/ovr/v1/charges/1", [(name, value)])
    assert status == 403 and json.loads(body)["code"] == "path_not_allowed"
    assert recorder.received == b""
    allowed = "POST" if "Method" in name else "/v1/charges/2"
    status, _ = await _send(sidecar, "/ovr/v1/charges/1", [(name, allowed)])
    [request] = recorder.requests
    assert status == 200 and request.values(name) == [allowed]


@pytest.mark.parametrize("path", LEGIT_NON_ASCII)
async def test_non_ascii_path_text_is_forwarded_byte_for_byte(path, sidecar, recorder):
    """Letters beyond ASCII pass the policy and reach the upstream exactly as the app sent them."""
    status, _ = await _send(sidecar, "/pay" + path)
    [request] = recorder.requests
    assert status == 200 and request.target == path


def _linear_find(routes, host, path, host_routes_only):
    """The definition the table must agree with: the longest matching prefix, a route naming
    the Host first among equal prefixes; the first declared among equals."""
    best = None
    for i, route in enumerate(routes):
        prefix = (route.path_prefix or "/").rstrip("/")
        if route.host is not None and route.host != host:
            continue
        if host_routes_only and route.host is None:
            continue
        if path == prefix or path.startswith(prefix + "/") or not prefix:
            rank = (len(prefix), route.host is not None)
            if best is None or rank > best[0]:
                best = (rank, i)
    return None if best is None else best[1]


_SEGMENTS = st.sampled_from(["a", "b", "%41", ""])


@settings(max_examples=300, deadline=None)
@example(  # equal prefixes: the one naming the Host wins
    prefixes=[(["a"], None), (["a"], "h.example")],
    path=["a", "x"],
    host="h.example",
    host_routes_only=False,
)
@example(  # a longer prefix without Host beats a shorter one with it
    prefixes=[(["a"], "h.example"), (["a", "b"], None)],
    path=["a", "b", "c"],
    host="h.example",
    host_routes_only=False,
)
@given(
    prefixes=st.lists(
        st.tuples(
            st.lists(_SEGMENTS.filter(bool), max_size=3),
            st.sampled_from([None, "h.example"]),
        ),
        min_size=1,
        max_size=8,
        unique_by=lambda t: ("/".join(t[0]), t[1]),
    ),
    path=st.lists(_SEGMENTS, max_size=5),
    host=st.sampled_from([None, "h.example", "g.example"]),
    host_routes_only=st.booleans(),
)
def test_the_table_finds_what_a_linear_scan_finds(prefixes, path, host, host_routes_only):
    """Whatever the routes and the path, the segment-by-segment dict lookup picks the route
    the linear longest-prefix scan picks (or none)."""
    routes = [
        _route(f"r{i}", "/" + "/".join(segments) + ("/" if segments else ""), host=route_host)
        if segments or route_host is None
        else _route(f"r{i}", host=route_host)
        for i, (segments, route_host) in enumerate(prefixes)
    ]
    raw = "/" + "/".join(path)
    found = RouteTable(routes).match(host, raw, host_routes_only=host_routes_only)
    expected = _linear_find(routes, host, raw, host_routes_only)
    assert (found[0] if found else None) == expected, (raw, host)
