"""A real grpcio server on loopback (h2c) that verifies the credential of every call as a
resource server would: the DPoP-bound (or bearer) token against the test IdP's JWKS and the
DPoP proof made for the call's URI (``Verifier``). Methods take and give raw bytes (generic
handlers: no generated stubs)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt

from proxy.demo.resource_server import Verifier
from proxy.demo.verify import Rejected
from tests.counterparts import LEDGER, IdP

SERVICE = "test.Echo"


def _identity(data: bytes) -> bytes:
    return data


class GrpcServer:
    """``test.Echo`` on 127.0.0.1: Unary (echo), ServerStream (the request says how many
    messages of how many bytes), ClientStream (sha256 and size of all received), Bidi (echo
    each), Slow (waits until cancelled, or for ``release`` when sent "hold"; records the
    deadline it was given and whether it was cancelled).
    A sync grpcio server (a thread per call); the verifier runs on a loop of its own."""

    def __init__(
        self,
        idp: IdP | None,
        audience: str,
        *,
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
        max_connection_age_ms: int | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        """``tls``: (certificate, key) files: HTTP/2 over TLS (ALPN h2) instead of h2c.
        ``max_connection_age_ms``: each connection gets a GOAWAY at that age (grpcio's
        connection rotation), its calls in flight finishing within a grace of 10 s.
        ``interceptors``: they verify the credential (``grpc_signatures``) instead of the
        token checks here."""
        self.interceptors = tuple(interceptors)
        self.max_connection_age_ms = max_connection_age_ms
        self.tls = tls
        self.jwks_url = ""  # set: calls carry self-signed JWTs checked against these keys
        self.api_key = ""  # set: calls carry this static key in x-api-key
        self.idp = idp
        self.audience = audience
        self.port = port
        self.calls: list[dict[str, Any]] = []  # verified calls: method, claims, metadata
        self.refused: list[str] = []
        self.slow_deadlines: list[float | None] = []
        self.slow_cancelled = threading.Event()
        self.slow_started = threading.Event()
        self.release = threading.Event()  # answers the Slow calls sent "hold"
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: grpc.Server | None = None
        self.verifier: Verifier | None = None

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _check(self, method: str, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if self.interceptors:  # they verified it before the method ran
            self.calls.append({"method": method, "metadata": metadata})
            return None
        if self.jwks_url or self.api_key:
            return self._check_other(method, metadata, context)
        assert self.verifier is not None
        verified = self.verifier.verify(
            "POST",
            f"/{SERVICE}/{method}",
            str(metadata.get("authorization", "")),
            str(metadata.get("dpop", "")),
        )
        try:
            claims = asyncio.run_coroutine_threadsafe(verified, self._loop).result(20)
        except Rejected as exc:
            self.refused.append(exc.error)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.error)
        self.calls.append(
            {"method": method, "claims": claims, "metadata": metadata, "peer": context.peer()}
        )
        for name in ("authorization", "dpop"):  # for the leak scan of every log and answer
            LEDGER.secret(str(metadata.get(name, "")).partition(" ")[2] or None)
            LEDGER.secret(str(metadata.get(name, "")) or None)

    def _check_other(
        self, method: str, metadata: dict[str, Any], context: grpc.ServicerContext
    ) -> None:
        """A static API key in ``x-api-key``, or a self-signed JWT verified against credproxy's
        published JWKS (``jwks_url``): audience this server, made for this call (htm, htu)."""
        claims: dict[str, Any] = {}
        if self.api_key:
            if metadata.get("x-api-key") != self.api_key:
                self.refused.append("api_key")
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "api_key")
        else:
            token = str(metadata.get("authorization", "")).removeprefix("Bearer ")
            LEDGER.secret(token)
            try:
                kid = jwt.get_unverified_header(token)["kid"]
                with urllib.request.urlopen(self.jwks_url, timeout=5) as response:
                    keys = jwt.PyJWKSet.from_dict(json.load(response))
                key = next(k for k in keys.keys if k.key_id == kid)
                claims = jwt.decode(
                    token, key.key, algorithms=["ES256", "EdDSA"], audience=self.origin,
                    options={"require": ["exp", "iat", "jti", "sub"]},
                )  # fmt: skip
                if claims.get("htu") != f"{self.origin}/{SERVICE}/{method}":
                    raise jwt.InvalidTokenError("made for another call")
            except (jwt.PyJWTError, KeyError, StopIteration) as exc:
                self.refused.append(type(exc).__name__)
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "jwt")
        self.calls.append({"method": method, "claims": claims, "metadata": metadata})

    def _handlers(self) -> grpc.GenericRpcHandler:
        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._check("Unary", context)
            trailing = [("x-served-by", "grpc-counterpart")]
            if request == b"echo-credential":  # a careless server: the credential, echoed back
                authorization = str(dict(context.invocation_metadata())["authorization"])
                token = authorization.partition(" ")[2]
                context.send_initial_metadata((("x-echo", token),))
                trailing.append(("x-echo-trailer", token))
                request = f"you sent {token}".encode()
            context.set_trailing_metadata(tuple(trailing))
            return request

        def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            self._check("ServerStream", context)
            count, size = (int(x) for x in request.decode().split(","))
            for i in range(count):
                yield _message(i, size)

        def client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            self._check("ClientStream", context)
            digest, total, count = hashlib.sha256(), 0, 0
            for message in requests:
                digest.update(message)
                total += len(message)
                count += 1
            return f"{count},{total},{digest.hexdigest()}".encode()

        def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            self._check("Bidi", context)
            yield from requests

        def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._check("Slow", context)
            self.slow_deadlines.append(context.time_remaining())
            self.slow_started.set()
            if request == b"hold":  # answered when the test says so
                self.release.wait(30)
                return request
            ended = threading.Event()
            context.add_callback(ended.set)
            ended.wait(30)
            if not context.is_active():
                self.slow_cancelled.set()
            return request

        kinds = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
            "ServerStream": grpc.unary_stream_rpc_method_handler(
                server_stream, _identity, _identity
            ),
            "ClientStream": grpc.stream_unary_rpc_method_handler(
                client_stream, _identity, _identity
            ),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi, _identity, _identity),
            "Slow": grpc.unary_unary_rpc_method_handler(slow, _identity, _identity),
        }
        return grpc.method_handlers_generic_handler(SERVICE, kinds)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="grpc-verifier"
        )
        self._thread.start()

        async def jwks() -> dict[str, Any]:
            assert self.idp is not None
            async with aiohttp.ClientSession() as session:
                async with session.get(self.idp.issuer + "/jwks") as response:
                    return dict(await response.json())

        options: list[tuple[str, int]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if self.max_connection_age_ms is not None:
            options += [
                ("grpc.max_connection_age_ms", self.max_connection_age_ms),
                ("grpc.max_connection_age_grace_ms", 10_000),
            ]
        server = grpc.server(
            ThreadPoolExecutor(max_workers=160),
            options=options,
            interceptors=list(self.interceptors),
        )
        server.add_generic_rpc_handlers((self._handlers(),))
        address = f"127.0.0.1:{self.port}"
        if self.tls is not None:
            cert, key = (path.read_bytes() for path in self.tls)
            credentials = grpc.ssl_server_credentials([(key, cert)])
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        if not self.interceptors:  # else they verify every call: no IdP to trust
            assert self.idp is not None, "without interceptors, tokens of the IdP are verified"
            self.verifier = Verifier(
                issuer=self.idp.issuer,
                audience=[self.audience],
                jwks=jwks,
                origin=self.origin,
                accept_bearer=True,
            )
            asyncio.run_coroutine_threadsafe(self.verifier.load_keys(), self._loop).result(20)
        server.start()
        self._server = server

    def stop(self, grace_s: float | None = None) -> None:
        """Stop: with ``grace_s``, a GOAWAY first and calls in flight finish."""
        if self._server is not None:
            self._server.stop(grace_s).wait(30)
            self._server = None
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
            self._loop.close()


def _message(i: int, size: int) -> bytes:
    """Message ``i`` of a stream: its index, then a pattern; a shifted byte shows."""
    head = i.to_bytes(4, "big")
    return (head * (size // 4 + 1))[:size]
