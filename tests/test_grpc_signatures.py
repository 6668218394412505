"""gRPC calls signed per call (issue 20): SigV4 with STS credentials from moto, and RFC 9421
with credproxy's own key, each verified by the grpcio server behind credproxy over what it
received (``grpc_signatures``); tampered replays of the signed calls are refused there.

What SigV4 signs on a gRPC call: ``:authority`` (as ``host``), ``:path``, ``content-type``,
``x-amz-date``, the session token, and a payload hash. A gRPC request body is a stream
(bidirectional calls send while they receive), so a route for gRPC says ``payload: unsigned``
(the default for ``service: vpc-lattice-svcs``):
``x-amz-content-sha256: UNSIGNED-PAYLOAD``, sent and signed (as VPC Lattice, the AWS service
that fronts gRPC, requires). ``payload: signed`` buffers the call's whole request stream to hash
it (bounded by ``payload_max_bytes``): for unary calls only. RFC 9421 likewise: ``content-digest``
in the components buffers the body; a streaming route leaves it out."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from http_message_signatures import algorithms

from tests.aws_counterparts import REGION, Moto, Relay, aws_config
from tests.counterparts import PREAMBLE, Credproxy
from tests.grpc_counterpart import SERVICE, GrpcServer, _message
from tests.grpc_signatures import MessageSignatureCheck, SignatureCheck, SigV4Check
from tests.tls import TestCA

LATTICE = "vpc-lattice-svcs"  # the signing name of VPC Lattice services


def _identity(data: bytes) -> bytes:
    return data


def _sts_keys(moto: Moto):
    """Access key id → (secret key, session token) of the credentials moto's STS issued."""

    def keys(key_id: str) -> tuple[str, str | None] | None:
        with urllib.request.urlopen(moto.url + "/moto-api/data.json", timeout=10) as response:
            state = json.load(response)
        for role in state.get("sts", {}).get("AssumedRole", []):
            if role.get("access_key_id") == key_id:
                return str(role["secret_access_key"]), str(role["session_token"])
        return None

    return keys


def _serve(check: SignatureCheck, protocol: str, tmp_path: Path) -> GrpcServer:
    """The verifying server, h2c or (``h2``) HTTP/2 over TLS with a test CA's certificate."""
    tls = None
    if protocol == "h2":
        tls = TestCA(tmp_path).issue("127.0.0.1", server=True, stem="grpc")
        check.scheme = "https"
    server = GrpcServer(None, "", interceptors=[check], tls=tls)
    server.start()
    return server


def _grpc_route(name: str, prefix: str, server: GrpcServer, credential: str) -> str:
    strip = "false" if prefix == f"/{SERVICE}/" else "true"
    protocol = "h2c"
    if server.tls is not None:  # the CA beside the certificate (TestCA's layout)
        protocol = f"h2\n    ca_file: {server.tls[0].parent / 'ca.pem'}"
    return f"""\
  - name: {name}
    path_prefix: {prefix}
    strip_prefix: {strip}
    upstream: {server.origin}
    upstream_protocol: {protocol}
    credential: {credential}
    allow: [{{callers: [test-suite]}}]
"""


def _method(channel: grpc.Channel, kind: str, path: str) -> Any:
    return getattr(channel, kind)(
        path, request_serializer=_identity, response_deserializer=_identity
    )


def _target(proc: Credproxy) -> str:
    return proc.url.removeprefix("http://")


def _replay(port: int, path: str, metadata: list[tuple[str, str]], message: bytes) -> Any:
    """A unary call straight to the server with captured metadata: the code it ends with."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            _method(channel, "unary_unary", path)(message, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def _captured(server: GrpcServer, names: tuple[str, ...]) -> list[tuple[str, str]]:
    seen = server.calls[-1]["metadata"]
    return [(name, str(seen[name])) for name in names if name in seen]


@pytest.fixture
def sigv4_server(request, moto, tmp_path) -> Iterator[tuple[GrpcServer, SigV4Check]]:
    check = SigV4Check(LATTICE, REGION, _sts_keys(moto))
    server = _serve(check, getattr(request, "param", "h2c"), tmp_path)
    yield server, check
    server.stop()


def _sigv4_proxy(credproxy, moto: Moto, sts_relay: Relay, server: GrpcServer) -> Credproxy:
    scope = f"issuer: aws, inject: sigv4, service: {LATTICE}, region: {REGION}"
    routes = _grpc_route(
        "lattice",
        f"/{SERVICE}/",
        server,
        f"{{{scope}}}",  # unsigned: VPC Lattice's default
    ) + _grpc_route("lattice-hashed", "/hashed/", server, f"{{{scope}, payload: signed}}")
    proc: Credproxy = credproxy(aws_config(moto, sts_relay.url, extra_route=routes))
    return proc


@pytest.mark.parametrize("sigv4_server", ["h2c", "h2"], indirect=True)
async def test_sigv4_signs_unary_and_streaming_calls_with_unsigned_payload(
    moto, sts_relay, credproxy, sigv4_server
):
    """On a ``payload: unsigned`` route, unary and bidirectional calls reach the server (h2c,
    or HTTP/2 over TLS) signed with STS credentials (host, path, content-type, date, token and
    ``UNSIGNED-PAYLOAD`` verified there), the bidirectional one streamed; the app's
    authorization never gets there."""
    server, check = sigv4_server
    proc = _sigv4_proxy(credproxy, moto, sts_relay, server)
    sent = [_message(i, 4096) for i in range(50)]

    def calls() -> tuple[bytes, list[bytes]]:
        with grpc.insecure_channel(_target(proc)) as channel:
            own = [("authorization", "AWS4-HMAC-SHA256 Credential=app-own-secret-0123")]
            unary = _method(channel, "unary_unary", f"/{SERVICE}/Unary")
            answer = bytes(unary(b"signed call", metadata=own, timeout=20))
            bidi = _method(channel, "stream_stream", f"/{SERVICE}/Bidi")
            return answer, list(bidi(iter(sent), metadata=own, timeout=30))

    answer, echoed = await asyncio.to_thread(calls)
    assert answer == b"signed call" and echoed == sent
    assert check.refused == []
    assert [a["call"].path for a in check.accepted] == [f"/{SERVICE}/Unary", f"/{SERVICE}/Bidi"]
    for accepted in check.accepted:
        assert accepted["key_id"].startswith("ASIA")  # STS session credentials
        assert accepted["payload_hash"] == "UNSIGNED-PAYLOAD"
        assert {"host", "content-type", "x-amz-security-token"} <= set(accepted["signed"])
        assert "app-own-secret" not in accepted["call"].header("authorization")
    assert [c["method"] for c in server.calls] == ["Unary", "Bidi"]


async def test_sigv4_signed_payload_hashes_the_unary_body(moto, sts_relay, credproxy, sigv4_server):
    """On a ``payload: signed`` route a unary call's body (its gRPC frame) is hashed into the
    signature: the server verifies it against the SHA-256 of the bytes it received."""
    server, check = sigv4_server
    proc = _sigv4_proxy(credproxy, moto, sts_relay, server)
    message = bytes(range(256)) * 64

    def call() -> bytes:
        with grpc.insecure_channel(_target(proc)) as channel:
            return bytes(
                _method(channel, "unary_unary", f"/hashed/{SERVICE}/Unary")(message, timeout=20)
            )

    assert await asyncio.to_thread(call) == message
    [accepted] = check.accepted
    assert accepted["call"].path == f"/{SERVICE}/Unary"
    assert accepted["payload_hash"] not in ("UNSIGNED-PAYLOAD", "")
    assert accepted["body_bytes"] == 5 + len(message)


async def test_sigv4_tampered_replays_are_refused(moto, sts_relay, credproxy, sigv4_server):
    """The signature of a call, replayed straight to the server: unchanged it verifies; with
    another method path, another authority, another body (signed payload), or without it, the
    server refuses the call UNAUTHENTICATED."""
    server, check = sigv4_server
    proc = _sigv4_proxy(credproxy, moto, sts_relay, server)
    names = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")

    def signed(path: str, message: bytes) -> list[tuple[str, str]]:
        with grpc.insecure_channel(_target(proc)) as channel:
            _method(channel, "unary_unary", path)(message, timeout=20)
        return _captured(server, names)

    unsigned_payload = await asyncio.to_thread(signed, f"/{SERVICE}/Unary", b"original")
    hashed = await asyncio.to_thread(signed, f"/hashed/{SERVICE}/Unary", b"original")
    port, unary, slow = server.port, f"/{SERVICE}/Unary", f"/{SERVICE}/Slow"
    replays = [
        (port, unary, unsigned_payload, b"original", grpc.StatusCode.OK),
        (port, slow, unsigned_payload, b"original", grpc.StatusCode.UNAUTHENTICATED),
        (port, unary, hashed, b"original", grpc.StatusCode.OK),
        (port, unary, hashed, b"tampered", grpc.StatusCode.UNAUTHENTICATED),
        (port, unary, [], b"original", grpc.StatusCode.UNAUTHENTICATED),
    ]
    for port_, path, metadata, message, expected in replays:
        assert await asyncio.to_thread(_replay, port_, path, metadata, message) == expected
    refused = list(check.refused)
    assert len(refused) == 3 and "does not match" in refused[0] and "does not match" in refused[1]
    assert "AWS4-HMAC-SHA256" in refused[2]

    # another authority: the server reached as localhost instead of the 127.0.0.1 signed
    def other_authority() -> grpc.StatusCode:
        with grpc.insecure_channel(f"localhost:{server.port}") as channel:
            try:
                _method(channel, "unary_unary", unary)(
                    b"original", metadata=unsigned_payload, timeout=10
                )
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    assert await asyncio.to_thread(other_authority) == grpc.StatusCode.UNAUTHENTICATED
    assert "does not match" in check.refused[-1]


def _signature_proxy(credproxy, server: GrpcServer, tmp_path) -> Credproxy:
    issuer = "  self: {type: self_signed_jwt, iss: orders, sub: orders, alg: EdDSA}\n"
    no_digest = '{components: ["@method", "@target-uri", "date"]}'
    streaming = f"{{issuer: self, inject: http_signature, signature: {no_digest}}}"
    routes = _grpc_route(
        "signed", f"/{SERVICE}/", server, "{issuer: self, inject: http_signature}"
    ) + _grpc_route("signed-stream", "/stream/", server, streaming)
    proc: Credproxy = credproxy(f"""\
{PREAMBLE}issuers:
{issuer}routes:
{routes}audit: {{file: "{{audit}}"}}
log: {{format: json}}
""")
    return proc


def _trust_jwks(proc: Credproxy, check: MessageSignatureCheck) -> None:
    with urllib.request.urlopen(proc.admin_url + "/.well-known/jwks.json", timeout=10) as response:
        keys = jwt.PyJWKSet.from_dict(json.load(response))
    check.keys.update({key.key_id: key.key for key in keys.keys if key.key_id})


@pytest.fixture
def signature_server(request, tmp_path) -> Iterator[tuple[GrpcServer, MessageSignatureCheck]]:
    check = MessageSignatureCheck(algorithms.ED25519, digest_required=False)
    server = _serve(check, getattr(request, "param", "h2c"), tmp_path)
    yield server, check
    server.stop()


@pytest.mark.parametrize("signature_server", ["h2c", "h2"], indirect=True)
async def test_message_signature_covers_unary_body_and_streams_without_digest(
    credproxy, signature_server, tmp_path
):
    """RFC 9421 on gRPC calls, h2c or over TLS (``@target-uri`` with the https scheme): a
    unary call signed with its body's Content-Digest (checked
    against the frame the server received), and on a route without content-digest a
    bidirectional call that streams, both verified with the key credproxy publishes; the app's
    own signature and authorization metadata never reach the server."""
    server, check = signature_server
    proc = _signature_proxy(credproxy, server, tmp_path)
    await asyncio.to_thread(_trust_jwks, proc, check)
    sent = [_message(i, 4096) for i in range(50)]

    def calls() -> tuple[bytes, list[bytes]]:
        with grpc.insecure_channel(_target(proc)) as channel:
            forged = [
                ("signature", "sig1=:AAAA:"),
                ("signature-input", 'sig1=("@method")'),
                ("authorization", "Bearer app-own-secret-0123456789"),
            ]
            answer = bytes(
                _method(channel, "unary_unary", f"/{SERVICE}/Unary")(
                    b"signed call", metadata=forged, timeout=20
                )
            )
            bidi = _method(channel, "stream_stream", f"/stream/{SERVICE}/Bidi")
            return answer, list(bidi(iter(sent), timeout=30))

    answer, echoed = await asyncio.to_thread(calls)
    assert answer == b"signed call" and echoed == sent
    assert check.refused == []
    unary, bidi = check.accepted
    params = '"@signature-params"'
    assert unary["covered"] == ['"@method"', '"@target-uri"', '"content-digest"', '"date"', params]
    assert unary["body_bytes"] == 5 + len(b"signed call")
    assert bidi["covered"] == ['"@method"', '"@target-uri"', '"date"', params]
    assert bidi["call"].path == f"/{SERVICE}/Bidi"
    assert unary["keyid"] == bidi["keyid"] in check.keys
    assert "authorization" not in server.calls[0]["metadata"]  # the app's, stripped


async def test_message_signature_tampered_replays_are_refused(
    credproxy, signature_server, tmp_path
):
    """A signed unary call replayed straight to the server: with another path or another body
    the signature (or its digest) fails; unchanged, the nonce was seen; without a signature
    the call is refused."""
    server, check = signature_server
    proc = _signature_proxy(credproxy, server, tmp_path)
    await asyncio.to_thread(_trust_jwks, proc, check)

    def signed() -> list[tuple[str, str]]:
        with grpc.insecure_channel(_target(proc)) as channel:
            _method(channel, "unary_unary", f"/{SERVICE}/Unary")(b"original", timeout=20)
        return _captured(server, ("signature", "signature-input", "content-digest", "date"))

    metadata = await asyncio.to_thread(signed)
    unary, slow = f"/{SERVICE}/Unary", f"/{SERVICE}/Slow"
    for path, message in ((slow, b"original"), (unary, b"tampered"), (unary, b"original")):
        code = await asyncio.to_thread(_replay, server.port, path, metadata, message)
        assert code == grpc.StatusCode.UNAUTHENTICATED
    code = await asyncio.to_thread(_replay, server.port, unary, [], b"original")
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert len(check.accepted) == 1
    other_path, other_body, replayed, missing = check.refused
    assert other_path.startswith("InvalidSignature") and other_body.startswith("InvalidSignature")
    assert replayed == "Refused: replayed"
    assert missing.startswith("InvalidSignature")
