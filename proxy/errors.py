"""The exception tree. Each class knows the HTTP status and problem ``type`` the app sees.

    CredproxyError
    ├── ConfigError(ValueError)               bad configuration; never reaches the app
    ├── IdentityError(ValueError)             key or secret file unreadable or unusable
    └── ProblemError                          answered to the app as problem+json
        ├── RequestRefused                    4xx the proxy decided on its own
        │   ├── RouteNotFound                 404 route_not_found
        │   ├── ForwardProxyRefused           400 forward_proxy_not_supported
        │   └── MethodRefused                 405 method_not_allowed (CONNECT)
        ├── CredentialUnavailable             503 credential_unavailable (+ Retry-After)
        │   └── IssuerError                   a token request failed (kept for the log)
        └── UpstreamError                     502 upstream_error
            ├── UpstreamConnectError(ConnectionError)   502 upstream_unreachable
            ├── UpstreamTLSError                        502 upstream_tls_error
            ├── UpstreamProtocolError                   502 upstream_protocol_error
            └── UpstreamTimeout(TimeoutError)           504 upstream_timeout

The app only ever sees ``status``, ``code`` and ``public_detail``; ``str(exc)`` is for the operator's
log and may name files and endpoints, never a credential.
"""

from __future__ import annotations


class CredproxyError(Exception):
    """Base of every error credproxy raises on purpose."""


class ConfigError(CredproxyError, ValueError):
    """The configuration is invalid; ``errors`` holds one path-named line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class IdentityError(CredproxyError, ValueError):
    """A key, certificate or secret file named by the configuration cannot be used."""


class ProblemError(CredproxyError):
    status = 500
    code = "internal_error"
    public_detail = "credproxy failed to handle the request; see the sidecar log."
    retry_after_s: float | None = None

    def __init__(self, log_detail: str = "", *, route: str | None = None) -> None:
        super().__init__(log_detail or self.public_detail)
        self.route = route


class RequestRefused(ProblemError):
    status = 400
    code = "request_refused"
    public_detail = "credproxy refused the request."


class RouteNotFound(RequestRefused):
    status = 404
    code = "route_not_found"
    public_detail = "No route matches this Host and path; check the routes in the sidecar config."


class ForwardProxyRefused(RequestRefused):
    status = 400
    code = "forward_proxy_not_supported"
    public_detail = (
        "Absolute-form request targets (HTTP_PROXY mode) are not enabled; "
        "send origin-form requests to a route's path prefix."
    )


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
    """A token request or discovery failed; the message names the issuer and endpoint."""


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


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504
    code = "upstream_timeout"
    public_detail = "The upstream did not answer within the route's timeout."
