"""HTTP/2 from the app (issue 20): h2c with prior knowledge on the HTTP/1.1 listener, every
stream through the whole pipeline; and the hostile set, refused without harming others. The
clients are curl (nghttp2) and raw ``h2`` connections; the upstream is the verifying resource
server."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame

from tests.counterparts import config

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _proxy_config(idp, upstream, **kwargs):
    return config(idp=idp, upstream=upstream.origin, audience=upstream.audience, **kwargs)


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "20", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


class RawH2:
    """A client ``h2`` connection on a plain socket: frames written as the test wants them."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.authority = f"{host}:{port}"
        self.events: list[h2.events.Event] = []

    def start(self) -> None:
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(self, path: str, *, end: bool = True, extra=()) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "GET"), (":scheme", "http"), (":authority", self.authority),
            (":path", path), *extra,
        ]  # fmt: skip
        self.conn.send_headers(stream_id, headers, end_stream=end)
        self.flush()
        return stream_id

    def read_until(self, done, limit: int = 10000) -> list[h2.events.Event]:
        """Read frames until ``done(events)`` or the connection ends."""
        for _ in range(limit):
            if done(self.events):
                break
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                data = b""
            if not data:
                self.events.append(h2.events.ConnectionTerminated())
                break
            self.events += self.conn.receive_data(data)
            try:
                self.flush()
            except OSError:
                pass
        return self.events

    def close(self) -> None:
        self.sock.close()


def _ended(stream_id):
    return lambda events: any(
        isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
        and e.stream_id == stream_id
        or isinstance(e, h2.events.ConnectionTerminated)
        for e in events
    )


def _terminated(events) -> bool:
    return any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


async def test_curl_h2c_get_through_a_dpop_route(idp, upstream, credproxy):
    """curl --http2-prior-knowledge GET reaches the verifying upstream with a DPoP-bound token
    and a proof made for it; the answer comes back on HTTP/2."""
    proc = credproxy(_proxy_config(idp, upstream))
    result = await asyncio.to_thread(
        _curl, "-w", "\\n%{http_version}", proc.url + "/payments/v1/charges?limit=2"
    )
    body, _, version = result.stdout.rpartition("\n")
    assert result.returncode == 0, result.stderr
    assert version == "2"
    answer = json.loads(body)
    assert answer["authorization_schemes"] == ["DPoP"]
    assert answer["path"] == "/v1/charges" and answer["query"] == "limit=2"
    assert answer["jkt"]
    token, proof = upstream.seen()[-1]
    assert token and proof


async def test_streams_on_one_connection_each_get_their_own_proof(idp, upstream, credproxy):
    """Several streams multiplexed on one h2c connection are each answered, each with a fresh
    DPoP proof (a proof per stream, never one per connection)."""
    proc = credproxy(_proxy_config(idp, upstream))
    before = len(upstream.seen())
    urls = [proc.url + f"/payments/v1/item/{i}" for i in range(8)]
    result = await asyncio.to_thread(_curl, "--parallel", "--parallel-immediate", *urls)
    assert result.returncode == 0, result.stderr
    paths = sorted(
        json.loads(line)["path"] for line in result.stdout.replace("}{", "}\n{").splitlines()
    )
    assert paths == sorted(f"/v1/item/{i}" for i in range(8))
    proofs = [proof for _, proof in upstream.seen()[before:]]
    assert len(proofs) == 8 and len(set(proofs)) == 8


async def test_app_credentials_are_stripped_from_h2_headers(idp, upstream, credproxy):
    """An app's authorization, dpop and proxy-authorization fields on HTTP/2 never reach the
    upstream, as on HTTP/1.1."""
    proc = credproxy(_proxy_config(idp, upstream))
    result = await asyncio.to_thread(
        _curl,
        "-H", "authorization: Bearer app-secret-token-1234567890",
        "-H", "dpop: app-proof",
        "-H", "x-api-key: app-key-1234567890",
        "-H", "x-kept: 1",
        proc.url + "/payments/v1/x",
    )  # fmt: skip
    answer = json.loads(result.stdout)
    names = {name.lower(): value for name, value in answer["headers"]}
    assert answer["authorization_schemes"] == ["DPoP"]
    assert "x-api-key" not in names and names["x-kept"] == "1"
    assert "app-secret-token" not in result.stdout


async def test_refusal_is_problem_json_on_the_stream(idp, upstream, credproxy):
    """A refused stream (no route) gets problem+json on that stream; the same connection serves
    the next stream."""
    proc = credproxy(_proxy_config(idp, upstream))

    def exchange() -> tuple[dict[int, Any], dict[int, bytes]]:
        client = RawH2(proc.url)
        client.start()
        refused = client.request("/nowhere")
        client.read_until(_ended(refused))
        served = client.request("/payments/v1/ok")
        events = client.read_until(_ended(served))
        client.close()
        heads = {
            e.stream_id: dict(e.headers)
            for e in events
            if isinstance(e, h2.events.ResponseReceived)
        }
        bodies: dict[int, bytes] = {}
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                bodies[e.stream_id] = bodies.get(e.stream_id, b"") + e.data
        return heads, bodies

    heads, bodies = await asyncio.to_thread(exchange)
    assert heads[1][":status"] == "404" and heads[1]["content-type"] == "application/problem+json"
    assert json.loads(bodies[1])["code"] == "route_not_found"
    assert heads[3][":status"] == "200" and json.loads(bodies[3])["path"] == "/v1/ok"


async def test_refused_stream_with_a_body_still_coming_is_reset_after_its_answer(
    idp, upstream, credproxy
):
    """A stream refused while its body is still being sent gets its complete problem answer,
    then RST_STREAM(NO_ERROR) so the app stops sending (RFC 9113 §8.1); the connection goes on."""
    proc = credproxy(_proxy_config(idp, upstream))

    def exchange() -> list[h2.events.Event]:
        client = RawH2(proc.url)
        client.start()
        stream = client.request("/nowhere", end=False)
        client.conn.send_data(stream, b"x" * 1000)
        client.flush()
        events = client.read_until(
            lambda events: (
                any(isinstance(e, h2.events.StreamReset) for e in events) or _terminated(events)
            )
        )
        served = client.request("/payments/v1/after")
        events = client.read_until(_ended(served))
        client.close()
        return events

    events = await asyncio.to_thread(exchange)
    kinds = [(type(e).__name__, getattr(e, "stream_id", 0)) for e in events]
    answer = kinds.index(("ResponseReceived", 1))
    reset = next(e for e in events if isinstance(e, h2.events.StreamReset))
    assert reset.stream_id == 1 and reset.error_code == ErrorCodes.NO_ERROR
    assert answer < kinds.index(("StreamReset", 1))
    assert any(
        isinstance(e, h2.events.ResponseReceived) and e.stream_id == 3 and _status(e) == "200"
        for e in events
    )


def _status(event: Any) -> str:
    """``:status`` of a response event (the test clients decode headers as text)."""
    return str(dict(event.headers)[":status"])


def _sibling_works(url: str) -> bool:
    """A fresh h2c connection is still served: the attack harmed no other connection."""
    client = RawH2(url)
    try:
        client.start()
        stream = client.request("/payments/v1/sibling")
        events = client.read_until(_ended(stream))
        return any(
            isinstance(e, h2.events.ResponseReceived) and _status(e) == "200" for e in events
        )
    finally:
        client.close()


async def test_invalid_preface_is_refused(idp, upstream, credproxy):
    """A connection that starts like the HTTP/2 preface and then breaks it is closed with a
    GOAWAY (PROTOCOL_ERROR); others are served."""
    proc = credproxy(_proxy_config(idp, upstream))
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)

    def attack() -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + b"\0" * 64)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    received = await asyncio.to_thread(attack)
    assert b"HTTP/1.1" not in received  # never mistaken for an HTTP/1.1 request
    goaway = received.find(b"\x07\x00\x00\x00\x00\x00")  # a GOAWAY frame's type, flags, stream 0
    assert goaway >= 0, received
    assert await asyncio.to_thread(_sibling_works, proc.url)


async def test_oversized_header_list_is_refused(idp, upstream, credproxy):
    """A header list over app_limits.max_head_bytes ends that connection (GOAWAY); another
    connection is served meanwhile."""
    proc = credproxy(_proxy_config(idp, upstream, top="app_limits: {max_head_bytes: 4096}"))

    def attack() -> list[h2.events.Event]:
        client = RawH2(proc.url)
        client.start()
        client.conn.max_outbound_frame_size = 16384
        client.request("/payments/v1/x", extra=[(f"x-big-{i}", "v" * 200) for i in range(40)])
        events = client.read_until(_terminated)
        client.close()
        return events

    events = await asyncio.to_thread(attack)
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code in (
        ErrorCodes.ENHANCE_YOUR_CALM,
        ErrorCodes.PROTOCOL_ERROR,
        None,
    )
    assert not any(isinstance(e, h2.events.ResponseReceived) for e in events)
    assert await asyncio.to_thread(_sibling_works, proc.url)


async def test_too_many_streams_are_refused(idp, upstream, credproxy):
    """Streams beyond SETTINGS_MAX_CONCURRENT_STREAMS end the offending connection; the limit
    is announced and others are served."""
    proc = credproxy(_proxy_config(idp, upstream, top="app_limits: {max_concurrent_streams: 4}"))

    def attack() -> tuple[int | None, list[h2.events.Event]]:
        client = RawH2(proc.url)
        client.start()
        client.read_until(
            lambda events: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
        )
        announced = client.conn.remote_settings.max_concurrent_streams
        client.conn.remote_settings.max_concurrent_streams = 100  # the attacker ignores it
        client.conn.remote_settings.acknowledge()
        for _ in range(10):  # bodies never end: the streams stay open
            try:
                client.request("/payments/v1/upload", end=False)
            except (BrokenPipeError, ConnectionResetError):
                break  # credproxy ended the connection before all ten went out
        events = client.read_until(_terminated)
        client.close()
        return announced, events

    announced, events = await asyncio.to_thread(attack)
    assert announced == 4
    assert _terminated(events)
    assert await asyncio.to_thread(_sibling_works, proc.url)


async def test_continuation_flood_is_refused(idp, upstream, credproxy):
    """A HEADERS frame followed by endless CONTINUATION frames (CVE-2024-27316 class) ends the
    connection after a bounded number of frames; others are served."""
    proc = credproxy(_proxy_config(idp, upstream))

    def attack() -> tuple[int, bool]:
        client = RawH2(proc.url)
        client.start()
        first = HeadersFrame(1)
        first.data = client.conn.encoder.encode(
            [(":method", "GET"), (":scheme", "http"), (":authority", client.authority),
             (":path", "/payments/v1/x")]
        )  # fmt: skip
        client.sock.sendall(first.serialize())
        sent = 0
        try:
            for _ in range(10000):
                frame = ContinuationFrame(1)
                frame.data = b"\x40\x05x-pad\x05" + b"y" * 5  # literal header, never ended
                client.sock.sendall(frame.serialize())
                sent += 1
        except OSError:
            pass
        closed = False
        try:
            closed = client.sock.recv(65536) is not None
        except OSError:
            closed = True
        client.close()
        return sent, closed

    sent, closed = await asyncio.to_thread(attack)
    assert sent < 10000 and closed
    assert await asyncio.to_thread(_sibling_works, proc.url)


async def test_rapid_reset_is_refused(idp, upstream, credproxy):
    """Opening and at once resetting streams (CVE-2023-44487) ends the connection with GOAWAY
    ENHANCE_YOUR_CALM; others are served."""
    proc = credproxy(_proxy_config(idp, upstream))

    def attack() -> list[h2.events.Event]:
        client = RawH2(proc.url)
        client.start()
        try:
            for _ in range(1000):
                stream = client.request("/payments/v1/x")
                client.conn.reset_stream(stream, ErrorCodes.CANCEL)
                client.flush()
        except OSError:
            pass
        events = client.read_until(_terminated)
        client.close()
        return events

    events = await asyncio.to_thread(attack)
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert await asyncio.to_thread(_sibling_works, proc.url)


async def test_http1_still_served_beside_h2(idp, upstream, credproxy, client):
    """The same listener serves HTTP/1.1 requests, including methods starting with P."""
    proc = credproxy(_proxy_config(idp, upstream))
    async with client.post(proc.url + "/payments/v1/p", data=b"x") as response:
        assert response.status == 200 and (await response.json())["method"] == "POST"
    async with client.put(proc.url + "/payments/v1/p", data=b"x") as response:
        assert response.status == 200


class _TrailerRecorder:
    """A raw h2c upstream (the ``h2`` library on a socket, one connection): records each
    request's header block as it came and answers each stream, once it ends, with the JSON of
    the request trailers it received."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.origin = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

        self.heads: list[list[tuple[str, str]]] = []  # each request's header block, unchecked

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        conn = h2.connection.H2Connection(  # takes whatever comes, to show what credproxy sent
            h2.config.H2Configuration(
                client_side=False,
                header_encoding="utf-8",
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
            )
        )
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        trailers: dict[int, list[list[str]]] = {}
        with sock:
            while data := sock.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.heads.append([(str(n), str(v)) for n, v in event.headers or []])
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers[event.stream_id] = [
                            [str(f[0]), str(f[1])] for f in event.headers or []
                        ]
                    elif isinstance(event, h2.events.StreamEnded):
                        body = json.dumps(trailers.get(event.stream_id, [])).encode()
                        conn.send_headers(event.stream_id, [(":status", "200")])
                        conn.send_data(event.stream_id, body, end_stream=True)
                sock.sendall(conn.data_to_send())

    def close(self) -> None:
        self.listener.close()


def _recorder_route(recorder: _TrailerRecorder, upstream) -> str:
    """A DPoP route, /trailers/, to ``recorder`` over h2c."""
    return f"""\
  - name: trailers
    path_prefix: /trailers/
    upstream: {recorder.origin}
    upstream_protocol: h2c
    credential: {{issuer: test-idp, audience: "{upstream.audience}", scope: payments.write, inject: dpop}}
    allow: [{{callers: [test-suite]}}]
"""


async def test_request_trailers_reach_an_h2_upstream_minus_credentials(idp, upstream, credproxy):
    """Trailers the app sends after its body go upstream after the body on an HTTP/2 route;
    credential fields among them (authorization) are stripped like headers."""
    recorder = _TrailerRecorder()
    proc = credproxy(_proxy_config(idp, upstream, extra_route=_recorder_route(recorder, upstream)))

    def exchange() -> bytes:
        client = RawH2(proc.url)
        client.start()
        stream = client.request("/trailers/x", end=False)
        client.conn.send_data(stream, b"body bytes")
        client.conn.send_headers(
            stream, [("x-checksum", "abc123"), ("authorization", "Bearer app-secret-999")],
            end_stream=True,
        )  # fmt: skip
        client.flush()
        events = client.read_until(_ended(stream))
        client.close()
        return b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))

    try:
        received = json.loads(await asyncio.to_thread(exchange))
    finally:
        recorder.close()
    assert received == [["x-checksum", "abc123"]]


_MALFORMED_BLOCKS = {
    "pseudo-header after a regular one": [("x-a", "1"), (":path", "/trailers/admin")],
    "second :authority": [(":authority", "evil.example")],
    "connection-specific field": [("connection", "x-hop")],
    "te other than trailers": [("te", "gzip")],
    "upper-case name": [("X-Upper", "1")],
    "unknown pseudo-header": [(":protocol", "websocket")],
}


async def test_malformed_h2_header_blocks_never_reach_an_h2_upstream(idp, upstream, credproxy):
    """credproxy sends its HTTP/2 header blocks without h2's outbound checks (they cost a tenth
    of a gRPC call): this is why that is safe. A hostile app's malformed block (a pseudo-header
    out of place or twice, a connection-specific field, an upper-case name) is refused on
    arrival, before a route is chosen; the upstream gets only well-formed blocks: pseudo-headers
    first, each once, lower-case names, no connection-specific fields."""
    recorder = _TrailerRecorder()
    proc = credproxy(_proxy_config(idp, upstream, extra_route=_recorder_route(recorder, upstream)))

    def attempt(extra: list[tuple[str, str]]) -> list[h2.events.Event]:
        client = RawH2(proc.url)
        client.conn = h2.connection.H2Connection(  # the hostile app sends what it likes
            h2.config.H2Configuration(
                client_side=True,
                header_encoding="utf-8",
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        client.start()
        stream = client.request("/trailers/x", extra=extra)
        events = client.read_until(_ended(stream))
        client.close()
        return events

    try:
        for case, extra in _MALFORMED_BLOCKS.items():
            events = await asyncio.to_thread(attempt, extra)
            answered = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
            refused = [
                e
                for e in events
                if isinstance(e, h2.events.StreamReset | h2.events.ConnectionTerminated)
            ]
            assert refused and not answered, (case, events)
        assert recorder.heads == [], recorder.heads  # not one of them reached the upstream
        events = await asyncio.to_thread(attempt, [("x-kept", "1")])
        assert any(isinstance(e, h2.events.ResponseReceived) for e in events), events
    finally:
        recorder.close()
    [head] = recorder.heads
    names = [name for name, _ in head]
    pseudo = [name for name in names if name.startswith(":")]
    assert pseudo == [":method", ":scheme", ":authority", ":path"]
    assert names[:4] == pseudo  # first, each once
    assert all(name == name.lower() for name in names)
    assert not {"connection", "keep-alive", "transfer-encoding", "upgrade", "host"} & set(names)
    assert ("te", "trailers") in head and ("x-kept", "1") in head
