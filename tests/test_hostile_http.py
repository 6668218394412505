"""Hostile HTTP from the app side (issue 9, part 1): smuggling, malformed framing, oversized
heads, slowloris, pipelining, ``Expect``, HTTP/1.0, absolute-form, ``Upgrade`` and a generative
pass, sent as raw bytes to a running ``credproxy run`` and checked at a raw-socket upstream that
records every byte it receives (``tests/raw_upstream.py``).

Each vector gets a refusal or correct handling, and the upstream sees either nothing or exactly
one request in the proxy's own framing.
"""

from __future__ import annotations

import gzip
import json
import secrets
import socket
import string
import subprocess
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.counterparts import (
    LEDGER,
    NOBODY,
    PREAMBLE,
    Credproxy,
    attacker_command,
    wait_until,
)
from tests.raw_upstream import RawUpstream, Request

SECRET = "hostile-static-key-" + secrets.token_hex(12)
# Never forwarded: hop-by-hop (RFC 9110 §7.6.1) and app-supplied credentials.
NOT_UPSTREAM = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
    "authorization", "proxy-authorization", "dpop",
})  # fmt: skip
H = b"Host: localhost\r\n"
CLOSE = b"Connection: close\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"


def _post(fields: bytes, body: bytes = b"", target: bytes = b"/api/x") -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\n" + H + CLOSE + fields + b"\r\n" + body


def _get(fields: bytes = b"", target: bytes = b"/api/x", version: bytes = b"1.1") -> bytes:
    return b"GET " + target + b" HTTP/" + version + b"\r\n" + H + CLOSE + fields + b"\r\n"


# -- talking to the sidecar over raw sockets ---------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def parse_responses(data: bytes, *, head: bool = False) -> list[Response]:
    """The complete responses in ``data``, in order; an incomplete tail is left out. ``head``:
    the first answers a HEAD request (no body whatever its Content-Length says)."""
    responses: list[Response] = []
    while (end := data.find(b"\r\n\r\n")) >= 0:
        line, *fields = data[:end].decode("latin-1").split("\r\n")
        status = int(line.split(" ", 2)[1])
        headers = [(k.strip(), v.strip()) for k, _, v in (f.partition(":") for f in fields)]
        rest = data[end + 4 :]
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        coding = next((v for k, v in headers if k.lower() == "transfer-encoding"), None)
        if 100 <= status < 200 or status in (204, 304) or (head and not responses):
            body = b""
        elif length is not None:
            if len(rest) < int(length):
                break
            body, rest = rest[: int(length)], rest[int(length) :]
        elif coding == "chunked":
            body = b""
            while (eol := rest.find(b"\r\n")) >= 0 and (size := int(rest[:eol], 16)):
                body, rest = body + rest[eol + 2 : eol + 2 + size], rest[eol + 4 + size :]
            if eol < 0:
                break
            rest = rest[eol + 4 :]  # the last chunk and the empty trailer section
        else:
            body, rest = rest, b""
        responses.append(Response(status, headers, body))
        data = rest
    return responses


@dataclass
class Reply:
    """What one connection got back: the bytes, whether the sidecar closed it, how much was sent."""

    data: bytes = b""
    head: bool = False  # the (first) request was HEAD
    closed: bool = False
    parts_sent: int = 0  # of the parts given to ``exchange``, before it stopped sending

    @property
    def responses(self) -> list[Response]:
        return parse_responses(self.data, head=self.head)

    @property
    def status(self) -> int | None:
        """The first final status, or None if no complete final response arrived."""
        return next((r.status for r in self.responses if r.status >= 200), None)


def exchange(
    port: int, *parts: bytes, gap_s: float = 0.0, wait_s: float = 3.0, answers: int | None = None
) -> Reply:
    """Send ``parts`` on one connection, reading during the ``gap_s`` between them, then read
    until the sidecar closes the connection, ``answers`` final responses are complete, or
    ``wait_s`` passes. Sending stops early when the sidecar has already answered or closed."""
    reply = Reply(head=parts[0].startswith(b"HEAD "))
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:

        def read_for(duration_s: float) -> bool:
            """Read for ``duration_s``; False once there is nothing more to wait for."""
            deadline = time.monotonic() + duration_s
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    return True
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    reply.closed = True
                    return False
                reply.data += chunk
                finals = [r for r in reply.responses if r.status >= 200]
                if answers is not None and len(finals) >= answers:
                    return False
            return True

        waiting = True
        for i, part in enumerate(parts):
            if i and gap_s and not (waiting := read_for(gap_s)):
                break
            try:
                sock.sendall(part)
            except OSError:
                break  # refused mid-send: what it answered is still there to read
            reply.parts_sent += 1
        if waiting:
            read_for(wait_s)
    return reply


def _port(proc: Credproxy) -> int:
    return int(proc.url.rsplit(":", 1)[1])


def _config(upstream: RawUpstream, workdir: Path, top: str = "") -> str:
    secret_file = workdir / "api-key"
    secret_file.write_text(SECRET + "\n")
    LEDGER.secret(SECRET)
    route = "credential: {issuer: key, inject: header, header: X-Api-Key}\n    allow: [{callers: [test-suite]}]"
    return f"""\
{PREAMBLE}shutdown_timeout_s: 1
{top}
issuers:
  key: {{type: static, secret_file: {secret_file}}}
routes:
  - name: api
    path_prefix: /api/
    upstream: {upstream.origin}
    timeouts: {{idle_s: 3, total_s: 5}}
    {route}
  - name: slow
    path_prefix: /slow/
    upstream: {upstream.origin}
    timeouts: {{idle_s: 1, total_s: 1}}
    {route}
  - name: hosted
    host: api.test
    upstream: {upstream.origin}
    {route}
audit: {{file: "{{audit}}"}}
log: {{format: json}}
"""


@pytest.fixture(scope="module")
def recorder() -> Iterator[RawUpstream]:
    upstream = RawUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def sidecar(recorder: RawUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One credproxy for the whole module (routes /api/, /slow/ and host api.test); its port."""
    workdir = tmp_path_factory.mktemp("hostile")
    proc = Credproxy(workdir, _config(recorder, workdir))
    try:
        proc.start()
        yield _port(proc)
    finally:
        proc.stop()


@pytest.fixture
def upstream(recorder: RawUpstream) -> RawUpstream:
    """The module's recorder, emptied for this test."""
    recorder.clear()
    return recorder


@pytest.fixture
def isolated(
    credproxy: Callable[..., Credproxy], tmp_path: Path
) -> Iterator[Callable[..., tuple[int, RawUpstream]]]:
    """A credproxy and recorder of this test's own (with ``top`` config lines), for vectors that
    leave requests hanging and must not disturb the shared pair."""
    recorders: list[RawUpstream] = []

    def start(top: str = "") -> tuple[int, RawUpstream]:
        own = RawUpstream().start()
        recorders.append(own)
        return _port(credproxy(_config(own, tmp_path, top))), own

    yield start
    for own in recorders:
        own.stop()


def assert_forwarded_cleanly(request: Request, upstream: RawUpstream) -> None:
    """The proxy's own request: its Host, the credential exactly once, nothing hop-by-hop."""
    assert request.values("Host") == [f"127.0.0.1:{upstream.port}"]
    assert request.values("X-Api-Key") == [SECRET]
    assert not {name.lower() for name, _ in request.headers} & NOT_UPSTREAM
    assert request.values("Transfer-Encoding") in ([], ["chunked"])


def assert_serves(port: int, upstream: RawUpstream) -> None:
    """A plain request still goes through, once, with the credential, masked in the echo."""
    before = len(upstream.requests)
    reply = exchange(port, _get(target=b"/api/still-serving"))
    assert reply.status == 200, reply.data[:300]
    assert SECRET.encode() not in reply.data
    assert [r.target for r in upstream.requests[before:]] == ["/still-serving"]
    assert upstream.problems == []


# -- refused by the HTTP parser: 400, connection closed, nothing upstream ------------------------

PARSER_REFUSALS = [
    pytest.param(_post(b"Content-Length: 4\r\n" + CHUNKED, b"0\r\n\r\nGET /api/smuggled HTTP/1.1\r\n" + H + b"\r\n"), id="CL.TE"),
    pytest.param(_post(CHUNKED + b"Content-Length: 4\r\n", b"5c\r\nGPOST /api/smuggled HTTP/1.1\r\n\r\n0\r\n\r\n"), id="TE.CL"),
    pytest.param(_post(b"Content-Length: 4\r\nContent-Length: 40\r\n", b"abcd"), id="duplicate-CL-differing"),
    pytest.param(_post(b"Content-Length: 4\r\nContent-Length: 4\r\n", b"abcd"), id="duplicate-CL-equal"),
    pytest.param(_post(b"Content-Length: 4, 4\r\n", b"abcd"), id="CL-list"),
    pytest.param(_post(b"Content-Length: +4\r\n", b"abcd"), id="CL-plus-sign"),
    pytest.param(_post(b"Content-Length: -1\r\n", b"abcd"), id="CL-negative"),
    pytest.param(_post(b"Content-Length: 0x4\r\n", b"abcd"), id="CL-hex"),
    pytest.param(_post(b"Content-Length: 99999999999999999999999\r\n", b"abcd"), id="CL-overflow"),
    pytest.param(_post(b"Transfer-Encoding: chunked, identity\r\n", b"4\r\nabcd\r\n0\r\n\r\n"), id="TE-chunked-identity"),
    pytest.param(_post(CHUNKED + b"Transfer-Encoding: identity\r\n", b"4\r\nabcd\r\n0\r\n\r\n"), id="TE-twice"),
    pytest.param(_post(b"Transfer-Encoding: xchunked\r\n", b"4\r\nabcd\r\n0\r\n\r\n"), id="TE-xchunked"),
    pytest.param(_post(b"Transfer-Encoding : chunked\r\n", b"4\r\nabcd\r\n0\r\n\r\n"), id="TE-space-before-colon"),
    pytest.param(_post(b"Transfer-Encoding: identity\r\n chunked\r\n", b"4\r\nabcd\r\n0\r\n\r\n"), id="obs-fold-TE"),
    pytest.param(_get(b"X-Folded: a\r\n\tb\r\n"), id="obs-fold"),
    pytest.param(b"GET /api/x HTTP/1.1\nHost: localhost\nConnection: close\n\n", id="bare-LF-everywhere"),
    pytest.param(_get(b"X-A: 1\nTransfer-Encoding: chunked\r\n"), id="bare-LF-in-field"),
    pytest.param(_get(b"X-A: 1\rX-B: 2\r\n"), id="bare-CR-in-field"),
    pytest.param(_get(b"X-A: a\x00b\r\n"), id="NUL-in-value"),
    pytest.param(_get(b"X-\x00A: b\r\n"), id="NUL-in-name"),
    pytest.param(_get(target=b"/api/x\x00y"), id="NUL-in-target"),
    pytest.param(_get(b"X-A: a\x01b\x7f\r\n"), id="CTL-in-value"),
    pytest.param(_get(b": empty-name\r\n"), id="empty-name"),
    pytest.param(_post(CHUNKED, b"0x4\r\nabcd\r\n0\r\n\r\n"), id="chunk-size-0x"),
    pytest.param(_post(CHUNKED, b"-4\r\nabcd\r\n0\r\n\r\n"), id="chunk-size-negative"),
    pytest.param(_post(CHUNKED, b"ffffffffffffffffff\r\nabcd\r\n0\r\n\r\n"), id="chunk-size-overflow"),
    pytest.param(_post(CHUNKED, b"4 \r\nabcd\r\n0\r\n\r\n"), id="chunk-size-trailing-space"),
    pytest.param(_post(CHUNKED, b" 4\r\nabcd\r\n0\r\n\r\n"), id="chunk-size-leading-space"),
    pytest.param(_post(CHUNKED, b"g\r\nabcd\r\n0\r\n\r\n"), id="chunk-size-not-hex"),
    pytest.param(_post(CHUNKED, b"2\r\nabcd\r\n0\r\n\r\n"), id="chunk-longer-than-size"),
    pytest.param(_post(CHUNKED, b"4\nabcd\n0\n\n"), id="chunk-bare-LF"),
    pytest.param(_post(CHUNKED, b"4;a\nb\r\nabcd\r\n0\r\n\r\n"), id="chunk-extension-bare-LF"),
    pytest.param(_post(CHUNKED, b"4\r\nabcd\r\n0\r\nContent-Length: 99\r\n\r\n"), id="CL-in-trailer"),
    pytest.param(_post(CHUNKED, b"1\r\na\r\n0\r\n" + b"".join(b"X-T%d: v\r\n" % i for i in range(200)) + b"\r\n"), id="trailer-count"),
    pytest.param(_post(CHUNKED, b"1\r\na\r\n0\r\nX-T: " + b"v" * 20000 + b"\r\n\r\n"), id="trailer-size"),
    pytest.param(_get(target=b"/api/" + b"a" * 65536), id="request-line-64KiB"),
    pytest.param(_get(b"X-Big: " + b"v" * 65536 + b"\r\n"), id="field-value-64KiB"),
    pytest.param(_get(b"X-" + b"n" * 9000 + b": v\r\n"), id="field-name-9000"),
    pytest.param(_get(b"".join(b"X-H%d: v\r\n" % i for i in range(127))), id="129-fields"),
    pytest.param(_get(b"".join(b"X-H%d: v\r\n" % i for i in range(10000))), id="10000-fields"),
    pytest.param(b"A" * 20000 + b" /api/x HTTP/1.1\r\n" + H + b"\r\n", id="method-20000"),
    pytest.param(b"get /api/x HTTP/1.1\r\n" + H + b"\r\n", id="method-lowercase"),
    pytest.param(b"FOO /api/x HTTP/1.1\r\n" + H + b"\r\n", id="method-unknown"),
    pytest.param(_get(version=b"1.2"), id="HTTP/1.2"),
    # the HTTP/2 preface starts an h2c connection: refusals of a broken one are in test_h2.py
    pytest.param(b"GET /api/x HTTP/1.1\r\n" + CLOSE + b"\r\n", id="HTTP/1.1-without-Host"),
    pytest.param(_get(b"Host: evil.example\r\n"), id="Host-twice"),
    pytest.param(_get(target=b"/api/x y"), id="space-in-target"),
    pytest.param(_get(target=b"/api/x\ty"), id="tab-in-target"),
    pytest.param(_get(target=b"/api/caf\xc3\xa9"), id="non-ASCII-in-path"),
    pytest.param(_get(target=b"/api/x?q=\xff"), id="non-ASCII-in-query"),
    pytest.param(_get(target=b"api.test:80"), id="authority-form-GET"),
    pytest.param(_get(target=b"http://api.test:99999/x"), id="absolute-form-port-out-of-range"),
    pytest.param(_get(target=b"http://api.test:abc/x"), id="absolute-form-port-not-numeric"),
    pytest.param(_get(target=b"http://[::1/x"), id="absolute-form-unclosed-IPv6"),
    pytest.param(_get(target=b"http:///x"), id="absolute-form-no-host"),
    pytest.param(_get(target=b"http://api.test\\@evil.example/x"), id="absolute-form-backslash"),
]  # fmt: skip


@pytest.mark.parametrize("raw", PARSER_REFUSALS)
def test_malformed_or_ambiguous_request_gets_400_and_close_with_nothing_upstream(
    raw: bytes, sidecar: int, upstream: RawUpstream
) -> None:
    """A request that two parsers could read differently, or that breaks a size limit, is
    answered 400 (431 for a head over max_head_bytes) and its connection closed; not one byte of
    it (or of what follows) goes upstream."""
    reply = exchange(sidecar, raw)
    head_size = raw.find(b"\r\n\r\n") + 4 if b"\r\n\r\n" in raw else len(raw)
    assert reply.status == (431 if head_size > 32768 else 400), reply.data[:300]
    assert reply.closed
    time.sleep(0.05)  # anything forwarded late would show up now
    assert upstream.received_bytes == 0


def test_a_refused_request_line_is_never_quoted_in_the_log(
    credproxy: Callable[..., Credproxy], tmp_path: Path
) -> None:
    """The parser's error quotes the offending line; that line may carry an app's credential,
    so the operator log gets the parser's description only (invariant: no secret in logs)."""
    own = RawUpstream().start()
    try:
        proc = credproxy(_config(own, tmp_path))
        app_token = "app-token-that-must-not-be-logged-7f3a"
        LEDGER.secret(app_token)  # the leak scan checks every log of the run for it too
        reply = exchange(
            _port(proc), _get(b"Authorization: Bearer " + app_token.encode() + b"\x00x\r\n")
        )
        assert reply.status == 400 and reply.closed
        wait_until(lambda: "malformed request" in proc.log(), what="the refusal in the log")
        assert "Invalid header value char" in proc.log() and app_token not in proc.log()
    finally:
        own.stop()


# -- refused by credproxy: problem+json, nothing upstream ----------------------------------------

PROBLEM_REFUSALS = [
    pytest.param(b"http://127.0.0.1:{port}/api/x", 403, "destination_not_allowed", id="absolute-form-to-the-upstream-itself"),
    pytest.param(b"http://evil.example/api/x", 403, "destination_not_allowed", id="absolute-form-unlisted-host"),
    pytest.param(b"http://api.test.evil.example/x", 403, "destination_not_allowed", id="absolute-form-suffixed-route-host"),
    pytest.param(b"http://api.test@evil.example/x", 403, "destination_not_allowed", id="absolute-form-userinfo-route-host"),
    pytest.param(b"http://api%2etest/x", 403, "destination_not_allowed", id="absolute-form-encoded-host"),
    pytest.param(b"http://api.test./x", 403, "destination_not_allowed", id="absolute-form-trailing-dot"),
    pytest.param(b"http://localhost/api/x", 403, "destination_not_allowed", id="absolute-form-to-a-path-route"),
    pytest.param(b"*", 400, "invalid_path", id="asterisk-form"),
    pytest.param(b"/api/../elsewhere", 400, "path_escapes_route", id="dot-dot"),
    pytest.param(b"/api/%2e%2e/elsewhere", 400, "path_escapes_route", id="encoded-dot-dot"),
    pytest.param(b"/api/x%00", 400, "invalid_path", id="encoded-NUL"),
    pytest.param(b"/api/a%2fb", 400, "invalid_path", id="encoded-slash"),
    pytest.param(b"/api//x", 400, "invalid_path", id="empty-segment"),
    pytest.param(b"/nowhere", 404, "route_not_found", id="no-route"),
]  # fmt: skip


@pytest.mark.parametrize(("target", "status", "code"), PROBLEM_REFUSALS)
def test_targets_credproxy_refuses_get_a_problem_and_nothing_upstream(
    target: bytes, status: int, code: str, sidecar: int, upstream: RawUpstream
) -> None:
    """Absolute-form to hosts no route names (no open proxy, not even to the upstream's own
    address), escaping or malformed paths and unknown routes get a problem+json refusal; nothing
    reaches the upstream."""
    target = target.replace(b"{port}", str(upstream.port).encode())
    reply = exchange(sidecar, b"OPTIONS " + target + b" HTTP/1.1\r\n" + H + CLOSE + b"\r\n")
    [response] = reply.responses
    assert response.status == status
    assert response.header("Content-Type") == "application/problem+json"
    assert f'"code": "{code}"'.encode() in response.body
    assert upstream.received_bytes == 0


def test_connect_and_foreign_host_are_refused_with_nothing_upstream(
    sidecar: int, upstream: RawUpstream
) -> None:
    """CONNECT (no tunnels) and a Host that is no local name (DNS rebinding) are refused before
    anything is forwarded."""
    for raw, status in [
        (b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n" + CLOSE + b"\r\n", 405),
        (b"GET /api/x HTTP/1.1\r\nHost: evil.example\r\n" + CLOSE + b"\r\n", 403),
        (b"GET /api/x HTTP/1.1\r\nHost: localhost, evil.example\r\n" + CLOSE + b"\r\n", 403),
        (b"GET /api/x HTTP/1.1\r\nHost: evil@localhost\r\n" + CLOSE + b"\r\n", 403),
    ]:
        assert exchange(sidecar, raw).status == status
    assert upstream.received_bytes == 0


# -- tolerated variants: forwarded once, re-framed by the proxy ---------------------------------

FORWARDED = [
    pytest.param(_post(b"Transfer-Encoding: identity, chunked\r\n", b"4\r\nabcd\r\n0\r\n\r\n"), "POST", "/x", b"abcd", id="TE-identity-chunked"),
    pytest.param(_post(b"Transfer-Encoding: CHUNKED\r\n", b"4\r\nabcd\r\n0\r\n\r\n"), "POST", "/x", b"abcd", id="TE-uppercase"),
    pytest.param(_post(CHUNKED, b"4;ext=" + b"e" * 50000 + b"\r\nabcd\r\n0\r\n\r\n"), "POST", "/x", b"abcd", id="chunk-extension-dropped"),
    pytest.param(_post(CHUNKED, b"2\r\nab\r\n2\r\ncd\r\n0\r\nX-Trailer: t\r\nAuthorization: Bearer app\r\n\r\n"), "POST", "/x", b"abcd", id="trailers-dropped"),
    pytest.param(_post(b"Content-Length: 4\r\nConnection: Content-Length, X-Api-Key, Host\r\nX-Api-Key: app-junk\r\n", b"abcd"), "POST", "/x", b"abcd", id="Connection-lists-framing-and-credential"),
    pytest.param(_post(b"Expect: something-else\r\nContent-Length: 4\r\n", b"abcd"), "POST", "/x", b"abcd", id="unknown-expectation"),
    pytest.param(_get(b"Authorization: Bearer app\r\nProxy-Authorization: Basic app\r\nDPoP: app\r\nX-Api-Key: app\r\nTE: trailers\r\nKeep-Alive: 5\r\nProxy-Connection: keep-alive\r\n"), "GET", "/x", b"", id="app-credentials-and-hop-by-hop"),
    pytest.param(_get(b"X-A: caf\xc3\xa9\r\n"), "GET", "/x", b"", id="obs-text-UTF-8"),
    pytest.param(b"HEAD /api/x HTTP/1.1\r\n" + H + CLOSE + b"\r\n", "HEAD", "/x", b"", id="HEAD"),
    pytest.param(_get(target=b"/api/x#fragment"), "GET", "/x", b"", id="fragment-dropped"),
    pytest.param(_get(target=b"/api/x;p=1?a=%00&b=%2F"), "GET", "/x;p=1?a=%00&b=%2F", b"", id="params-and-encoded-query"),
    pytest.param(_get(target=b'/api/"<>{}|^`'), "GET", '/"<>{}|^`', b"", id="unsafe-but-legal-path-bytes"),
    pytest.param(_get(target=b"/api/" + b"a" * 8180), "GET", "/" + "a" * 8180, b"", id="request-line-8KiB"),
    pytest.param(_get(b"X-Big: " + b"v" * 8183 + b"\r\n"), "GET", "/x", b"", id="field-8KiB"),
    pytest.param(_get(b"".join(b"X-H%d: v\r\n" % i for i in range(126))), "GET", "/x", b"", id="128-fields"),
    pytest.param(_get(b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 8000) for i in range(3))), "GET", "/x", b"", id="head-of-24KiB-under-max_head_bytes"),
    pytest.param(b"GET http://api.test/v1/x?q=1 HTTP/1.1\r\nHost: evil.example\r\n" + CLOSE + b"\r\n", "GET", "/v1/x?q=1", b"", id="absolute-form-wins-over-Host"),
    pytest.param(b"GET http://API.TEST:80/v1/x HTTP/1.1\r\nHost: api.test\r\n" + CLOSE + b"\r\n", "GET", "/v1/x", b"", id="absolute-form-case-and-port"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "method", "target", "body"), FORWARDED)
def test_tolerated_variant_is_forwarded_once_in_the_proxys_own_framing(
    raw: bytes, method: str, target: str, body: bytes, sidecar: int, upstream: RawUpstream
) -> None:
    """Variants RFC 9112 allows arrive upstream as exactly one request, re-framed by the proxy:
    its own Host and credential, no hop-by-hop or app credential header, the body de-chunked and
    re-chunked, trailers and chunk extensions gone; the echoed credential is masked."""
    reply = exchange(sidecar, raw)
    assert reply.status == 200, reply.data[:300]
    assert SECRET.encode() not in reply.data
    [request] = upstream.requests
    assert (request.method, request.target, request.body) == (method, target, body)
    assert_forwarded_cleanly(request, upstream)
    assert upstream.problems == []


# -- pipelining ---------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order_and_forwarded_once_each(
    sidecar: int, upstream: RawUpstream
) -> None:
    """Four requests in one write, one refused among them, get four answers in order; each
    allowed one reaches the upstream exactly once, in order, with its own body."""
    raw = (
        b"GET /api/one HTTP/1.1\r\n" + H + b"\r\n"
        + b"POST /api/two HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nxyz"
        + b"GET /nowhere HTTP/1.1\r\n" + H + b"\r\n"
        + b"POST /api/four HTTP/1.1\r\n" + H + CHUNKED + CLOSE + b"\r\n3\r\nabc\r\n0\r\n\r\n"
    )  # fmt: skip
    reply = exchange(sidecar, raw)
    assert [r.status for r in reply.responses] == [200, 200, 404, 200]
    assert [r.body.count(b'"target": "/') for r in reply.responses] == [1, 1, 0, 1]
    assert b'"/one"' in reply.responses[0].body and b'"/four"' in reply.responses[3].body
    assert [(r.method, r.target, r.body) for r in upstream.requests] == [
        ("GET", "/one", b""), ("POST", "/two", b"xyz"), ("POST", "/four", b"abc"),
    ]  # fmt: skip
    for request in upstream.requests:
        assert_forwarded_cleanly(request, upstream)
    assert upstream.problems == [] and reply.closed


def test_pipeline_ends_at_a_malformed_request(sidecar: int, upstream: RawUpstream) -> None:
    """What follows a malformed request in a pipeline is never parsed or forwarded: the answers
    stop at its 400 and the connection closes."""
    first = b"GET /api/first HTTP/1.1\r\n" + H + b"\r\n"
    rest = (
        b"POST /api/bad HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n" + CHUNKED + b"\r\n0\r\n\r\n"
        + b"GET /api/smuggled HTTP/1.1\r\n" + H + b"\r\n"
    )  # fmt: skip
    reply = exchange(sidecar, first, rest, gap_s=0.2)
    assert [r.status for r in reply.responses] == [200, 400] and reply.closed
    assert [r.target for r in upstream.requests] == ["/first"]


# -- HTTP/1.0, Upgrade, Expect ------------------------------------------------------------------


def test_http10_is_answered_in_http10_and_closed_unless_kept_alive(
    sidecar: int, upstream: RawUpstream
) -> None:
    """HTTP/1.0 without Host is served (as HTTP/1.1 upstream with the proxy's Host) and its
    connection closed after the answer; with keep-alive a second request follows on it."""
    reply = exchange(sidecar, b"GET /api/ten HTTP/1.0\r\n\r\n")
    assert reply.data.startswith(b"HTTP/1.0 200 ") and reply.closed
    reply = exchange(
        sidecar,
        b"GET /api/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"POST /api/b HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi",
        gap_s=0.2,
    )
    assert [r.status for r in reply.responses] == [200, 200] and reply.closed
    assert [(r.target, r.body) for r in upstream.requests] == [
        ("/ten", b""),
        ("/a", b""),
        ("/b", b"hi"),
    ]
    for request in upstream.requests:
        assert_forwarded_cleanly(request, upstream)


WEBSOCKET = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"  # fmt: skip
FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # a masked websocket text frame


def test_a_websocket_upgrade_the_upstream_declines_is_never_tunnelled(
    sidecar: int, upstream: RawUpstream
) -> None:
    """A WebSocket handshake goes upstream as one (with the credential), the upstream's 200
    reaches the app as a plain answer, and bytes sent after the handshake as if a tunnel were
    open are never relayed (credproxy answers, then closes the connection)."""
    reply = exchange(
        sidecar, b"GET /api/ws HTTP/1.1\r\n" + H + WEBSOCKET + b"\r\n" + FRAME, wait_s=1
    )
    assert [r.status for r in reply.responses] == [200] and reply.closed
    [request] = upstream.requests
    assert request.target == "/ws" and request.body == b""
    assert request.values("Upgrade") == ["websocket"] and request.values("Connection") == [
        "Upgrade"
    ]
    assert request.values("Sec-WebSocket-Key") == ["dGhlIHNhbXBsZSBub25jZQ=="]
    assert request.values("X-Api-Key") == [SECRET]
    assert upstream.problems == []


@pytest.mark.parametrize(
    "upgrade",
    [
        pytest.param(b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n", id="h2c"),
        pytest.param(b"Upgrade: TLS/1.2\r\nConnection: Upgrade\r\n", id="tls"),
        pytest.param(WEBSOCKET.replace(b"13", b"8"), id="websocket-version-8"),
    ],
)  # fmt: skip
def test_other_upgrades_are_refused_and_never_forwarded(
    upgrade: bytes, sidecar: int, upstream: RawUpstream
) -> None:
    """Upgrades to anything but WebSocket (and broken WebSocket handshakes) get a problem
    answer; the upstream sees nothing, and bytes sent after them are never relayed raw."""
    reply = exchange(sidecar, b"GET /api/ws HTTP/1.1\r\n" + H + upgrade + b"\r\n" + FRAME, wait_s=1)
    statuses = [r.status for r in reply.responses]
    assert statuses[0] in (400, 501) and set(statuses[1:]) <= {400}
    assert reply.responses[0].header("Content-Type") == "application/problem+json"
    assert upstream.requests == [] and upstream.problems == []


def test_expect_100_continue_to_a_refused_target_gets_the_final_answer_at_once(
    sidecar: int, upstream: RawUpstream
) -> None:
    """A request whose fate the head decides gets its final answer without the body being sent
    (RFC 9110 §10.1.1), and no 100."""
    for target, status in [(b"/nowhere", 404), (b"http://evil.example/x", 403)]:
        head = (
            b"POST "
            + target
            + b" HTTP/1.1\r\n"
            + H
            + b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        reply = exchange(sidecar, head, answers=1)
        assert [r.status for r in reply.responses] == [status]
    assert upstream.received_bytes == 0


def test_expect_100_continue_is_answered_before_the_body(
    isolated: Callable[..., tuple[int, RawUpstream]],
) -> None:
    """An app that waits for 100 Continue gets it (buffered and streamed bodies alike), then its
    body goes upstream once, without the expectation the proxy has already met."""
    port, upstream = isolated()
    for target, length in [(b"/api/small", 4), (b"/api/large", 100_000)]:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(
                b"POST " + target + b" HTTP/1.1\r\n" + H + CLOSE
                + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length
            )  # fmt: skip
            assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"b" * length)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert parse_responses(data)[-1].status == 200
    assert [(r.target, len(r.body)) for r in upstream.requests] == [
        ("/small", 4),
        ("/large", 100_000),
    ]
    assert all(not r.values("Expect") for r in upstream.requests)


# -- slowloris ----------------------------------------------------------------------------------


def test_slow_heads_and_bodies_do_not_hold_up_other_requests(
    sidecar: int, upstream: RawUpstream
) -> None:
    """Thirty connections trickling a head or stalling a body leave the sidecar serving everyone
    else promptly, and nothing incomplete is forwarded as a complete request."""
    slow: list[socket.socket] = []
    try:
        for i in range(30):
            sock = socket.create_connection(("127.0.0.1", sidecar), timeout=2)
            slow.append(sock)
            if i % 3:
                sock.sendall(b"GET /api/slow-head HTTP/1.1\r\nHost: loc")
            else:
                sock.sendall(
                    b"POST /api/slow-body HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nabc"
                )
        for _ in range(3):
            for sock in slow:
                sock.sendall(b"a" if slow.index(sock) % 3 == 0 else b"o")
            assert_serves(sidecar, upstream)  # answered within exchange()'s wait, not starved
            time.sleep(0.1)
    finally:
        for sock in slow:
            sock.close()
    assert {r.target for r in upstream.requests} == {"/still-serving"}


def test_slow_streamed_body_is_cut_at_the_routes_total_timeout(
    sidecar: int, upstream: RawUpstream
) -> None:
    """A chunked body that trickles past the route's total timeout gets an answer within it
    (not a hang); the upstream saw only an unfinished request, never a complete one."""
    head = b"POST /slow/trickle HTTP/1.1\r\n" + H + CHUNKED + b"\r\n"
    chunks = [b"1\r\na\r\n"] * 12
    reply = exchange(sidecar, head, *chunks, gap_s=0.25, answers=1)
    # 408 would name the culprit better; credproxy says 504 upstream_timeout (see the report)
    assert reply.status in (408, 504)
    assert reply.parts_sent < 1 + len(chunks)  # answered mid-trickle, not after the body
    assert upstream.requests == []
    assert all(problem.startswith("truncated") for problem in upstream.problems)


APP_TIMEOUTS = "app_timeouts: {keepalive_s: 1, body_idle_s: 1}"


def test_trickled_head_is_closed_after_the_keepalive_timeout(
    isolated: Callable[..., tuple[int, RawUpstream]],
) -> None:
    """A head that never completes is dropped after ``app_timeouts.keepalive_s``, even while
    bytes keep trickling, and nothing of it reaches the upstream."""
    port, upstream = isolated(APP_TIMEOUTS)
    head = b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40
    parts = [bytes([c]) for c in head]
    reply = exchange(port, *parts, gap_s=0.05, wait_s=2)  # 4 s to send, keep-alive is 1 s
    assert reply.closed and reply.parts_sent < len(parts)  # cut mid-trickle, never answered
    assert reply.data == b""
    assert upstream.received_bytes == 0


def test_stalled_buffered_body_gets_408(isolated: Callable[..., tuple[int, RawUpstream]]) -> None:
    """A body that stops arriving is answered 408 problem+json after ``app_timeouts.body_idle_s``
    and nothing reaches the upstream."""
    port, upstream = isolated(APP_TIMEOUTS)
    reply = exchange(port, _post(b"Content-Length: 10\r\n", b"abc"), wait_s=3)
    assert reply.status == 408 and b'"code": "request_timeout"' in reply.data
    assert upstream.received_bytes == 0


# -- credproxy bugs with framing at the upstream ------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(gzip.compress(b"hi"), id="gzip-expanding-less-than-its-size"),
        pytest.param(gzip.compress(b"A" * 200), id="gzip-expanding-beyond-its-size"),
        pytest.param(zlib.compress(b"B" * 200), id="deflate"),
        pytest.param(b"not gzip at all", id="invalid-gzip"),
    ],
)
def test_request_body_passes_byte_for_byte_whatever_its_content_coding(
    body: bytes, isolated: Callable[..., tuple[int, RawUpstream]]
) -> None:
    """A content-coded request body is the app's business: the upstream receives exactly the
    bytes sent, under a Content-Length that is true."""
    port, upstream = isolated()
    coding = b"deflate" if body.startswith(b"x") else b"gzip"
    fields = b"Content-Encoding: " + coding + b"\r\nContent-Length: %d\r\n" % len(body)
    reply = exchange(port, _post(fields, body), wait_s=2)
    assert reply.status == 200, reply.data[:300]
    [request] = upstream.requests
    assert request.body == body and request.values("Content-Length") == [str(len(body))]
    assert upstream.problems == []


def test_unknown_transfer_coding_is_501_with_nothing_upstream(
    sidecar: int, upstream: RawUpstream
) -> None:
    """``Transfer-Encoding: gzip, chunked`` is refused 501 rather than forwarded with the gzip
    layer silently lost."""
    reply = exchange(
        sidecar, _post(b"Transfer-Encoding: gzip, chunked\r\n", b"4\r\nabcd\r\n0\r\n\r\n")
    )
    assert reply.status == 501
    assert upstream.received_bytes == 0


def test_content_length_reaches_the_upstream_canonical(sidecar: int, upstream: RawUpstream) -> None:
    """A Content-Length with leading zeros is re-serialised by the proxy, so no upstream parser
    can read it another way."""
    reply = exchange(sidecar, _post(b"Content-Length: 0010\r\n", b"0123456789"))
    assert reply.status == 200
    [request] = upstream.requests
    assert request.values("Content-Length") == ["10"] and request.body == b"0123456789"


def test_content_length_beyond_int64_is_refused(
    isolated: Callable[..., tuple[int, RawUpstream]],
) -> None:
    """A declared length no signed 64-bit parser can hold is refused before anything is sent."""
    port, upstream = isolated()
    reply = exchange(port, _post(b"Content-Length: 9223372036854775808\r\n", b"abcd"))
    assert reply.status in (400, 413)
    assert upstream.received_bytes == 0


def test_undecodable_absolute_form_host_is_refused(
    isolated: Callable[..., tuple[int, RawUpstream]],
) -> None:
    """An absolute-form target with an invalid IDNA label gets a 4xx answer, not silence."""
    port, upstream = isolated()
    reply = exchange(port, _get(target=b"http://xn--api-test/x"), wait_s=1.5)
    assert reply.status in (400, 403)
    assert upstream.received_bytes == 0


def test_chunk_framing_broken_mid_body_is_answered_400_at_once(
    isolated: Callable[..., tuple[int, RawUpstream]],
) -> None:
    """A chunked body whose framing breaks after the head has been forwarded gets a prompt 400;
    the upstream is left with an unfinished request, never a complete one."""
    port, upstream = isolated()
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"POST /api/x HTTP/1.1\r\n" + H + CHUNKED + b"\r\n4\r\nabcd\r\n")
        assert upstream.wait_received(b"abcd"), "the head and first chunk were never forwarded"
        sock.sendall(b"zz\r\nabcd\r\n0\r\n\r\n")
        assert parse_responses(sock.recv(65536))[0].status == 400
    assert upstream.requests == []


# -- generative pass ----------------------------------------------------------------------------

_TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
_NAMES = [
    "Transfer-Encoding", "Content-Length", "Content-Encoding", "Connection", "Upgrade", "Expect", "Host", "X-Api-Key",
    "Authorization", "Proxy-Authorization", "DPoP", "TE", "Trailer", "Keep-Alive",
    "Proxy-Connection", "Origin", "Sec-Fetch-Site", "Content-Type", "HTTP2-Settings",
]  # fmt: skip
_VALUES = [
    b"chunked", b"chunked, identity", b"identity, chunked", b"gzip, chunked", b"0", b"3", b"-1",
    b"+3", b"3, 3", b"close", b"keep-alive", b"Upgrade", b"websocket", b"h2c", b"100-continue",
    b"localhost", b"api.test", b"evil.example", b"null", b"none", b"same-origin", b"trailers",
    b"Bearer app-junk", b"x-api-key", b"content-length, transfer-encoding", b"\t", b"",
]  # fmt: skip
_PATH_OK = string.ascii_letters + string.digits + "-._~%/;?&=+!$'()*,:@"
_PATH_ODD = _PATH_OK + '#"<>{}|^`[]\\ \t\x00'
_TEXT = "".join(c for c in string.printable if c not in "\r\n\x0b\x0c")
_FILLER = b"X" * 300  # completes a short Content-Length, or is parsed as a bad request


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    """A request mostly well-formed, with hostile names, values and paths mixed in, so that
    enough gets through to the upstream for the checks there to bite."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    prefix = draw(
        st.sampled_from(["/api/", "/api/", "/slow/", "/", "/elsewhere/", "http://api.test/"])
    )
    path = prefix + draw(
        st.one_of(st.text(alphabet=_PATH_OK, max_size=30), st.text(alphabet=_PATH_ODD, max_size=30))
    )
    names = st.one_of(st.sampled_from(_NAMES), st.text(alphabet=_TOKEN, min_size=1, max_size=16))
    values = st.one_of(
        st.sampled_from(_VALUES), st.text(alphabet=_TEXT, max_size=40).map(str.encode)
    )
    fields = draw(st.lists(st.tuples(names.map(str.encode), values), max_size=5))
    if draw(st.sampled_from([False, False, True])):  # one field of raw bytes: CR, LF, NUL…
        name = draw(st.one_of(names.map(str.encode), st.binary(min_size=1, max_size=16)))
        fields.insert(draw(st.integers(0, len(fields))), (name, draw(st.binary(max_size=40))))
    body = draw(st.binary(max_size=32))
    framed = any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in fields)
    if body and not framed:
        fields.append((b"Content-Length", str(len(body)).encode()))
    head = f"{method} {path} HTTP/1.1\r\n".encode("latin-1") + H
    head += b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    return head + b"\r\n" + body


def test_generated_requests_never_crash_5xx_or_leak(sidecar: int, upstream: RawUpstream) -> None:
    """Generated header names and values (CR/LF, NUL and framing headers included) and paths
    never get a 5xx other than 502/504, never show the credential, never reach the upstream
    ambiguously or with hop-by-hop or app credential headers, and the sidecar keeps serving."""
    outcomes: Counter[int | str | None] = Counter()

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(hostile_requests())
    def attack(raw: bytes) -> None:
        upstream.clear()
        # the filler only if no answer came: it must not share a read with the request
        reply = exchange(sidecar, raw, _FILLER, gap_s=0.3, answers=1, wait_s=1)
        statuses = [r.status for r in reply.responses]
        outcomes[statuses[0] if statuses else None] += 1
        outcomes["forwarded"] += bool(upstream.requests)
        assert all(s < 500 or s in (502, 504) for s in statuses), (statuses, reply.data[:400])
        assert SECRET.encode() not in reply.data
        assert [p for p in upstream.problems if not p.startswith("truncated")] == []
        for request in upstream.requests:
            assert_forwarded_cleanly(request, upstream)

    attack()
    print(f"generated requests: {dict(outcomes)}")
    assert outcomes["forwarded"] >= 15 and outcomes[400] >= 15  # not vacuous either way
    upstream.clear()
    assert_serves(sidecar, upstream)


# -- limits before any caller is served (issue 16, finding 6) -----------------------------------


def test_a_head_over_max_head_bytes_is_431_even_when_trickled_in_small_pieces(
    sidecar: int, upstream: RawUpstream
) -> None:
    """Many short header lines, each under the parser's line limit, add up past
    ``app_limits.max_head_bytes``: the head is refused 431 and nothing reaches the upstream."""
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(40))  # ~40 KiB
    head = b"GET /api/x HTTP/1.1\r\n" + H + fields
    parts = [head[i : i + 1024] for i in range(0, len(head), 1024)] + [b"\r\n"]
    reply = exchange(sidecar, *parts)
    assert reply.status == 431 and reply.closed
    assert reply.responses[0].header("Content-Type") == "application/problem+json"
    assert b'"code": "request_head_too_large"' in reply.data
    assert upstream.requests == []


def test_unfinished_heads_of_a_megabyte_cost_little_memory_and_it_comes_back(
    credproxy: Callable[..., Credproxy], tmp_path: Path
) -> None:
    """200 connections each trying to send a 1 MB head (under every per-line limit) are cut at
    ``max_head_bytes``: the sidecar's memory stays within a few MB of its baseline while they
    are open and after they close."""
    own = RawUpstream().start()
    try:
        proc = credproxy(_config(own, tmp_path))
        port = _port(proc)
        assert_serves(port, own)
        baseline = proc.rss_bytes()
        line = b"X-Fill: " + b"v" * 8000 + b"\r\n"
        head = b"GET /api/x HTTP/1.1\r\n" + H + line * 125  # 1 MB, never finished
        held: list[socket.socket] = []
        try:
            for _ in range(200):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                held.append(sock)
                try:
                    sock.sendall(head)
                except OSError:
                    pass  # cut at max_head_bytes: the point
            assert_serves(port, own)
            during = proc.rss_bytes()
        finally:
            for sock in held:
                sock.close()
        assert_serves(port, own)
        after = proc.rss_bytes()
    finally:
        own.stop()
    assert during - baseline < 32 * 2**20, (baseline, during)
    assert after - baseline < 32 * 2**20, (baseline, after)


def test_connections_per_uid_are_capped_and_freed_on_close(
    isolated: Callable[..., tuple[int, RawUpstream]],
) -> None:
    """Past ``app_limits.max_connections_per_uid`` open connections, the next is answered 503
    too_many_connections with Retry-After at accept; closing one makes room again."""
    port, upstream = isolated("app_limits: {max_connections_per_uid: 4}")
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        wait_until(lambda: exchange(port, _get()).status == 503, what="the cap")
        refused = exchange(port, _get())
        assert refused.status == 503 and refused.closed
        assert refused.responses[0].header("Retry-After") == "1"
        assert b'"code": "too_many_connections"' in refused.data
        idle.pop().close()
        wait_until(lambda: exchange(port, _get()).status == 200, what="room again")
    finally:
        for sock in idle:
            sock.close()
    assert [r.target for r in upstream.requests] == ["/x"]


def test_idle_connections_from_an_unnamed_uid_cannot_exhaust_file_descriptors(
    credproxy: Callable[..., Credproxy], tmp_path: Path
) -> None:
    """Under a 256-descriptor limit, another uid opens and holds 400 connections: each is
    closed at accept, and meanwhile the app's requests, /healthz and the static secret's re-read
    keep working (no EMFILE)."""
    own = RawUpstream().start()
    try:
        text = _config(own, tmp_path).replace(
            "key: {type: static,", "key: {type: static, reread_s: 0.2,"
        )
        proc = credproxy(text, wrap=("prlimit", "--nofile=256:256", "--"))
        port = _port(proc)
        attacker = subprocess.Popen(
            attacker_command("hold", "127.0.0.1", str(port), "400"),
            stdout=subprocess.PIPE, text=True, user=NOBODY,
        )  # fmt: skip
        rotated = SECRET + "-rotated"
        LEDGER.secret(rotated)
        (tmp_path / "api-key").write_text(rotated + "\n")
        try:
            wait_until(lambda: _forwarded_key(port, own) == rotated, what="the re-read key")
            with urllib.request.urlopen(proc.admin_url + "/healthz", timeout=5) as health:
                assert health.status == 200
        finally:
            output, _ = attacker.communicate(timeout=120)
        assert json.loads(output) == {"opened": 400, "closed": 400}
        assert "Too many open files" not in proc.log()
    finally:
        own.stop()


def _forwarded_key(port: int, upstream: RawUpstream) -> str | None:
    reply = exchange(port, _get(target=b"/api/key"))
    assert reply.status == 200, reply.data[:300]
    return upstream.requests[-1].values("X-Api-Key")[0]


def test_a_second_pipelined_head_over_max_head_bytes_is_refused_after_the_first_answer(
    sidecar: int, upstream: RawUpstream
) -> None:
    """A small request and, in the same write, a 56 KB second head (each line under the
    parser's limits): the first is answered, the second gets 431 and never reaches upstream."""
    big = (
        b"GET /api/big HTTP/1.1\r\n"
        + H
        + b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(56))
        + b"\r\n"
    )
    reply = exchange(sidecar, _get(target=b"/api/small").replace(CLOSE, b"") + big, answers=2)
    assert [r.status for r in reply.responses] == [200, 431]
    assert [r.target for r in upstream.requests] == ["/small"]
