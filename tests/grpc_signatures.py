"""Server interceptors for the grpcio counterpart that verify a request signature as the
resource server would, over what the server received: the call's ``:authority`` and ``:path``,
its metadata, and (when the signature claims to cover it) the request body rebuilt from the
messages, gRPC's length-prefixed frames. A call that fails is aborted ``UNAUTHENTICATED`` before
the method runs; ``accepted`` and ``refused`` say what happened.

- ``SigV4Check``: AWS Signature Version 4, recomputed here from the specification (not with
  botocore, which signs in credproxy), the secret key looked up by the access key id it names.
- ``MessageSignatureCheck``: RFC 9421 with RFC 9530 ``Content-Digest``, by the same independent
  implementation as the HTTP/1.1 tests (PyPI ``http-message-signatures``).

grpcio shows a servicer neither ``:authority`` nor ``content-type``: the first is read from the
call's details (``_rpc_event``, grpcio's own attribute), the second is ``application/grpc``, the
only type this server accepts a call with.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import quote

import grpc
from http_message_signatures import HTTPMessageVerifier, InvalidSignature, MappingKeyResolver

from tests.counterparts import LEDGER

CONTENT_TYPE = "application/grpc"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
if TYPE_CHECKING:  # generic in the stubs only
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


class Refused(Exception):
    """The signature does not verify; the message says why (for the test, not the client)."""


@dataclass(frozen=True)
class Call:
    """A call as the server received it: what a signature may cover."""

    scheme: str
    authority: str
    path: str
    metadata: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.metadata if key == name]
        return ", ".join(values) if values else None


def frames(messages: Iterable[bytes]) -> bytes:
    """The request body as it travelled: each message behind its 5-byte gRPC prefix
    (uncompressed)."""
    return b"".join(b"\0" + len(m).to_bytes(4, "big") + m for m in messages)


class SignatureCheck(grpc.ServerInterceptor):
    """Wraps each method so that ``verify`` runs before it. The body is given to ``verify``
    when ``covers_body`` says the signature claims it: the request messages are then read
    first (a streaming call's whole request stream), else the call streams unread."""

    def __init__(self, scheme: str = "http") -> None:
        self.scheme = scheme
        self.accepted: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self._lock = threading.Lock()

    def verify(self, call: Call, body: bytes | None) -> dict[str, Any]:
        raise NotImplementedError

    def covers_body(self, call: Call) -> bool:
        raise NotImplementedError

    def _check(self, context: grpc.ServicerContext, messages: list[bytes] | None) -> None:
        details = context._rpc_event.call_details  # type: ignore[attr-defined]
        call = Call(
            self.scheme,
            details.host.decode(),
            details.method.decode(),
            tuple((k, v) for k, v in context.invocation_metadata() if isinstance(v, str)),
        )
        try:
            body = frames(messages) if messages is not None else None
            result = self.verify(call, body)
        except (Refused, InvalidSignature) as exc:
            with self._lock:
                self.refused.append(f"{type(exc).__name__}: {exc}")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "signature refused")
        with self._lock:
            self.accepted.append({"call": call, "body_bytes": len(body or b""), **result})

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        metadata = tuple(
            (k, v) for k, v in handler_call_details.invocation_metadata or () if isinstance(v, str)
        )
        wants_body = self.covers_body(Call(self.scheme, "", "", metadata))
        check = self._check
        codec = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary is not None or handler.unary_stream is not None:
            single = handler.unary_unary or handler.unary_stream
            assert single is not None

            def checked_single(request: bytes, context: grpc.ServicerContext) -> Any:
                check(context, [request])
                return single(request, context)

            if handler.unary_unary is not None:
                return grpc.unary_unary_rpc_method_handler(checked_single, *codec)
            return grpc.unary_stream_rpc_method_handler(checked_single, *codec)
        streaming = handler.stream_unary or handler.stream_stream
        assert streaming is not None

        def checked_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            if wants_body:
                read = list(requests)
                check(context, read)
                requests = iter(read)
            else:
                check(context, None)
            return streaming(requests, context)

        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(checked_stream, *codec)
        return grpc.stream_stream_rpc_method_handler(checked_stream, *codec)


class SigV4Check(SignatureCheck):
    """AWS SigV4 (``AWS4-HMAC-SHA256`` in ``authorization``) for one service and region: the
    scope, a time within 5 minutes, the headers that must be signed (host, x-amz-date,
    content-type and every x-amz-* sent), and the signature over the canonical request. The
    payload hash is ``x-amz-content-sha256`` when sent (``UNSIGNED-PAYLOAD``, or the body's
    SHA-256, which must then match the body received), else the received body's SHA-256."""

    def __init__(
        self,
        service: str,
        region: str,
        keys: Callable[[str], tuple[str, str | None] | None],
        scheme: str = "http",
    ) -> None:
        """``keys``: access key id → (secret key, session token it goes with), or None."""
        super().__init__(scheme)
        self.service = service
        self.region = region
        self.keys = keys

    def covers_body(self, call: Call) -> bool:
        return call.header("x-amz-content-sha256") != UNSIGNED_PAYLOAD

    def verify(self, call: Call, body: bytes | None) -> dict[str, Any]:
        authorization = call.header("authorization") or ""
        algorithm, _, rest = authorization.partition(" ")
        if algorithm != "AWS4-HMAC-SHA256":
            raise Refused("not signed with AWS4-HMAC-SHA256")
        fields = dict(part.strip().split("=", 1) for part in rest.split(",") if "=" in part)
        key_id, date, region, service, terminator = fields.get("Credential", "////").split("/")
        signed_headers = fields.get("SignedHeaders", "").split(";")
        amz_date = call.header("x-amz-date") or ""
        if (region, service, terminator) != (self.region, self.service, "aws4_request"):
            raise Refused(f"scope {region}/{service}/{terminator}")
        if not amz_date.startswith(date):
            raise Refused("x-amz-date is not the credential's date")
        signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.UTC
        )
        if abs(datetime.datetime.now(datetime.UTC) - signed_at) > datetime.timedelta(minutes=5):
            raise Refused("signed more than 5 minutes away from now")
        sent_amz = {name for name, _ in call.metadata if name.startswith("x-amz-")}
        unsigned = ({"host", "x-amz-date", "content-type"} | sent_amz) - set(signed_headers)
        if unsigned:
            raise Refused(f"not signed: {sorted(unsigned)}")
        found = self.keys(key_id)
        if found is None:
            raise Refused("unknown access key id")
        secret, session_token = found
        if session_token is not None and call.header("x-amz-security-token") != session_token:
            raise Refused("not the session token of this access key")
        declared = call.header("x-amz-content-sha256")
        if declared == UNSIGNED_PAYLOAD:
            payload_hash = UNSIGNED_PAYLOAD
        else:
            assert body is not None, "covers_body asked for it"
            payload_hash = hashlib.sha256(body).hexdigest()
            if declared is not None and declared != payload_hash:
                raise Refused("x-amz-content-sha256 is not the body's")
        values = {"host": call.authority, "content-type": CONTENT_TYPE}
        canonical_headers = "".join(
            f"{name}:{' '.join((values.get(name) or call.header(name) or '').split())}\n"
            for name in signed_headers
        )
        canonical_request = "\n".join(
            [
                "POST",
                quote(call.path, safe="/~"),
                "",  # gRPC paths carry no query
                canonical_headers,
                ";".join(signed_headers),
                payload_hash,
            ]
        )
        scope = f"{date}/{region}/{service}/aws4_request"
        string_to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                amz_date,
                scope,
                hashlib.sha256(canonical_request.encode()).hexdigest(),
            ]
        )
        key = ("AWS4" + secret).encode()
        for part in (date, region, service, "aws4_request"):
            key = hmac.digest(key, part.encode(), "sha256")
        expected = hmac.new(key, string_to_sign.encode(), "sha256").hexdigest()
        if not hmac.compare_digest(expected, fields.get("Signature", "")):
            raise Refused("signature does not match the request received")
        LEDGER.secret(session_token)  # for the leak scan of every log and answer
        return {"key_id": key_id, "payload_hash": payload_hash, "signed": signed_headers}


@dataclass
class _Request:
    """The message view ``http-message-signatures`` verifies: method, URI and header fields."""

    method: str
    url: str
    headers: dict[str, str]


class MessageSignatureCheck(SignatureCheck):
    """RFC 9421: a signature by a key in ``keys`` (keyid → public key; the test fills it from
    credproxy's JWKS) covering ``@method``, ``@target-uri`` and ``date``, at most 60 s old, a
    nonce never seen before, and the ``Content-Digest`` of the body received when it is
    signed (``required``: whether it must be)."""

    def __init__(self, algorithm: Any, *, digest_required: bool, scheme: str = "http") -> None:
        super().__init__(scheme)
        self.digest_required = digest_required
        self.nonces: set[str] = set()
        resolver = MappingKeyResolver(public_keys={}, private_keys={})
        self.keys: dict[str, Any] = resolver.public_keys  # the trusted keys, filled in place
        self.verifier = HTTPMessageVerifier(signature_algorithm=algorithm, key_resolver=resolver)
        self.verifier.max_clock_skew = datetime.timedelta(0)

    def covers_body(self, call: Call) -> bool:
        return self.digest_required or call.header("content-digest") is not None

    def verify(self, call: Call, body: bytes | None) -> dict[str, Any]:
        headers = {name: call.header(name) or "" for name, _ in call.metadata}
        request = _Request("POST", f"{call.scheme}://{call.authority}{call.path}", headers)
        required: tuple[str, ...] = ("@method", "@target-uri", "date")
        if self.digest_required:
            required += ("content-digest",)
        [result] = self.verifier.verify(
            request,
            max_age=datetime.timedelta(seconds=60),
            require_components=required,
            body=body,
        )
        nonce = result.nonce
        with self._lock:
            if nonce is None or nonce in self.nonces:
                raise Refused("replayed")
            self.nonces.add(nonce)
        LEDGER.secret((call.header("signature") or "").partition("=:")[2].rstrip(":") or None)
        return {
            "keyid": result.parameters["keyid"],
            "covered": list(result.covered_components),
        }
