"""The configuration as frozen typed models: the public shape users write (DESIGN.md).

Secrets never appear here: the config points at files that only the sidecar can read.
Reading a file into these models, with path-named errors, is ``config_file``'s job.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from yarl import URL

_REGION = r"^[a-z]{2}(?:-[a-z]+)+-\d$"
_INLINE_SECRET_KEYS = ("client_secret", "secret", "token", "password", "private_key", "api_key")
_LOCAL_NAMES = ("localhost",)


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Owned(Model):
    """Governance fields: who answers for a credential or route, and what it is for. Shown in
    the inventory (``GET /credentials``, ``credproxy inventory``); never used for decisions."""

    owner: str | None = Field(None, max_length=200, description="team or person accountable")
    purpose: str | None = Field(None, max_length=500, description="why the workload needs it")


@functools.lru_cache(maxsize=1024)  # consulted per request for the Host header
def is_loopback(host: str) -> bool:
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_http_url(value: str, *, insecure_ok: bool, what: str) -> URL:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{what} must be an absolute http(s) URL")
    if url.query_string or url.fragment:
        raise ValueError(f"{what} must not carry a query or fragment")
    if url.user or url.password:
        raise ValueError(f"{what} must not carry credentials; point at a secret file instead")
    if url.scheme == "http" and not insecure_ok and not is_loopback(url.host):
        raise ValueError(
            f"{what} uses plain http to a non-loopback host; use https "
            "or set allow_insecure_http: true"
        )
    return url


def _reject_inline_secrets(data: Any) -> Any:
    if isinstance(data, dict):
        for key in _INLINE_SECRET_KEYS:
            if key in data:
                raise ValueError(
                    f"'{key}' must not be written inline: put the value in a file only the "
                    f"sidecar can read and name it with '{key}_file'"
                )
    return data


Duration = Annotated[float, Field(gt=0)]


class Timeouts(Model):
    connect_s: Duration = 5.0
    idle_s: Duration = Field(60.0, gt=0, description="longest wait for the next upstream byte")
    total_s: Duration = Field(300.0, gt=0, description="whole exchange, headers and body")


class AppTimeouts(Model):
    """Bounds on what the app's side of a connection may take (slowloris)."""

    keepalive_s: Duration = Field(
        75.0, description="idle keep-alive connection, and the longest wait for a request head"
    )
    body_idle_s: Duration = Field(
        30.0, description="longest wait for the next byte of a request body credproxy buffers"
    )


class OAuth2Issuer(Owned):
    """OAuth2 ``client_credentials`` with OIDC / RFC 8414 discovery."""

    type: Literal["oauth2"]
    issuer_url: str
    client_id: str = Field(min_length=1)
    client_auth: Literal["private_key_jwt", "tls_client_auth", "client_secret"] = "private_key_jwt"
    client_key_file: Path | None = Field(
        None, description="private_key_jwt: the assertion key; tls_client_auth: the cert's key"
    )
    client_cert_file: Path | None = Field(
        None,
        description="tls_client_auth (RFC 8705): PEM client certificate, re-read on rotation; "
        "routes without their own client certificate present it too (certificate-bound tokens)",
    )
    client_key_id: str | None = Field(None, description="'kid' header of client assertions")
    client_secret_file: Path | None = None
    assertion_audience: Literal["issuer", "token_endpoint"] = "issuer"
    assertion_lifetime_s: float = Field(30.0, gt=0, le=60)
    audience_param: Literal["resource", "audience"] = Field(
        "resource", description="form parameter carrying a route's audience (RFC 8707: resource)"
    )
    ca_file: Path | None = None
    allow_insecure_http: bool = False
    refresh_ahead_s: Duration | None = Field(
        None, description="default: min(60 s, 20 % of the token lifetime)"
    )
    request_timeout_s: Duration = 10.0
    max_lifetime_s: Duration = Field(86400.0, description="cap on an issuer's expires_in")
    revoke_on_shutdown: bool = Field(
        True, description="revoke cached tokens at the revocation endpoint (RFC 7009) on exit"
    )
    backoff_max_s: Duration = 30.0

    _no_inline = model_validator(mode="before")(_reject_inline_secrets)

    @model_validator(mode="after")
    def _check(self) -> OAuth2Issuer:
        _check_http_url(self.issuer_url, insecure_ok=self.allow_insecure_http, what="issuer_url")
        if self.client_auth == "private_key_jwt" and self.client_key_file is None:
            raise ValueError("client_auth private_key_jwt needs client_key_file")
        if self.client_auth == "client_secret" and self.client_secret_file is None:
            raise ValueError("client_auth client_secret needs client_secret_file")
        if self.client_auth == "tls_client_auth" and (
            self.client_cert_file is None or self.client_key_file is None
        ):
            raise ValueError(
                "client_auth tls_client_auth needs client_cert_file and client_key_file"
            )
        if self.client_auth == "tls_client_auth" and URL(self.issuer_url).scheme != "https":
            raise ValueError("client_auth tls_client_auth needs an https issuer_url")
        return self


class TokenExchangeIssuer(OAuth2Issuer):
    """RFC 8693 token exchange: the workload's identity token (projected service-account token,
    JWT-SVID) is exchanged at the IdP; client authentication as for ``oauth2``."""

    type: Literal["token_exchange"]  # type: ignore[assignment]
    subject_token_file: Path | None = Field(None, description="default: identity.token_file")
    subject_token_type: str = "urn:ietf:params:oauth:token-type:jwt"


class AWSIssuer(Owned):
    """AWS STS ``AssumeRoleWithWebIdentity`` with the workload's token file (EKS IRSA style),
    optionally chained into ``AssumeRole``; or, as a marked legacy mode, static keys from a file."""

    type: Literal["aws"]
    role_arn: str | None = Field(None, pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/.+$")
    token_file: Path | None = Field(None, description="default: identity.token_file")
    assume_role_arn: str | None = Field(
        None, pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/.+$", description="chained AssumeRole"
    )
    region: str = Field(pattern=_REGION)
    sts_endpoint: str | None = Field(
        None, description="default: https://sts.<region>.amazonaws.com"
    )
    session_name: str = Field("credproxy", pattern=r"^[\w+=,.@-]{2,64}$")
    duration_s: int = Field(3600, ge=900, le=43200)
    static_credentials_file: Path | None = Field(
        None, description="legacy: JSON {access_key_id, secret_access_key}; audited as legacy"
    )
    ca_file: Path | None = None
    allow_insecure_http: bool = False
    refresh_ahead_s: Duration | None = None
    max_lifetime_s: Duration = Field(
        43200.0, description="treat credentials as expiring after this long, if STS says later"
    )
    request_timeout_s: Duration = 10.0
    backoff_max_s: Duration = 30.0

    _no_inline = model_validator(mode="before")(_reject_inline_secrets)

    @model_validator(mode="after")
    def _check(self) -> AWSIssuer:
        if (self.role_arn is None) == (self.static_credentials_file is None):
            raise ValueError(
                "set exactly one of role_arn (web identity) or static_credentials_file"
            )
        if self.sts_endpoint is not None:
            _check_http_url(
                self.sts_endpoint, insecure_ok=self.allow_insecure_http, what="sts_endpoint"
            )
        return self

    @property
    def sts_url(self) -> str:
        return self.sts_endpoint or f"https://sts.{self.region}.amazonaws.com"


class StaticIssuer(Owned):
    """A long-lived secret (API key) read from a file: legacy, audited as such, so owners can
    find and retire it. The file is re-read every ``reread_s``: rotation needs no restart."""

    type: Literal["static"]
    secret_file: Path
    reread_s: Duration = 5.0

    _no_inline = model_validator(mode="before")(_reject_inline_secrets)


class SelfSignedJWTIssuer(Owned):
    """A JWT minted per request and signed by the sidecar; upstreams verify it against the JWKS
    published on the admin listener (``/.well-known/jwks.json``)."""

    type: Literal["self_signed_jwt"]
    iss: str = Field(min_length=1)
    sub: str = Field(min_length=1)
    key_file: Path | None = Field(
        None, description="PEM key, re-read on change; default: generated"
    )
    alg: Literal["ES256", "EdDSA", "RS256"] = Field("ES256", description="for a generated key")
    lifetime_s: float = Field(30.0, gt=0, le=60)
    request_claims: bool = Field(False, description="add htm and htu (method, URL sans query)")

    _no_inline = model_validator(mode="before")(_reject_inline_secrets)


def aws_service_region(host: str) -> tuple[str | None, str | None]:
    """Derive (signing service, region) from an AWS endpoint host name, where it says them."""
    match = re.fullmatch(r"(?:.+\.)?([a-z0-9-]+)[.-](" + _REGION[1:-1] + r")\.amazonaws\.com", host)
    if match:
        return match[1], match[2]
    return None, None


_SIGNING_NAMES_NOT_IN_BOTOCORE_LIST = frozenset({"execute-api", "es", "aoss", "s3-object-lambda"})


def known_aws_service(name: str) -> bool | None:
    """Whether botocore knows the service; None when botocore (credproxy[aws]) is not installed."""
    try:
        import botocore.session
    except ImportError:
        return None
    services = botocore.session.get_session().get_available_services()
    return name in services or name in _SIGNING_NAMES_NOT_IN_BOTOCORE_LIST


def sigv4_scope(
    service: str | None, region: str | None, upstream: str, issuer_region: str | None
) -> tuple[str | None, str | None]:
    """The (service, region) a sigv4 route signs for: as configured, else from the upstream
    host (``dynamodb.eu-west-1.amazonaws.com``), else the region of the route's issuer."""
    derived_service, derived_region = aws_service_region(URL(upstream).host or "")
    return service or derived_service, region or derived_region or issuer_region


_DERIVED_COMPONENTS = (
    "@method",
    "@target-uri",
    "@authority",
    "@scheme",
    "@request-target",
    "@path",
    "@query",
)


def _check_component(name: str) -> str:
    if name.startswith("@") and name not in _DERIVED_COMPONENTS:
        raise ValueError(f"'{name}' is not a derived component ({', '.join(_DERIVED_COMPONENTS)})")
    if not name.startswith("@") and not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", name):
        raise ValueError(f"'{name}' is not a lowercase header field name")
    return name


class HTTPSignature(Model):
    """RFC 9421 parameters for ``inject: http_signature``."""

    components: tuple[Annotated[str, AfterValidator(_check_component)], ...] = Field(
        ("@method", "@target-uri", "content-digest", "date"),
        min_length=1,
        description="covered components; content-digest (RFC 9530) only when a body exists, "
        "date added when absent",
    )
    label: str = Field("sig1", pattern=r"^[a-z*][a-z0-9_.*-]*$")
    lifetime_s: int = Field(60, ge=1, le=300, description="expires = created + lifetime_s")
    nonce: bool = Field(True, description="a unique nonce per signature, for replay checks")
    tag: str | None = Field(None, pattern=r"^[\x20-\x7e]+$", description="application tag")
    key_id: str | None = Field(
        None,
        pattern=r"^[\x20-\x7e]+$",
        description="keyid; default: the JWK thumbprint (self_signed_jwt); required for static "
        "(HMAC-SHA256 with the secret)",
    )

    @model_validator(mode="after")
    def _unique(self) -> HTTPSignature:
        if len(set(self.components)) != len(self.components):
            raise ValueError("components must not repeat")
        return self


class Credential(Model):
    issuer: str
    audience: str | None = None
    scope: str | None = None
    inject: Literal["bearer", "dpop", "sigv4", "header", "query", "http_signature"] = "dpop"
    header: str | None = Field(
        None, pattern=r"^[A-Za-z0-9-]+$", description="inject: header, e.g. X-Api-Key"
    )
    header_prefix: str = Field("", description="inject: header, e.g. 'Token '")
    query_param: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="inject: query")
    service: str | None = Field(
        None, pattern=r"^[a-z0-9-]+$", description="sigv4 signing name, e.g. s3, dynamodb, sqs"
    )
    region: str | None = Field(None, pattern=_REGION, description="sigv4; default: from upstream")
    payload: Literal["unsigned", "streaming", "signed"] | None = Field(
        None,
        description="sigv4 body handling: unsigned streams (S3 accepts UNSIGNED-PAYLOAD); "
        "streaming streams aws-chunked with a CRC32 trailer (S3, needs Content-Length); signed "
        "buffers up to payload_max_bytes to hash it. Default: unsigned for s3, signed otherwise",
    )
    payload_max_bytes: int = Field(
        8 * 1024 * 1024,
        ge=0,
        le=256 * 1024 * 1024,
        description="bound on a body buffered to hash it (sigv4 signed, http_signature digest)",
    )
    signature: HTTPSignature = Field(
        default_factory=HTTPSignature, description="inject: http_signature"
    )


class CallerRule(Model):
    """Attributes the kernel reports for a caller; every attribute given must match."""

    uid: int | None = Field(None, ge=0)
    gid: int | None = Field(None, ge=0)
    exe: str | None = Field(None, pattern=r"^/", description="absolute path of the executable")
    exe_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    cgroup: str | None = Field(None, pattern=r"^/", description="cgroup v2 path prefix")
    any_local: bool = Field(False, description="any local process: only when written explicitly")

    @model_validator(mode="after")
    def _check(self) -> CallerRule:
        named = [
            f for f in ("uid", "gid", "exe", "exe_sha256", "cgroup") if getattr(self, f) is not None
        ]
        if self.any_local and named:
            raise ValueError(f"any_local: true cannot be combined with {', '.join(named)}")
        if not self.any_local and not named:
            raise ValueError(
                "name at least one of uid, gid, exe, exe_sha256, cgroup, or any_local: true"
            )
        return self


def _check_glob(pattern: str) -> str:
    if not pattern.startswith("/"):
        raise ValueError("a path glob starts with /")
    if any("**" in part and part != "**" for part in pattern.split("/")):
        raise ValueError("'**' must be a whole path segment, as in /v1/**")
    return pattern


class AllowRule(Model):
    """Who may use a route: callers (names under ``callers``), methods, and path globs matched
    against the path as forwarded (``*`` one segment, ``**`` any number of segments)."""

    callers: tuple[str, ...] = Field(min_length=1)
    methods: tuple[Annotated[str, Field(pattern=r"^[A-Z]+$")], ...] | None = Field(
        None, description="default: any method"
    )
    paths: tuple[Annotated[str, AfterValidator(_check_glob)], ...] = ("/**",)


class Route(Owned):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    path_prefix: str | None = Field(None, pattern=r"^/")
    host: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]+$")
    strip_prefix: bool = True
    upstream: str
    ca_file: Path | None = None
    client_cert_file: Path | None = Field(
        None, description="mTLS to the upstream; re-read when it changes (rotation)"
    )
    client_key_file: Path | None = None
    allow_insecure_http: bool = False
    credential: Credential
    strip_headers: tuple[str, ...] = Field(
        (), description="extra inbound headers that carry credentials and must not be forwarded"
    )
    timeouts: Timeouts = Timeouts()
    allow: tuple[AllowRule, ...] = Field(
        (), description="default deny: a request no rule allows is refused with 403"
    )
    retry_body_max_bytes: int = Field(
        65536,
        ge=0,
        le=1024 * 1024,
        description="bodies up to this size are buffered so a 401 can be retried",
    )

    @model_validator(mode="after")
    def _check(self) -> Route:
        if self.path_prefix is None and self.host is None:
            raise ValueError("a route needs path_prefix, host, or both")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together")
        _check_http_url(self.upstream, insecure_ok=self.allow_insecure_http, what="upstream")
        return self


class Identity(Model):
    token_file: Path | None = Field(None, description="projected token / JWT-SVID (later issuers)")
    dpop_alg: Literal["ES256", "EdDSA"] = "ES256"


class Log(Model):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = Field(True, description="one line per proxied request")


class Audit(Model):
    file: str = Field("-", description="JSON-lines audit file ('-': stdout); SIGUSR1 reopens it")
    used: Literal["interval", "request", "off"] = Field(
        "interval",
        description="credential.used events: per (route, credential, caller, method) and "
        "interval, per request, or none",
    )
    used_interval_s: Duration = 60.0
    queue_size: int = Field(
        10000, ge=100, description="events waiting for the disk; beyond, dropped and counted"
    )


def _as_tuple(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


class Config(Model):
    listen: Annotated[tuple[str, ...], BeforeValidator(_as_tuple)] = Field(min_length=1)
    admin: str | None = "127.0.0.1:15090"
    allow_non_loopback: bool = False
    unix_socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")
    local_names: tuple[str, ...] = Field(
        (), description="Host names accepted besides localhost, loopback literals and route hosts"
    )
    identity: Identity = Identity()
    callers: dict[str, CallerRule] = {}
    issuers: dict[
        Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")],
        Annotated[
            OAuth2Issuer | TokenExchangeIssuer | AWSIssuer | StaticIssuer | SelfSignedJWTIssuer,
            Field(discriminator="type"),
        ],
    ]
    routes: tuple[Route, ...] = Field(min_length=1)
    audit: Audit = Audit()
    log: Log = Log()
    warm_up: bool = Field(True, description="obtain every route's credential at start")
    on_start_failure: Literal["not_ready", "exit"] = Field(
        "not_ready", description="when warm-up cannot get a credential: stay not-ready or exit 1"
    )
    app_timeouts: AppTimeouts = AppTimeouts()
    shutdown_timeout_s: Duration = 10.0
    revoke_timeout_s: Duration = Field(5.0, description="budget for revocations at shutdown")


@dataclass(frozen=True)
class Address:
    """A parsed ``listen``/``admin`` entry: TCP host and port, or a Unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def parse_address(value: str) -> Address:
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"'{value}': a Unix socket path must be absolute")
        return Address(path=path)
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", value)
    if not match or int(match[2]) > 65535:
        raise ValueError(f"'{value}' is not host:port, [v6]:port or unix:/path")
    return Address(host=match[1], port=int(match[2]))
