"""The exception tree. Each class knows the HTTP status and problem ``type`` the app sees.

    CredproxyError
    ├── ConfigError(ValueError)               bad configuration; never reaches the app
    ├── IdentityError(ValueError)             key or secret file unreadable or unusable
    ├── StartError                            cannot listen, audit, or get a first credential
    └── ProblemError                          answered to the app as problem+json
        ├── InternalError                     500 internal_error (a bug; traceback in the log)
        ├── RequestRefused                    4xx the proxy decided on its own
        │   ├── MalformedRequest              400 malformed_request (not valid HTTP/1.1)
        │   ├── RouteNotFound                 404 route_not_found
        │   ├── InvalidPath                   400 invalid_path
        │   ├── PathNotCanonical              400 path_not_canonical (would be rewritten)
        │   ├── PayloadTooLarge               413 payload_too_large
        │   ├── RequestTimeout                408 request_timeout (slow body)
        │   ├── TransferCodingNotImplemented  501 transfer_coding_not_implemented
        │   ├── UpgradeNotSupported           501 upgrade_not_supported (h2c, any but websocket)
        │   ├── InvalidWebSocketHandshake     400 invalid_websocket_handshake
        │   ├── UnsignableRequest             400 request_not_signable (http_signature)
        │   ├── LengthRequired                411 length_required (sigv4 streaming)
        │   ├── PathEscapesRoute              400 path_escapes_route
        │   ├── MethodRefused                 405 method_not_allowed (CONNECT)
        │   ├── HostNotAllowed                403 host_not_allowed (DNS rebinding)
        │   ├── BrowserRefused                403 browser_request_refused
        │   ├── DestinationNotAllowed         403 destination_not_allowed (forward proxy)
        │   ├── CallerNotIdentified           403 caller_not_identified (closed at accept)
        │   ├── CallerNotAllowed              403 caller_not_allowed
        │   ├── HeadTooLarge                  431 request_head_too_large
        │   ├── TooManyConnections            503 too_many_connections (+ Retry-After)
        │   ├── PathNotAllowed                403 path_not_allowed
        │   ├── ControlCallerNotAllowed       403 control_caller_not_allowed (control plane)
        │   ├── NotFound                      404 not_found (telemetry / control paths)
        │   ├── MethodNotAllowed              405 method_not_allowed (telemetry / control)
        │   └── InvalidControlRequest         400 invalid_control_request (detail: why)
        │       └── UnknownName               404 unknown_name (no such route / issuer)
        ├── CredentialUnavailable             503 credential_unavailable (+ Retry-After)
        │   └── IssuerError                   a token request failed (kept for the log)
        └── UpstreamError                     502 upstream_error
            ├── UpstreamConnectError(ConnectionError)   502 upstream_unreachable
            ├── UpstreamTLSError                        502 upstream_tls_error
            ├── UpstreamProtocolError                   502 upstream_protocol_error
            ├── UpstreamCompressedAnswer                502 upstream_compressed_answer
            └── UpstreamTimeout(TimeoutError)           504 upstream_timeout

The app only ever sees ``status``, ``code`` and ``public_detail``; ``str(exc)`` is for the operator's
log and may name files and endpoints, never a credential. ``answer()`` writes them as
problem+json, or, where a route's ``answer_as`` says so, in an AWS service's own error format
(S3's ``<Error>``, the query/EC2 ``<ErrorResponse>``, the JSON protocols' ``__type``) so that
SDKs show the code and detail instead of a bare status; the ``Code`` is credproxy's code, never
one of AWS's, so no SDK mistakes a refusal for a retryable AWS condition.

Where third-party errors become these, one place per boundary: docs/design.md, "Error
boundaries".
"""

from __future__ import annotations

import json
from typing import Literal
from xml.sax.saxutils import escape

_PROBLEM_PREFIX = "urn:credproxy:problem:"

AnswerFormat = Literal["problem", "s3_xml", "aws_xml", "aws_json"]


class CredproxyError(Exception):
    """Base of every error credproxy raises on purpose."""


class ConfigError(CredproxyError, ValueError):
    """The configuration is invalid; ``errors`` holds one path-named line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class IdentityError(CredproxyError, ValueError):
    """A key, certificate or secret file named by the configuration cannot be used."""


class StartError(CredproxyError):
    """The sidecar cannot start; the message says what and where."""


class ProblemError(CredproxyError):
    status = 500
    code = "internal_error"
    public_detail = "credproxy failed to handle the request; see the sidecar log."
    retry_after_s: float | None = None
    answer_as: AnswerFormat = "problem"  # the route's error format, set once the route is known

    def __init__(self, log_detail: str = "", *, route: str | None = None) -> None:
        super().__init__(log_detail or self.public_detail)
        self.route = route

    def answer(self) -> tuple[dict[str, str], bytes]:
        """Headers and body in ``answer_as``: problem+json, or the AWS format of the route."""
        if self.answer_as == "problem":
            return self.problem()
        headers = {"Cache-Control": "no-store"}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(int(self.retry_after_s))
        code, message = self.code, self.public_detail
        if self.answer_as == "aws_json":
            headers["Content-Type"] = "application/x-amz-json-1.1"
            headers["x-amzn-ErrorType"] = code
            return headers, json.dumps({"__type": code, "message": message}).encode()
        headers["Content-Type"] = "application/xml"
        error = f"<Code>{code}</Code><Message>{escape(message)}</Message>"
        if self.answer_as == "s3_xml":
            body = f"<Error>{error}<RequestId>credproxy</RequestId></Error>"
        else:
            kind = "Sender" if self.status < 500 else "Receiver"
            body = (
                f"<ErrorResponse><Error><Type>{kind}</Type>{error}</Error>"
                "<RequestId>credproxy</RequestId></ErrorResponse>"
            )
        return headers, ('<?xml version="1.0" encoding="UTF-8"?>\n' + body).encode()

    def problem(self) -> tuple[dict[str, str], bytes]:
        """Headers and RFC 9457 body with the stable code and the class's fixed public text,
        never ``str(self)``."""
        body: dict[str, object] = {
            "type": _PROBLEM_PREFIX + self.code,
            "title": self.code.replace("_", " "),
            "status": self.status,
            "code": self.code,
            "detail": self.public_detail,
        }
        if self.route:
            body["route"] = self.route
        headers = {"Content-Type": "application/problem+json", "Cache-Control": "no-store"}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(int(self.retry_after_s))
        return headers, json.dumps(body).encode()


class InternalError(ProblemError):
    """A bug in credproxy, not the app's or an upstream's doing: logged with its traceback."""

    status = 500
    code = "internal_error"
    public_detail = "credproxy failed to handle the request; see the sidecar log."


class RequestRefused(ProblemError):
    status = 400
    code = "request_refused"
    public_detail = "credproxy refused the request."


class MalformedRequest(RequestRefused):
    status = 400
    code = "malformed_request"
    public_detail = (
        "The request is not valid HTTP/1.1 (framing, header syntax or a size limit); credproxy "
        "closes the connection after this answer."
    )


class RouteNotFound(RequestRefused):
    status = 404
    code = "route_not_found"
    public_detail = "No route matches this Host and path; check the routes in the sidecar config."


class InvalidPath(RequestRefused):
    status = 400
    code = "invalid_path"
    public_detail = (
        "The path contains an encoded '/' or '\\', a backslash, NUL, an empty segment ('//'), "
        "a malformed or double percent-encoding ('%25' before hex digits), percent-escapes that "
        "are not UTF-8 (overlong forms), or a '.' or '..' segment with ';' parameters; send the "
        "canonical path (routes to opaque-key APIs such as S3 can say path: opaque)."
    )


class PathNotCanonical(RequestRefused):
    status = 400
    code = "path_not_canonical"
    public_detail = (
        "credproxy forwards the path exactly as sent or not at all, and on this route "
        "(path: normalized) it would have to rewrite it: a '.' or '..' segment, or a "
        "percent-escape of a letter, digit or '-._~' ('%7E' for '~'). Send the canonical path; "
        "routes to opaque-key APIs (S3, GCS, blob stores) can say path: opaque."
    )


class PayloadTooLarge(RequestRefused):
    status = 413
    code = "payload_too_large"
    public_detail = (
        "The route signs the request body, so it must buffer it, and the body is larger than "
        "the route's credential.payload_max_bytes."
    )


class RequestTimeout(RequestRefused):
    status = 408
    code = "request_timeout"
    public_detail = "The request body stopped arriving; credproxy gave up waiting for it."


class TransferCodingNotImplemented(RequestRefused):
    status = 501
    code = "transfer_coding_not_implemented"
    public_detail = (
        "credproxy forwards chunked request bodies only; send other codings as Content-Encoding."
    )


class UpgradeNotSupported(RequestRefused):
    status = 501
    code = "upgrade_not_supported"
    public_detail = (
        "credproxy upgrades connections to WebSocket only; other Upgrade protocols (h2c and "
        "any other) are refused, never forwarded. Send the request without Upgrade."
    )


class InvalidWebSocketHandshake(RequestRefused):
    status = 400
    code = "invalid_websocket_handshake"
    public_detail = (
        "A WebSocket upgrade must be a GET over HTTP/1.1 without a body, with "
        "Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key of 16 base64-encoded bytes "
        "(RFC 6455 section 4.1)."
    )


class LengthRequired(RequestRefused):
    status = 411
    code = "length_required"
    public_detail = (
        "The route signs the body as it streams (sigv4 payload: streaming), which needs the "
        "body's Content-Length; send one."
    )


class UnsignableRequest(RequestRefused):
    status = 400
    code = "request_not_signable"
    public_detail = (
        "The route signs a header (credential.signature.components) that this request lacks "
        "or carries with non-ASCII bytes; send it in ASCII or change the route."
    )


class PathEscapesRoute(RequestRefused):
    status = 400
    code = "path_escapes_route"
    public_detail = "The path uses '..' to leave the route it names; send the canonical path."


class HostNotAllowed(RequestRefused):
    status = 403
    code = "host_not_allowed"
    public_detail = (
        "The Host header is not a local name of this sidecar (localhost, a loopback address, "
        "a route host or a configured local_names entry)."
    )


class BrowserRefused(RequestRefused):
    status = 403
    code = "browser_request_refused"
    public_detail = "Requests from web pages (Origin or cross-site Sec-Fetch-Site) are refused."


class DestinationNotAllowed(RequestRefused):
    status = 403
    code = "destination_not_allowed"
    public_detail = (
        "Forward-proxy requests may only target hosts that a route names with 'host'; "
        "credproxy is not an open proxy."
    )


class CallerNotIdentified(RequestRefused):
    status = 403
    code = "caller_not_identified"
    public_detail = (
        "The kernel could not positively identify the process at the other end of this "
        "connection (its socket already closed, or the peer is not local); credproxy closed "
        "the connection without reading it."
    )


class HeadTooLarge(RequestRefused):
    status = 431
    code = "request_head_too_large"
    public_detail = (
        "The request line and headers are larger than the sidecar's app_limits.max_head_bytes; "
        "credproxy closes the connection after this answer."
    )


class TooManyConnections(RequestRefused):
    status = 503
    code = "too_many_connections"
    public_detail = (
        "The sidecar holds as many app connections as app_limits allow (in total or for this "
        "uid); close idle connections or retry after the indicated delay."
    )
    retry_after_s = 1.0


class CallerNotAllowed(RequestRefused):
    status = 403
    code = "caller_not_allowed"
    public_detail = (
        "This process is not allowed to use the route; the sidecar identifies callers by "
        "kernel peer credentials (uid, executable, cgroup), see the route's allow rules."
    )


class PathNotAllowed(RequestRefused):
    status = 403
    code = "path_not_allowed"
    public_detail = "The route's allow rules do not permit this method and path for this caller."


class ControlCallerNotAllowed(RequestRefused):
    status = 403
    code = "control_caller_not_allowed"
    public_detail = (
        "This process may not use the control plane: its callers are identified by the kernel "
        "and must be named in control.allow (default: the sidecar's own uid)."
    )


class NotFound(RequestRefused):
    status = 404
    code = "not_found"
    public_detail = (
        "No such endpoint. The admin listener serves /metrics, /healthz, /readyz and "
        "/.well-known/jwks.json; inventory, revoke and break-glass are on the control socket "
        "(control.listen; credproxy inventory | revoke | break-glass)."
    )


class MethodNotAllowed(RequestRefused):
    status = 405
    code = "method_not_allowed"
    public_detail = "This endpoint does not answer this method."


class InvalidControlRequest(RequestRefused):
    """The detail says what is wrong: it goes only to an allowed control caller, and names
    routes, callers and limits, never a credential."""

    status = 400
    code = "invalid_control_request"
    public_detail = "The control request is invalid."

    def problem(self) -> tuple[dict[str, str], bytes]:
        headers, body = super().problem()
        data = json.loads(body)
        data["detail"] = str(self)
        return headers, json.dumps(data).encode()


class UnknownName(InvalidControlRequest):
    status = 404
    code = "unknown_name"


class MethodRefused(RequestRefused):
    status = 405
    code = "method_not_allowed"
    public_detail = "CONNECT is refused: credproxy must see the request to add a credential."


class CredentialUnavailable(ProblemError):
    status = 503
    code = "credential_unavailable"
    public_detail = (
        "The route's credential could not be obtained from its issuer and no valid one is "
        "cached; retry after the indicated delay."
    )

    def __init__(
        self, log_detail: str = "", *, route: str | None = None, retry_after_s: float = 1.0
    ) -> None:
        super().__init__(log_detail, route=route)
        self.retry_after_s = retry_after_s


class IssuerError(CredentialUnavailable):
    """A token request or discovery failed; the message names the issuer and endpoint.
    ``asked_delay_s``: the issuer's own ``Retry-After`` (429, 503), which backoff honours."""

    def __init__(self, log_detail: str = "", *, asked_delay_s: float | None = None) -> None:
        super().__init__(log_detail)
        self.asked_delay_s = asked_delay_s


class UpstreamError(ProblemError):
    status = 502
    code = "upstream_error"
    public_detail = "The upstream failed to answer the proxied request."


class UpstreamConnectError(UpstreamError, ConnectionError):
    code = "upstream_unreachable"
    public_detail = "The upstream could not be reached (connection refused or DNS failure)."


class UpstreamTLSError(UpstreamError):
    code = "upstream_tls_error"
    public_detail = "The upstream's TLS certificate could not be verified."


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"
    public_detail = "The upstream closed the connection or sent an invalid HTTP response."


class UpstreamCompressedAnswer(UpstreamError):
    code = "upstream_compressed_answer"
    public_detail = (
        "The upstream compressed its answer (Content-Encoding) although credproxy asked for "
        "Accept-Encoding: identity. The route's credential travels as a plain value, and a "
        "compressed echo of it could not be masked, so the answer is refused; make the upstream "
        "honour identity."
    )


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504
    code = "upstream_timeout"
    public_detail = "The upstream did not answer within the route's timeout."
