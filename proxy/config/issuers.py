"""The ``issuers:`` sections of the config, one model per ``type``, and the AWS scope helpers
that sigv4 routes and their checks share.

Each model is an issuer plug-in's config-side declaration: its ``type`` (``Literal``), its fields
and checks, and ``supported_injectors`` (the ``inject`` values its credentials can travel with).
Defining a subclass of ``IssuerConfig`` registers it in ``ISSUER_CONFIGS``; the union of issuer
sections in ``Config``, the inject-versus-type check and the schema are derived from that table.
The runtime side registers against the model: ``credentials/issuers/<type>.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from yarl import URL

from .base import REGION, Duration, Owned, check_http_url, reject_inline_secrets
from .openbao import VAULT_PATH, KVSecret, OpenBaoAuth, PKICertificate, no_vault_token

ISSUER_CONFIGS: dict[str, type[IssuerConfig]] = {}
"""``type`` → config model, in definition order (the order errors and the schema list them)."""


class IssuerConfig(Owned):
    """What every issuer section declares. A subclass with ``type: Literal["<name>"]`` is a
    plug-in: defining it registers it."""

    type: str
    supported_injectors: ClassVar[tuple[str, ...]] = ()
    """The ``credential.inject`` values routes using this issuer may choose."""

    @property
    def uses_svid(self) -> bool:
        """Whether this issuer needs an SVID from the SPIFFE Workload API."""
        return False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        (tag,) = get_args(cls.model_fields["type"].annotation)
        ISSUER_CONFIGS[tag] = cls

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        said = schema.get("description", "").rstrip(".")
        injects = ", ".join(cls.supported_injectors)
        schema["description"] = f"{said}. Routes using it may inject: {injects}".lstrip(". ")
        return schema


def issuer_union() -> Any:
    """The issuer sections ``Config`` accepts: every registered model, told apart by ``type``."""
    return Annotated[Union[tuple(ISSUER_CONFIGS.values())], Field(discriminator="type")]  # noqa: UP007


class OAuth2IssuerConfig(IssuerConfig):
    """OAuth2 ``client_credentials`` with OIDC / RFC 8414 discovery."""

    type: Literal["oauth2"]
    supported_injectors = ("bearer", "dpop")
    issuer_url: str
    client_id: str = Field(min_length=1)
    client_auth: Literal["private_key_jwt", "tls_client_auth", "client_secret", "jwt_svid"] = (
        "private_key_jwt"
    )
    client_assertion_type: Literal["jwt-bearer", "jwt-spiffe"] = Field(
        "jwt-bearer",
        description="client_auth jwt_svid: the JWT-SVID as an RFC 7523 client assertion "
        "(urn:ietf:params:oauth:client-assertion-type:jwt-bearer) or as the OAuth SPIFFE client "
        "authentication draft's (…:client-assertion-type:jwt-spiffe)",
    )
    client_key_file: Path | None = Field(
        None, description="private_key_jwt: the assertion key; tls_client_auth: the cert's key"
    )
    client_cert_file: Path | None = Field(
        None,
        description="tls_client_auth (RFC 8705): PEM client certificate, re-read on rotation; "
        "routes without their own client certificate present it too (certificate-bound tokens)",
    )
    client_cert: Literal["svid"] | None = Field(
        None,
        description="tls_client_auth: svid presents the X.509-SVID from the SPIFFE Workload API "
        "(rotated in memory) instead of client_cert_file and client_key_file",
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

    _no_inline = model_validator(mode="before")(reject_inline_secrets)

    @model_validator(mode="after")
    def _check(self) -> OAuth2IssuerConfig:
        check_http_url(self.issuer_url, insecure_ok=self.allow_insecure_http, what="issuer_url")
        if self.client_auth == "private_key_jwt" and self.client_key_file is None:
            raise ValueError("client_auth private_key_jwt needs client_key_file")
        if self.client_auth == "client_secret" and self.client_secret_file is None:
            raise ValueError("client_auth client_secret needs client_secret_file")
        if self.client_cert == "svid" and self.client_auth != "tls_client_auth":
            raise ValueError("client_cert svid is for client_auth tls_client_auth")
        if self.client_cert == "svid" and (self.client_cert_file or self.client_key_file):
            raise ValueError("client_cert svid replaces client_cert_file and client_key_file")
        if (
            self.client_auth == "tls_client_auth"
            and self.client_cert is None
            and (self.client_cert_file is None or self.client_key_file is None)
        ):
            raise ValueError(
                "client_auth tls_client_auth needs client_cert_file and client_key_file "
                "(or client_cert: svid)"
            )
        if self.client_auth == "tls_client_auth" and URL(self.issuer_url).scheme != "https":
            raise ValueError("client_auth tls_client_auth needs an https issuer_url")
        if self.client_auth == "jwt_svid" and (self.client_key_file or self.client_secret_file):
            raise ValueError(
                "client_auth jwt_svid authenticates with a JWT-SVID from the SPIFFE Workload "
                "API: remove client_key_file / client_secret_file"
            )
        return self

    @property
    def uses_svid(self) -> bool:
        """Whether this issuer needs an SVID from the SPIFFE Workload API."""
        return self.client_auth == "jwt_svid" or self.client_cert == "svid"


class TokenExchangeIssuerConfig(OAuth2IssuerConfig):
    """RFC 8693 token exchange: the workload's identity token (projected service-account token,
    JWT-SVID) is exchanged at the IdP; client authentication as for ``oauth2``."""

    type: Literal["token_exchange"]  # type: ignore[assignment]
    supported_injectors = ("bearer", "dpop")
    subject_token: Literal["file", "jwt_svid"] = Field(
        "file",
        description="file: subject_token_file (or identity.token_file), re-read per exchange; "
        "jwt_svid: a JWT-SVID from the SPIFFE Workload API for subject_audience",
    )
    subject_token_file: Path | None = Field(None, description="default: identity.token_file")
    subject_token_type: str = "urn:ietf:params:oauth:token-type:jwt"
    grant: Literal["token_exchange", "jwt_bearer"] = Field(
        "token_exchange",
        description="token_exchange: RFC 8693 (subject_token); jwt_bearer: the identity token "
        "as an RFC 7523 authorization grant (assertion), e.g. Keycloak's JWT authorization grant",
    )
    subject_audience: str | None = Field(
        None, min_length=1, description="subject_token jwt_svid: its audience; default issuer_url"
    )

    @property
    def uses_svid(self) -> bool:
        return super().uses_svid or self.subject_token == "jwt_svid"


class AWSIssuerConfig(IssuerConfig):
    """AWS STS ``AssumeRoleWithWebIdentity`` with the workload's token file (EKS IRSA style),
    optionally chained into ``AssumeRole``; or, as a marked legacy mode, static keys from a file."""

    type: Literal["aws"]
    supported_injectors = ("sigv4",)
    role_arn: str | None = Field(None, pattern=r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$")
    web_identity: Literal["file", "jwt_svid"] = Field(
        "file",
        description="the web identity token: token_file (or identity.token_file), or a JWT-SVID "
        "from the SPIFFE Workload API for web_identity_audience",
    )
    web_identity_audience: str = Field(
        "sts.amazonaws.com", min_length=1, description="web_identity jwt_svid: its audience"
    )
    token_file: Path | None = Field(None, description="default: identity.token_file")
    assume_role_arn: str | None = Field(
        None, pattern=r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$", description="chained AssumeRole"
    )
    region: str = Field(pattern=REGION)
    sts_endpoint: str | None = Field(
        None, description="default: https://sts.<region>.amazonaws.com"
    )
    session_name: str = Field("credproxy", pattern=r"^[A-Za-z0-9_+=,.@-]{2,64}$")
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

    _no_inline = model_validator(mode="before")(reject_inline_secrets)

    @model_validator(mode="after")
    def _check(self) -> AWSIssuerConfig:
        if (self.role_arn is None) == (self.static_credentials_file is None):
            raise ValueError(
                "set exactly one of role_arn (web identity) or static_credentials_file"
            )
        if self.web_identity == "jwt_svid" and self.role_arn is None:
            raise ValueError("web_identity jwt_svid needs role_arn")
        if self.sts_endpoint is not None:
            check_http_url(
                self.sts_endpoint, insecure_ok=self.allow_insecure_http, what="sts_endpoint"
            )
        return self

    @property
    def uses_svid(self) -> bool:
        return self.web_identity == "jwt_svid"

    @property
    def sts_url(self) -> str:
        return self.sts_endpoint or f"https://sts.{self.region}.amazonaws.com"


class StaticIssuerConfig(IssuerConfig):
    """A long-lived secret (API key) read from a file: legacy, audited as such, so owners can
    find and retire it. The file is re-read every ``reread_s``: rotation needs no restart."""

    type: Literal["static"]
    supported_injectors = ("header", "query", "bearer", "http_signature")
    secret_file: Path
    reread_s: Duration = 5.0

    _no_inline = model_validator(mode="before")(reject_inline_secrets)


class OpenBaoIssuerConfig(IssuerConfig):
    """OpenBao (or HashiCorp Vault): logs in with the workload's token, holds the Vault token in
    memory only (renewed ahead of its TTL, revoked at shutdown), and serves a KV v2 secret as a
    legacy static credential, re-read every ``reread_s``, and/or client certificates from its
    PKI engine."""

    type: Literal["openbao"]
    supported_injectors = ("header", "query", "bearer", "http_signature")
    address: str = Field(description="e.g. https://openbao.internal:8200")
    ca_file: Path | None = None
    namespace: str | None = Field(None, pattern=VAULT_PATH, description="sent as X-Vault-Namespace")
    allow_insecure_http: bool = False
    auth: OpenBaoAuth
    secret: KVSecret | None = Field(None, description="for routes whose credential names it")
    pki: PKICertificate | None = Field(None, description="for routes whose client_cert names it")
    reread_s: Duration = Field(30.0, ge=1, description="how often the KV secret is read again")
    serve_stale_s: Duration = Field(
        300.0, description="how long the last value read keeps serving while OpenBao is down"
    )
    renew_ahead_s: Duration | None = Field(
        None, description="renew the Vault token this long before its TTL ends; default: a third"
    )
    request_timeout_s: Duration = 10.0
    backoff_max_s: Duration = 30.0
    revoke_on_shutdown: bool = Field(True, description="revoke the Vault token on exit")

    _no_token = model_validator(mode="before")(no_vault_token)

    @model_validator(mode="after")
    def _check(self) -> OpenBaoIssuerConfig:
        if self.secret is None and self.pki is None:
            raise ValueError(
                "an OpenBao issuer serves a KV secret, PKI certificates or both: "
                "give it secret: {path, field} and/or pki: {role, common_name}"
            )
        check_http_url(self.address, insecure_ok=self.allow_insecure_http, what="address")
        if URL(self.address).path not in ("", "/"):
            raise ValueError("address is the server's origin, without /v1 or another path")
        return self

    @property
    def refresh_ahead_s(self) -> float:
        """The KV value is re-read ``reread_s`` after it was read; it serves ``serve_stale_s``
        longer while OpenBao cannot be reached."""
        return self.serve_stale_s

    @property
    def uses_svid(self) -> bool:
        return self.auth.identity == "jwt_svid"


class VaultIssuerConfig(OpenBaoIssuerConfig):
    """``type: vault``: the same issuer, for HashiCorp Vault (the same API paths)."""

    type: Literal["vault"]  # type: ignore[assignment]


class SelfSignedJWTIssuerConfig(IssuerConfig):
    """A JWT minted per request and signed by the sidecar; upstreams verify it against the JWKS
    published on the admin listener (``/.well-known/jwks.json``)."""

    type: Literal["self_signed_jwt"]
    supported_injectors = ("bearer", "header", "http_signature")
    iss: str = Field(min_length=1)
    sub: str = Field(min_length=1)
    key_file: Path | None = Field(
        None, description="PEM key, re-read on change; default: generated"
    )
    alg: Literal["ES256", "EdDSA", "RS256"] = Field("ES256", description="for a generated key")
    lifetime_s: float = Field(30.0, gt=0, le=60)
    request_claims: bool = Field(False, description="add htm and htu (method, URL sans query)")

    _no_inline = model_validator(mode="before")(reject_inline_secrets)


class SPIFFEIssuerConfig(IssuerConfig):
    """JWT-SVIDs from the SPIFFE Workload API (``identity.spiffe``), one per audience, cached and
    refreshed ahead of expiry like any token; routes send them with ``inject: jwt_svid``
    (audience: the route's, else the upstream's origin)."""

    type: Literal["spiffe"]
    supported_injectors = ("jwt_svid", "header")
    spiffe_id: str | None = Field(
        None,
        pattern=r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*$",
        description="which SVID, when the workload is entitled to several; default: the first",
    )
    refresh_ahead_s: Duration | None = Field(
        None, description="default: min(60 s, 20 % of the JWT-SVID lifetime)"
    )
    backoff_max_s: Duration = 30.0

    @property
    def uses_svid(self) -> bool:
        return True


def aws_service_region(host: str) -> tuple[str | None, str | None]:
    """Derive (signing service, region) from an AWS endpoint host name, where it says them."""
    match = re.fullmatch(r"(?:.+\.)?([a-z0-9-]+)[.-](" + REGION[1:-1] + r")\.amazonaws\.com", host)
    if match:
        return match[1], match[2]
    return None, None


def sigv4_scope(
    service: str | None, region: str | None, upstream: str, issuer_region: str | None
) -> tuple[str | None, str | None]:
    """The (service, region) a sigv4 route signs for: as configured, else from the upstream
    host (``dynamodb.eu-west-1.amazonaws.com``), else the region of the route's issuer."""
    derived_service, derived_region = aws_service_region(URL(upstream).host or "")
    return service or derived_service, region or derived_region or issuer_region
