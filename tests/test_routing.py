"""Route matching: longest prefix, Host precedence, segment boundaries, prefix stripping."""

from proxy.config import Credential, Route
from proxy.routing import RouteTable, Target, request_host


def _route(name, prefix=None, host=None, strip=True):
    return Route(
        name=name,
        path_prefix=prefix,
        host=host,
        strip_prefix=strip,
        upstream="https://u.example",
        credential=Credential(issuer="i"),
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
    """The upstream path is prefixed; htu omits the query and the default port."""
    target = Target.of("https://u.example:443/base/")
    assert str(target.url_for("/x%2Fy?q=%20")) == "https://u.example/base/x%2Fy?q=%20"
    assert target.htu_for("/x") == "https://u.example/base/x"
    assert Target.of("http://127.0.0.1:8080").htu_for("/") == "http://127.0.0.1:8080/"


def test_normalize_path_decodes_unreserved_and_removes_dot_segments():
    """RFC 3986 §6.2.2: unreserved escapes decoded, others upper-cased, dot segments removed."""
    from proxy.routing import normalize_path

    assert normalize_path("/a/%7e%41/%c3%a9") == ("/a/~A/%C3%A9", "/a/~A/%C3%A9")
    assert normalize_path("/a/%2E%2E/b") == ("/a/../b", "/b")
    assert normalize_path("/a/./b/.")[1] == "/a/b/"
    assert normalize_path("/../../x")[1] == "/x"


def test_normalize_path_refuses_ambiguous_forms():
    """Encoded '/', '\\' and NUL, backslashes, empty segments and bad escapes are refused."""
    import pytest

    from proxy.errors import InvalidPath
    from proxy.routing import normalize_path

    for raw in ("/a%2fb", "/a%2Fb", "/a%5cb", "/a%00", "/a\\b", "/a//b", "/a%4", "/a%g1"):
        with pytest.raises(InvalidPath):
            normalize_path(raw)
