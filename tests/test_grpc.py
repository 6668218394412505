"""gRPC through credproxy (issue 20) with grpcio on both ends: a grpcio client on an h2c channel
to credproxy, a grpcio server behind it (h2c upstream) that verifies every call's DPoP-bound
token against the test IdP and the proof made for the call; unary and streaming calls byte for
byte, trailers, deadlines, and gRPC-native refusals."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from aiohttp import web

from tests.counterparts import (
    PREAMBLE,
    Credproxy,
    ThreadedApp,
    config,
    ec_private_pem,
    free_port,
    wait_until,
)
from tests.grpc_counterpart import SERVICE, GrpcServer, _message
from tests.tls import TestCA

MESSAGES = 1000
MESSAGE_BYTES = 20 * 1024 * 1024 // MESSAGES  # 20 MB each way


def _identity(data: bytes) -> bytes:
    return data


@pytest.fixture
def grpc_server(idp, upstream) -> Iterator[GrpcServer]:
    server = GrpcServer(idp, upstream.audience)
    server.start()
    yield server
    server.stop()


def _route(server: GrpcServer, audience: str, inject: str = "dpop", extra: str = "") -> str:
    return f"""\
  - name: grpc
    path_prefix: /{SERVICE}/
    strip_prefix: false
    upstream: {server.origin}
    upstream_protocol: h2c
    credential: {{issuer: test-idp, audience: "{audience}", scope: payments.write, inject: {inject}}}
    allow: [{{callers: [test-suite]}}]
{extra}"""


def _start(credproxy, idp, upstream, server: GrpcServer, top: str = "", **kwargs) -> Credproxy:
    text = config(
        idp=idp,
        upstream=upstream.origin,
        audience=upstream.audience,
        extra_route=_route(server, upstream.audience, **kwargs),
    )
    if top:  # replaces the audit line of ``config``
        text = text.replace('audit: {file: "{audit}"}', top)
    proc: Credproxy = credproxy(text)
    return proc


def _channel(proc: Credproxy) -> grpc.Channel:
    return grpc.insecure_channel(
        proc.url.removeprefix("http://"),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )


def _method(channel: grpc.Channel, kind: str, name: str) -> Any:
    factory = getattr(channel, kind)
    return factory(
        f"/{SERVICE}/{name}", request_serializer=_identity, response_deserializer=_identity
    )


@pytest.mark.parametrize("inject", ["dpop", "bearer"])
async def test_unary_call_carries_a_verified_credential(
    idp, upstream, credproxy, grpc_server, inject
):
    """A unary call reaches the grpcio server with a token the IdP issued (DPoP-bound with a
    proof for the call's URI, or bearer); the app's own authorization metadata is stripped; the
    answer and its trailers (grpc-status, custom trailing metadata) come back."""
    proc = _start(credproxy, idp, upstream, grpc_server, inject=inject)
    payload = bytes(range(256)) * 4096  # 1 MiB

    def call():
        with _channel(proc) as channel:
            unary = _method(channel, "unary_unary", "Unary")
            return unary.with_call(
                payload,
                metadata=[("authorization", "Bearer app-own-secret-1234567890")],
                timeout=20,
            )

    answer, rpc = await asyncio.to_thread(call)
    assert answer == payload
    assert rpc.code() == grpc.StatusCode.OK
    seen = grpc_server.calls[-1]
    assert seen["method"] == "Unary"
    assert seen["claims"]["client_id"] == "orders-service"
    authorization = str(seen["metadata"]["authorization"])
    assert authorization.startswith("DPoP " if inject == "dpop" else "Bearer ")
    assert "app-own-secret" not in authorization
    assert bool(seen["claims"].get("cnf")) == (inject == "dpop")


async def test_unary_call_over_tls_negotiates_h2_by_alpn(idp, upstream, credproxy, tmp_path):
    """An ``h2`` route reaches a TLS grpcio server (HTTP/2 chosen by ALPN, the certificate
    verified against the route's CA); the DPoP proof names the call's https URI."""
    ca = TestCA(tmp_path)
    server = GrpcServer(idp, upstream.audience, tls=ca.issue("127.0.0.1", server=True, stem="grpc"))
    server.start()
    try:
        route = _route(server, upstream.audience).replace(
            "upstream_protocol: h2c", f"upstream_protocol: h2\n    ca_file: {ca.ca_file}"
        )
        proc = credproxy(
            config(idp=idp, upstream=upstream.origin, audience=upstream.audience, extra_route=route)
        )

        def call() -> bytes:
            with _channel(proc) as channel:
                return bytes(_method(channel, "unary_unary", "Unary")(b"over tls", timeout=20))

        assert await asyncio.to_thread(call) == b"over tls"
        assert server.calls[-1]["claims"]["cnf"]  # DPoP-bound, its proof checked for https
    finally:
        server.stop()


async def test_echoed_credential_is_masked_in_metadata_body_and_trailers(
    idp, upstream, credproxy, grpc_server
):
    """A server that echoes the bearer token in its headers, its message and its trailers: the
    app receives every copy masked (the echo scrubber applies to HTTP/2 and trailers too)."""
    proc = _start(credproxy, idp, upstream, grpc_server, inject="bearer")

    def call():
        with _channel(proc) as channel:
            unary = _method(channel, "unary_unary", "Unary")
            answer, rpc = unary.with_call(b"echo-credential", timeout=20)
            return answer, dict(rpc.initial_metadata()), dict(rpc.trailing_metadata())

    answer, initial, trailing = await asyncio.to_thread(call)
    token = str(grpc_server.calls[-1]["metadata"]["authorization"]).partition(" ")[2]
    assert len(token) > 20
    assert answer == b"you sent " + b"*" * len(token)
    assert initial["x-echo"] == "*" * len(token)
    assert trailing["x-echo-trailer"] == "*" * len(token)
    assert trailing["x-served-by"] == "grpc-counterpart"


@pytest.mark.parametrize("inject", ["jwt", "header"])
async def test_unary_call_with_self_signed_jwt_or_static_key(
    credproxy, grpc_server, tmp_path, inject
):
    """The other credential types on gRPC calls: a self-signed JWT made for the call (verified
    against credproxy's published JWKS), or a static key in a header."""
    key_file, jwt_key = tmp_path / "api-key", tmp_path / "jwt.pem"
    key_file.write_text("static-key-0123456789abcdef\n")
    jwt_key.write_bytes(ec_private_pem()[0])
    credential = (
        "{issuer: self, inject: bearer}"
        if inject == "jwt"
        else "{issuer: legacy-key, inject: header, header: X-Api-Key}"
    )
    proc = credproxy(f"""\
{PREAMBLE}issuers:
  legacy-key: {{type: static, secret_file: {key_file}}}
  self:
    type: self_signed_jwt
    iss: orders-service
    sub: orders-service
    key_file: {jwt_key}
    request_claims: true
routes:
  - name: grpc
    path_prefix: /{SERVICE}/
    strip_prefix: false
    upstream: {grpc_server.origin}
    upstream_protocol: h2c
    credential: {credential}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: json}}
""")
    if inject == "jwt":
        grpc_server.jwks_url = proc.admin_url + "/.well-known/jwks.json"
    else:
        grpc_server.api_key = "static-key-0123456789abcdef"

    def call() -> list[bytes]:
        with _channel(proc) as channel:
            unary = _method(channel, "unary_unary", "Unary")
            return [bytes(unary(b"call-%d" % i, timeout=20)) for i in range(3)]

    assert await asyncio.to_thread(call) == [b"call-%d" % i for i in range(3)]
    assert grpc_server.refused == [] and len(grpc_server.calls) == 3
    if inject == "jwt":  # a JWT per call, never one reused
        tokens = {c["metadata"]["authorization"] for c in grpc_server.calls}
        assert len(tokens) == 3


async def test_http1_app_gets_the_h2_upstreams_trailers_in_its_last_chunk(
    idp, upstream, credproxy, grpc_server
):
    """An HTTP/1.1 app on an h2c route: the request goes upstream as an HTTP/2 stream and the
    answer comes back chunked, the upstream's trailers (grpc-status) in the last chunk."""
    proc = _start(credproxy, idp, upstream, grpc_server)
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    message = b"over http/1.1"
    frame = b"\0" + len(message).to_bytes(4, "big") + message  # gRPC's length-prefixed message

    def exchange() -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /%s/Unary HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/grpc\r\n"
                b"TE: trailers\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (SERVICE.encode(), host.encode(), port.encode(), len(frame), frame)
            )
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    received = await asyncio.to_thread(exchange)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    assert frame in body
    last = body[body.rindex(b"\r\n0\r\n") + 2 :]
    assert b"grpc-status: 0\r\n" in last and b"x-served-by: grpc-counterpart\r\n" in last
    assert last.endswith(b"\r\n\r\n")


class _Http1OnlyTLS(ThreadedApp):
    """An HTTPS upstream that speaks HTTP/1.1 only (no h2 in its ALPN): says what it saw."""

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            return web.json_response(
                {"version": list(request.version), "key": request.headers.get("X-Api-Key")}
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def test_auto_speaks_h2_where_alpn_chooses_it_and_http1_elsewhere(
    idp, upstream, credproxy, client, tmp_path
):
    """``upstream_protocol: auto`` offers h2 and http/1.1: a gRPC call reaches a TLS grpcio
    server over HTTP/2, and plain requests reach an HTTPS upstream that speaks HTTP/1.1 only
    (every time, without failing first); an ``h2`` route to that upstream is refused with a
    problem naming the route."""
    ca = TestCA(tmp_path)
    server = GrpcServer(idp, upstream.audience, tls=ca.issue("127.0.0.1", server=True, stem="g"))
    server.start()
    http1 = _Http1OnlyTLS(tls=ca.server_context())
    http1.start()
    key_file = tmp_path / "key"
    key_file.write_text("auto-key-0123456789abcdef\n")
    try:
        grpc_route = _route(server, upstream.audience).replace(
            "upstream_protocol: h2c", f"upstream_protocol: auto\n    ca_file: {ca.ca_file}"
        )
        proc = credproxy(
            config(
                idp=idp,
                upstream=upstream.origin,
                audience=upstream.audience,
                extra_issuer=f"  key: {{type: static, secret_file: {key_file}}}\n",
                extra_route=grpc_route
                + f"""\
  - name: rest
    path_prefix: /rest/
    upstream: {http1.origin}
    upstream_protocol: auto
    ca_file: {ca.ca_file}
    credential: {{issuer: key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
  - name: strict
    path_prefix: /strict/
    upstream: {http1.origin}
    upstream_protocol: h2
    ca_file: {ca.ca_file}
    credential: {{issuer: key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
""",
            )
        )

        def call() -> bytes:
            with _channel(proc) as channel:
                return bytes(_method(channel, "unary_unary", "Unary")(b"auto", timeout=20))

        assert await asyncio.to_thread(call) == b"auto"
        for _ in range(2):
            async with client.get(proc.url + "/rest/x") as response:
                assert response.status == 200
                # the key reached it; its echo comes back masked
                assert await response.json() == {"version": [1, 1], "key": "*" * 25}
        async with client.get(proc.url + "/strict/x") as response:
            problem = await response.json()
        assert response.status == 502 and problem["code"] == "upstream_protocol_error"
        assert problem["route"] == "strict"
        assert "did not choose HTTP/2" in proc.log()
    finally:
        http1.stop()
        server.stop()


async def test_server_streaming_is_byte_exact(idp, upstream, credproxy, grpc_server):
    """1,000 messages, 20 MB, from the server arrive whole and in order."""
    proc = _start(credproxy, idp, upstream, grpc_server)

    def call() -> list[bytes]:
        with _channel(proc) as channel:
            stream = _method(channel, "unary_stream", "ServerStream")
            return list(stream(f"{MESSAGES},{MESSAGE_BYTES}".encode(), timeout=120))

    messages = await asyncio.to_thread(call)
    assert len(messages) == MESSAGES
    assert messages == [_message(i, MESSAGE_BYTES) for i in range(MESSAGES)]


async def test_client_streaming_is_byte_exact(idp, upstream, credproxy, grpc_server):
    """1,000 messages, 20 MB, from the app reach the server whole and in order."""
    proc = _start(credproxy, idp, upstream, grpc_server)
    sent = [_message(i, MESSAGE_BYTES) for i in range(MESSAGES)]

    def call():
        with _channel(proc) as channel:
            stream = _method(channel, "stream_unary", "ClientStream")
            return stream(iter(sent), timeout=120)

    count, total, digest = (await asyncio.to_thread(call)).decode().split(",")
    assert int(count) == MESSAGES and int(total) == MESSAGES * MESSAGE_BYTES
    assert digest == hashlib.sha256(b"".join(sent)).hexdigest()


async def test_bidirectional_streaming_is_byte_exact(idp, upstream, credproxy, grpc_server):
    """1,000 messages, 20 MB each way, echoed as they come: both directions flow at once."""
    proc = _start(credproxy, idp, upstream, grpc_server)
    sent = [_message(i, MESSAGE_BYTES) for i in range(MESSAGES)]

    def call() -> list[bytes]:
        with _channel(proc) as channel:
            stream = _method(channel, "stream_stream", "Bidi")
            return list(stream(iter(sent), timeout=120))

    assert await asyncio.to_thread(call) == sent


async def test_deadline_is_propagated_and_cancels_upstream(idp, upstream, credproxy, grpc_server):
    """The app's deadline reaches the server (grpc-timeout), the app gets DEADLINE_EXCEEDED,
    and the call is cancelled at the server rather than left running."""
    proc = _start(credproxy, idp, upstream, grpc_server)

    def call() -> grpc.StatusCode:
        with _channel(proc) as channel:
            slow = _method(channel, "unary_unary", "Slow")
            try:
                slow(b"x", timeout=2)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    assert await asyncio.to_thread(call) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert grpc_server.slow_deadlines and 0 < grpc_server.slow_deadlines[0] <= 2
    assert await asyncio.to_thread(grpc_server.slow_cancelled.wait, 10)


async def test_silent_upstream_stream_is_cut_at_idle_s(idp, upstream, credproxy, grpc_server):
    """An upstream that answers nothing within the route's idle_s: the app gets
    DEADLINE_EXCEEDED from credproxy (upstream_timeout), and the upstream's stream is reset."""
    proc = _start(
        credproxy, idp, upstream, grpc_server, extra="    timeouts: {idle_s: 1, total_s: 60}\n"
    )

    def call() -> grpc.RpcError:
        with _channel(proc) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                _method(channel, "unary_unary", "Slow")(b"x", timeout=30)
            return caught.value

    error = await asyncio.to_thread(call)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timeout" in (error.details() or "")
    assert await asyncio.to_thread(grpc_server.slow_cancelled.wait, 10)


async def test_sigterm_drains_a_grpc_call_in_flight(idp, upstream, credproxy, grpc_server):
    """A call in flight when credproxy is told to stop (SIGTERM) completes: the app connection
    gets a GOAWAY and its stream is answered before credproxy exits."""
    proc = _start(credproxy, idp, upstream, grpc_server)

    def call() -> bytes:
        with _channel(proc) as channel:
            return bytes(_method(channel, "unary_unary", "Slow")(b"hold", timeout=30))

    pending = asyncio.ensure_future(asyncio.to_thread(call))  # noqa: TID251 - test-local
    assert await asyncio.to_thread(grpc_server.slow_started.wait, 10)
    assert proc.process is not None
    proc.process.send_signal(signal.SIGTERM)
    await asyncio.to_thread(wait_until, lambda: "draining" in proc.log(), 10, "the drain")
    grpc_server.release.set()
    assert await pending == b"hold"
    assert await asyncio.to_thread(proc.process.wait, 15) == 0


async def test_refused_caller_gets_permission_denied(idp, upstream, credproxy, grpc_server):
    """A caller the route does not allow gets PERMISSION_DENIED in grpc-status, and nothing
    reaches the server."""
    text = config(
        idp=idp,
        upstream=upstream.origin,
        audience=upstream.audience,
        extra_route=_route(grpc_server, upstream.audience).replace(
            "callers: [test-suite]", "callers: [someone-else]"
        ),
    ).replace("callers:\n", "callers:\n  someone-else: {uid: 4242}\n")
    proc = credproxy(text)

    def call() -> grpc.RpcError:
        with _channel(proc) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                _method(channel, "unary_unary", "Unary")(b"x", timeout=10)
            return caught.value

    error = await asyncio.to_thread(call)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not allowed" in (error.details() or "")
    assert grpc_server.calls == [] and grpc_server.refused == []
    denied = proc.audit("request.denied")
    assert denied and denied[-1]["reason"] == "caller_not_allowed"


async def test_unavailable_idp_gives_unavailable(idp, upstream, credproxy, grpc_server):
    """When the route's issuer cannot be reached, the call ends UNAVAILABLE and nothing reaches
    the server."""
    dead = f"http://127.0.0.1:{free_port()}"
    text = config(
        idp=idp,
        upstream=upstream.origin,
        audience=upstream.audience,
        extra_issuer=f"""\
  dead-idp:
    type: oauth2
    issuer_url: {dead}
    client_id: orders-service
    client_auth: private_key_jwt
    client_key_file: {idp.client_key_file}
""",
        extra_route=_route(grpc_server, upstream.audience).replace(
            "issuer: test-idp", "issuer: dead-idp"
        ),
    )
    proc = credproxy(text, expect_ready=False)

    def call() -> grpc.RpcError:
        with _channel(proc) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                _method(channel, "unary_unary", "Unary")(b"x", timeout=20)
            return caught.value

    error = await asyncio.to_thread(call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert grpc_server.calls == []


async def test_hundred_concurrent_streams_share_one_connection_and_token(
    idp, upstream, credproxy, grpc_server
):
    """100 calls at once on one app connection are all answered, with one token request at the
    IdP between them."""
    before = len([r for r in idp.records() if r.get("client_assertion")])
    proc = _start(credproxy, idp, upstream, grpc_server)  # its first token: at start

    def calls() -> list[bytes]:
        with _channel(proc) as channel:
            unary = _method(channel, "unary_unary", "Unary")
            futures = [unary.future(b"call-%d" % i, timeout=60) for i in range(100)]
            return [f.result() for f in futures]

    answers = await asyncio.to_thread(calls)
    assert answers == [b"call-%d" % i for i in range(100)]
    assert len(grpc_server.calls) == 100
    token_requests = len([r for r in idp.records() if r.get("client_assertion")]) - before
    assert token_requests == 1
    assert len({c["metadata"]["dpop"] for c in grpc_server.calls}) == 100  # a proof per stream


async def test_upstream_goaway_loses_no_unsent_call(idp, upstream, credproxy):
    """The upstream sends GOAWAY on each connection after 300 ms (grpcio's connection
    rotation) while calls flow: every call completes, calls the old connection did not take
    going on a new one."""
    server = GrpcServer(idp, upstream.audience, max_connection_age_ms=300)
    server.start()
    try:
        proc = _start(credproxy, idp, upstream, server)
        total, deadline = 0, time.monotonic() + 3

        def calls() -> list[tuple[bytes, bytes | str]]:
            nonlocal total
            results: list[tuple[bytes, bytes | str]] = []
            with _channel(proc) as channel:
                unary = _method(channel, "unary_unary", "Unary")
                while time.monotonic() < deadline:  # waves of 20 calls at once, for 3 s
                    sent = [b"call-%d" % (total + i) for i in range(20)]
                    futures = [unary.future(message, timeout=30) for message in sent]
                    total += 20
                    for message, future in zip(sent, futures, strict=True):
                        try:
                            results.append((message, future.result()))
                        except grpc.RpcError as exc:
                            results.append((message, f"{exc.code()}: {exc.details()}"))
            return results

        results = await asyncio.to_thread(calls)
    finally:
        server.stop()
    assert [answer for _, answer in results] == [message for message, _ in results]
    assert len(server.calls) == total  # each once
    connections = {call["peer"] for call in server.calls}
    assert len(connections) >= 3  # credproxy moved to new connections after each GOAWAY


async def test_grpc_calls_are_logged_and_audited(idp, upstream, credproxy, grpc_server):
    """Each call is one access-log line naming the protocol and its grpc-status, and one
    credential.used audit event (audit.used: request)."""
    proc = _start(
        credproxy, idp, upstream, grpc_server, top='audit: {file: "{audit}", used: request}'
    )

    def call() -> None:
        with _channel(proc) as channel:
            for _ in range(3):
                _method(channel, "unary_unary", "Unary")(b"x", timeout=20)

    await asyncio.to_thread(call)

    def access() -> list[str]:
        lines = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
        return [line["msg"] for line in lines if "/test.Echo/Unary" in line.get("msg", "")]

    await asyncio.to_thread(wait_until, lambda: len(access()) >= 3, 10, "three access lines")
    lines = access()
    assert len(lines) == 3
    assert all("protocol=h2" in line and "grpc_status=0" in line for line in lines)
    used = [e for e in proc.audit("credential.used") if e.get("route") == "grpc"]
    assert len(used) == 3 and {e["path"] for e in used} == {"/test.Echo/Unary"}
    with urllib.request.urlopen(proc.admin_url + "/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert 'credproxy_http2_streams_total{grpc_status="0",route="grpc"} 3.0' in metrics
