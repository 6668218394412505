"""The configuration as frozen typed models: the public shape users write (docs/design.md).

Secrets never appear here: the config points at files that only the sidecar can read.
Reading a file into these models, with path-named errors, is ``loader``'s job; the issuer
sections live in ``issuers``, a route's ``credential`` in ``credential`` (each a table of plug-in
models this module takes its unions from) and the shared pieces in ``base``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    model_validator,
)
from yarl import URL

from .base import Duration, Model, Owned, check_http_url
from .credential import (
    CREDENTIAL_CONFIGS,
    DEFAULT_INJECT,
    CredentialConfig,
    SigV4Credential,
    credential_union,
)
from .issuers import ISSUER_CONFIGS, IssuerConfig, issuer_union, sigv4_scope

if TYPE_CHECKING:  # the plug-ins' base classes; at run time, the union of the registered ones
    AnyIssuerConfig = IssuerConfig
    AnyCredentialConfig = CredentialConfig
else:
    AnyIssuerConfig = issuer_union()
    AnyCredentialConfig = credential_union()

_UNKNOWN_INJECTS = [
    f"{tag}: {inject}"
    for tag, model in ISSUER_CONFIGS.items()
    for inject in model.supported_injectors
    if inject not in CREDENTIAL_CONFIGS
]
if _UNKNOWN_INJECTS:  # a plug-in names an injector no credential model declares
    raise TypeError(f"supported_injectors without a credential model: {_UNKNOWN_INJECTS}")


class TimeoutsConfig(Model):
    connect_s: Duration = 5.0
    idle_s: Duration = Field(60.0, gt=0, description="longest wait for the next upstream byte")
    total_s: Duration = Field(300.0, gt=0, description="whole exchange, headers and body")
    streams_outlive_total: bool = Field(
        False,
        description="an event stream (text/event-stream, or application/grpc over an HTTP/2 "
        "upstream) may outlive total_s; idle_s still bounds the silence between its bytes",
    )


class AppTimeouts(Model):
    """Bounds on what the app's side of a connection may take (slowloris)."""

    keepalive_s: Duration = Field(
        75.0, description="idle keep-alive connection, and the longest wait for a request head"
    )
    body_idle_s: Duration = Field(
        30.0, description="longest wait for the next byte of a request body credproxy buffers"
    )


class AppLimits(Model):
    """Bounds on what app connections may hold before any of them is served (invariant 9).
    Per process (each ``--workers`` worker has its own)."""

    max_head_bytes: int = Field(
        32768, ge=1024, le=1024 * 1024, description="request line and headers together (431)"
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="app connections at once; lowered to stay under RLIMIT_NOFILE with a "
        "reserve for upstream and issuer sockets",
    )
    max_connections_per_uid: int = Field(
        256, ge=1, description="app connections at once from one uid"
    )
    max_concurrent_streams: int = Field(
        128,
        ge=1,
        le=65536,
        description="streams at once on one HTTP/2 app connection (SETTINGS_MAX_CONCURRENT_STREAMS); "
        "its header list is bounded by max_head_bytes",
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
    against the path as forwarded, after the route prefix, still percent-encoded (``*`` one
    segment, ``**`` any number of segments). Write escapes in upper case (``%C3%A9``)."""

    callers: tuple[str, ...] = Field(min_length=1)
    methods: tuple[Annotated[str, Field(pattern=r"^[A-Z]+$")], ...] | None = Field(
        None, description="default: any method"
    )
    paths: tuple[Annotated[str, AfterValidator(_check_glob)], ...] = ("/**",)


class ClientCertificateConfig(Model):
    """A client certificate issued into memory for mTLS to the upstream: from the PKI engine
    of the OpenBao issuer named here."""

    issuer: str


class RouteConfig(Owned):
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
    client_cert: ClientCertificateConfig | Literal["svid"] | None = Field(
        None,
        description="mTLS with a certificate issued into memory, renewed ahead of expiry: "
        "{issuer: <openbao issuer with pki>}, or svid: the X.509-SVID from the SPIFFE Workload "
        "API (identity.spiffe), rotated in memory",
    )
    upstream_spiffe_id: str | None = Field(
        None,
        pattern=r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*$",
        description="authenticate the upstream by SPIFFE ID instead of hostname: its certificate "
        "must chain to the SPIFFE trust bundle and carry this ID as its URI SAN",
    )
    allow_insecure_http: bool = False
    credential: AnyCredentialConfig = Field(
        description=f"one shape per inject; inject defaults to {DEFAULT_INJECT}"
    )
    strip_headers: tuple[str, ...] = Field(
        (), description="extra inbound headers that carry credentials and must not be forwarded"
    )
    allow_method_override: bool = Field(
        False,
        description="forward X-HTTP-Method-Override, X-Original-URL and the like (stripped by "
        "default); the allow rules are then checked against the overridden method and path too",
    )
    path: Literal["normalized", "opaque"] | None = Field(
        None,
        description="normalized: routing and policy see the RFC 3986 normal form, and a path "
        "that normalizing would change ('.', '..', '//', '%7E') is refused, never rewritten; "
        "opaque: nothing is normalized, the policy matches the raw path and its bytes are "
        "forwarded as sent (for opaque-key APIs: S3, GCS, blob stores; NUL, CR, LF and %00 "
        "are still refused). Default: opaque for sigv4 routes to s3, normalized otherwise",
    )
    timeouts: TimeoutsConfig = TimeoutsConfig()
    allow: tuple[AllowRule, ...] = Field(
        (), description="default deny: a request no rule allows is refused with 403"
    )
    upstream_protocol: Literal["http1.1", "h2", "h2c", "auto"] = Field(
        "http1.1",
        description="how credproxy speaks to the upstream: http1.1; h2 (HTTP/2 over TLS, "
        "ALPN must choose it, an https upstream); h2c (HTTP/2 with prior knowledge over "
        "cleartext, an http upstream: loopback, or allow_insecure_http); auto (an https "
        "upstream: ALPN offers h2 and http/1.1, HTTP/1.1 where the upstream does not choose "
        "h2). gRPC routes need h2, h2c or auto",
    )
    retry_body_max_bytes: int = Field(
        65536,
        ge=0,
        le=1024 * 1024,
        description="bodies up to this size are buffered so a 401 can be retried",
    )

    @model_validator(mode="after")
    def _check(self) -> RouteConfig:
        if self.path_prefix is None and self.host is None:
            raise ValueError("a route needs path_prefix, host, or both")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together")
        if self.uses_svid and URL(self.upstream).scheme != "https":
            raise ValueError("client_cert svid and upstream_spiffe_id need an https upstream")
        if self.upstream_spiffe_id is not None and self.ca_file is not None:
            raise ValueError(
                "upstream_spiffe_id verifies with the SPIFFE trust bundle: remove ca_file"
            )
        if self.client_cert is not None and self.client_cert_file is not None:
            raise ValueError("client_cert and client_cert_file: one client certificate only")
        check_http_url(self.upstream, insecure_ok=self.allow_insecure_http, what="upstream")
        scheme = self.upstream.partition("://")[0].lower()
        if self.upstream_protocol in ("h2", "auto") and scheme != "https":
            raise ValueError(
                f"upstream_protocol {self.upstream_protocol} negotiates HTTP/2 by TLS ALPN: an https "
                "upstream; for cleartext HTTP/2 say h2c"
            )
        if self.upstream_protocol == "h2c" and scheme != "http":
            raise ValueError(
                "upstream_protocol h2c is cleartext HTTP/2: an http upstream; over https say h2"
            )
        return self

    @property
    def uses_svid(self) -> bool:
        """Whether the route presents the X.509-SVID or checks the upstream's SPIFFE ID."""
        return self.client_cert == "svid" or self.upstream_spiffe_id is not None

    @property
    def path_mode(self) -> Literal["normalized", "opaque"]:
        """``path`` as written, else opaque for S3 (keys are opaque bytes: 'a//b' and '../x'
        are keys S3 stores as such and never resolves), else normalized."""
        if self.path is not None:
            return self.path
        credential = self.credential
        if isinstance(credential, SigV4Credential):
            service, _ = sigv4_scope(credential.service, None, self.upstream, None)
            if service == "s3":
                return "opaque"
        return "normalized"


class SPIFFEConfig(Model):
    """The SPIFFE Workload API (a SPIRE agent's socket): SVIDs as the workload's identity."""

    socket: str | None = Field(
        None,
        pattern=r"^(unix:(//)?/\S+|tcp://\S+:[0-9]+)$",
        description="e.g. unix:///run/spire/agent/public/api.sock; default: the "
        "SPIFFE_ENDPOINT_SOCKET environment variable",
    )
    timeout_s: Duration = Field(10.0, description="bound on one Workload API call")
    backoff_max_s: Duration = Field(
        30.0, description="ceiling of the jittered backoff between reconnections to the agent"
    )


SPIFFE_SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"


class IdentityConfig(Model):
    token_file: Path | None = Field(None, description="projected token / JWT-SVID (later issuers)")
    spiffe: SPIFFEConfig | None = Field(
        None,
        description="the SPIFFE Workload API; needed (or SPIFFE_ENDPOINT_SOCKET) when an issuer "
        "or route uses an SVID",
    )

    def spiffe_socket(self) -> str | None:
        """``spiffe.socket``, else ``SPIFFE_ENDPOINT_SOCKET`` (the SPIFFE standard's default)."""
        configured = self.spiffe.socket if self.spiffe is not None else None
        return configured or os.environ.get(SPIFFE_SOCKET_ENV) or None

    dpop_alg: Literal["ES256", "EdDSA"] = "ES256"


class LogConfig(Model):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = Field(True, description="one line per proxied request")


def _octal(value: Any) -> Any:
    """YAML reads an unquoted 0640 as the number 416: take it as the mode it spells."""
    return f"{value:04o}" if isinstance(value, int) and not isinstance(value, bool) else value


class AuditConfig(Model):
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
    file_mode: Annotated[Literal["0600", "0640"], BeforeValidator(_octal)] = Field(
        "0600",
        description="mode the audit file is created with (an existing one is narrowed to it); "
        "0640 lets the file's group (a log shipper) read it",
    )
    fingerprint_key_file: str | None = Field(
        None,
        description="the deployment's key for audit fingerprints (32 random bytes, made 0600 "
        "when absent; refused if group or others may read it), so a credential keeps its "
        "fingerprint across restarts; default: .credproxy-fingerprint.key beside the audit "
        "file; unset with audit to stdout, or unusable: a key per run, with a warning",
    )


class BreakGlassConfig(Model):
    """Caps on break-glass grants (time-boxed exceptions to a route's policy, in memory only)."""

    max_duration_s: Duration = Field(86400.0, le=7 * 86400, description="longest grant")
    max_grants: int = Field(16, ge=1, le=1000, description="grants active at once")


CONTROL_SOCKET = "unix:/run/credproxy/control.sock"


class ControlConfig(Model):
    """The control plane (inventory, revoke, break-glass): a Unix socket or loopback TCP whose
    callers the kernel identifies, answered only for ``allow`` (names under ``callers``)."""

    listen: str | None = Field(
        CONTROL_SOCKET,
        description="unix:/path or loopback host:port; null: no control plane. When left at the "
        "default and the socket cannot be made, credproxy starts without it (logged)",
    )
    allow: tuple[str, ...] = Field(
        (), description="callers that may use control; default: the sidecar's own uid only"
    )
    socket_mode: str = Field(
        "0600", pattern=r"^0?[0-7]{3}$", description="mode of the control socket file"
    )
    head_timeout_s: Duration = Field(
        10.0, le=300, description="bound on a request head (and keep-alive idle), control and admin"
    )
    body_max_bytes: int = Field(65536, ge=1024, le=1024 * 1024)
    revoke_min_interval_s: float = Field(
        30.0,
        ge=0,
        description="a credential revoked less than this ago is not revoked again (answered "
        "'recent', no round-trip to the issuer)",
    )
    break_glass: BreakGlassConfig = BreakGlassConfig()


def _as_tuple(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


class Config(Model):
    listen: Annotated[tuple[str, ...], BeforeValidator(_as_tuple)] = Field(min_length=1)
    admin: str | None = "127.0.0.1:15090"
    allow_non_loopback: bool | tuple[str, ...] = Field(
        False,
        description="listen/admin addresses (as written) that may be non-loopback; true: any "
        "(check-config warns: prefer naming the address)",
    )
    bind_both_loopbacks: bool = Field(
        True,
        description="a listener on 127.0.0.1:P also binds [::1]:P and vice versa, so no other "
        "process can take the 'localhost' of the other family",
    )
    unix_socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")
    local_names: tuple[str, ...] = Field(
        (), description="Host names accepted besides localhost, loopback literals and route hosts"
    )
    identity: IdentityConfig = IdentityConfig()
    callers: dict[str, CallerRule] = {}
    issuers: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")], AnyIssuerConfig]
    routes: tuple[RouteConfig, ...] = Field(min_length=1)
    audit: AuditConfig = AuditConfig()
    log: LogConfig = LogConfig()
    warm_up: bool = Field(True, description="obtain every route's credential at start")
    on_start_failure: Literal["not_ready", "exit"] = Field(
        "not_ready", description="when warm-up cannot get a credential: stay not-ready or exit 1"
    )
    app_timeouts: AppTimeouts = AppTimeouts()
    app_limits: AppLimits = AppLimits()
    control: ControlConfig = ControlConfig()
    shutdown_timeout_s: Duration = 10.0
    revoke_timeout_s: Duration = Field(5.0, description="budget for revocations at shutdown")


@dataclass(frozen=True)
class Address:
    """A parsed ``listen``/``admin`` entry: TCP host and port, or a Unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def loopback_twin(host: str) -> str | None:
    """The loopback address of the other family, for ``bind_both_loopbacks``: 'localhost'
    resolves to either, so whoever holds the other one receives some apps' requests."""
    return {"127.0.0.1": "::1", "::1": "127.0.0.1"}.get(host)


def parse_address(value: str) -> Address:
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"{value!r}: a Unix socket path must be absolute")
        return Address(path=path)
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:([0-9]{1,5})", value)
    if not match or int(match[2]) > 65535:
        raise ValueError(f"{value!r} is not host:port, [v6]:port or unix:/path")
    return Address(host=match[1], port=int(match[2]))
