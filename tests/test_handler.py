"""inbound/handler.py: route → credential → inject → forward → scrub → answer, in process.

The app side is a real ``AppListener`` over a socketpair, the upstream a loopback aiohttp server,
the credential a static secret file: no IdP, no subprocess.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from aiohttp import web

from tests.inprocess import (
    UID,
    Received,
    Upstream,
    closed,
    config_text,
    read_response,
    sidecar,
    upstream_server,
)

SECRET = "s3cr3t-api-key-0123456789"


def _secret_file(tmp_path: Path, value: str = SECRET) -> Path:
    path = tmp_path / "key"
    path.write_text(value)
    path.chmod(0o600)
    return path


def _rejecting_once(upstream: Upstream, secret_file: Path | None = None):
    """An upstream answer: 401 invalid_token to the first request (rotating the secret file
    first, when given, so a refetch gets a new value), 200 with the body it got afterwards."""

    async def answer(request: web.Request, received: Received) -> web.StreamResponse:
        if len(upstream.seen) == 1:
            if secret_file is not None:
                secret_file.write_text("rotated-key-9876543210")
            return web.Response(
                status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        return web.Response(body=received.body)

    return answer


async def _post(writer, path: str, head_extra: str = "", body: bytes = b"") -> None:
    writer.write(f"POST {path} HTTP/1.1\r\nHost: localhost\r\n{head_extra}\r\n".encode() + body)
    await writer.drain()


async def test_a_request_reaches_the_upstream_with_the_credential_and_an_echo_comes_back_masked(
    tmp_path,
):
    """The route prefix is stripped, the app's own Authorization replaced by the injected one,
    and the upstream's echo of the credential never reaches the app."""
    async with upstream_server() as upstream:

        async def echo(request: web.Request, received: Received) -> web.StreamResponse:
            return web.Response(text=received.headers["Authorization"])

        upstream.answer = echo
        config = config_text(upstream.url, _secret_file(tmp_path))
        async with sidecar(config, tmp_path) as side:
            reader, writer = await side.connect()
            writer.write(
                b"GET /api/v1/items?x=1 HTTP/1.1\r\nHost: localhost\r\n"
                b"Authorization: Bearer the-apps-own\r\n\r\n"
            )
            answer = await read_response(reader)
    assert answer.status == 200
    assert SECRET.encode() not in answer.body and b"Bearer " in answer.body
    [seen] = upstream.seen
    assert seen.path_qs == "/v1/items?x=1"
    assert seen.headers["Authorization"] == f"Bearer {SECRET}"


async def test_a_streamed_body_is_not_replayed_after_invalid_token(tmp_path):
    """A 401 invalid_token to a request whose body was streamed (not kept for a replay) goes to
    the app as is: the upstream sees exactly one request, never a second with an empty body."""
    async with upstream_server() as upstream:
        upstream.answer = _rejecting_once(upstream)
        config = config_text(
            upstream.url, _secret_file(tmp_path), route_extra="    retry_body_max_bytes: 0\n"
        )
        async with sidecar(config, tmp_path) as side:
            reader, writer = await side.connect()
            await _post(
                writer, "/api/upload", "Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"
            )
            answer = await read_response(reader)
            await _post(writer, "/api/after", "Content-Length: 0\r\n")  # still in order after
            after = await read_response(reader)
    assert answer.status == 401
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    assert [(r.path_qs, r.body) for r in upstream.seen] == [("/upload", b"hello"), ("/after", b"")]
    assert after.status == 200


async def test_a_kept_body_is_replayed_once_with_a_new_token_after_invalid_token(tmp_path):
    """A small body is kept, so a 401 invalid_token is retried once, with the same body and the
    credential fetched anew (the rotated secret)."""
    secret_file = _secret_file(tmp_path)
    async with upstream_server() as upstream:
        upstream.answer = _rejecting_once(upstream, secret_file)
        async with sidecar(config_text(upstream.url, secret_file), tmp_path) as side:
            reader, writer = await side.connect()
            await _post(writer, "/api/charge", "Content-Length: 5\r\n", b"hello")
            answer = await read_response(reader)
    assert answer.status == 200 and answer.body == b"hello"
    assert [r.body for r in upstream.seen] == [b"hello", b"hello"]
    tokens = [r.headers["Authorization"] for r in upstream.seen]
    assert tokens == [f"Bearer {SECRET}", "Bearer rotated-key-9876543210"]


async def test_a_second_invalid_token_is_answered_not_retried_again(tmp_path):
    """However often the upstream says invalid_token, a request is sent at most twice."""
    async with upstream_server() as upstream:

        async def reject(request: web.Request, received: Received) -> web.StreamResponse:
            return web.Response(
                status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )

        upstream.answer = reject
        async with sidecar(config_text(upstream.url, _secret_file(tmp_path)), tmp_path) as side:
            reader, writer = await side.connect()
            await _post(writer, "/api/x", "Content-Length: 2\r\n", b"hi")
            answer = await read_response(reader)
    assert answer.status == 401
    assert len(upstream.seen) == 2


async def test_a_request_no_route_matches_is_a_problem_and_an_audited_denial(tmp_path):
    """No route: 404 problem+json naming route_not_found, a request.denied audit event, and the
    connection stays usable."""
    async with upstream_server() as upstream:
        async with sidecar(config_text(upstream.url, _secret_file(tmp_path)), tmp_path) as side:
            reader, writer = await side.connect()
            writer.write(b"GET /elsewhere HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = await read_response(reader)
            writer.write(b"GET /api/ok HTTP/1.1\r\nHost: localhost\r\n\r\n")
            ok = await read_response(reader)
    assert answer.status == 404
    assert answer.headers["content-type"] == "application/problem+json"
    assert json.loads(answer.body)["code"] == "route_not_found"
    assert ok.status == 200 and [r.path_qs for r in upstream.seen] == ["/ok"]
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    [denied] = [e for e in events if e["event"] == "request.denied"]
    assert denied["reason"] == "route_not_found" and denied["caller"]["uid"] == UID


async def test_an_unreachable_upstream_is_a_502_problem_that_never_names_the_credential(tmp_path):
    """A refused connection to the upstream answers 502 upstream_unreachable, without a trace
    or the credential."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        config = config_text(f"http://127.0.0.1:{port}", _secret_file(tmp_path))
        async with sidecar(config, tmp_path) as side:
            reader, writer = await side.connect()
            writer.write(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = await read_response(reader)
    assert answer.status == 502
    assert json.loads(answer.body)["code"] == "upstream_unreachable"
    assert SECRET.encode() not in answer.body and b"Traceback" not in answer.body


async def test_a_caller_no_rule_names_is_refused_at_accept_and_audited(tmp_path):
    """``Handler.admit``: a connection from a uid no caller rule names gets one 403
    caller_not_allowed and is closed, before any request reaches the upstream."""
    async with upstream_server() as upstream:
        config = config_text(upstream.url, _secret_file(tmp_path)).replace(
            f"uid: {UID}", f"uid: {UID + 1}"
        )
        async with sidecar(config, tmp_path) as side:
            reader, writer = await side.connect()
            answer = await read_response(reader)  # before the app sent a byte
            assert await closed(reader)
    assert answer.status == 403 and json.loads(answer.body)["code"] == "caller_not_allowed"
    assert upstream.seen == []
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    [denied] = [e for e in events if e["event"] == "request.denied"]
    assert denied["at"] == "accept" and denied["reason"] == "caller_not_allowed"
