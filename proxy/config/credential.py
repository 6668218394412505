"""A route's ``credential:`` section: which issuer, for which audience and scope, and how the
credential travels (``inject``), one model per injector carrying only the options that apply.

Each model is an injector plug-in's config-side declaration: ``inject: Literal["<name>"]``, its
options, and ``cross_checks`` against the route's issuer. Defining a subclass of
``CredentialConfig`` registers it in ``CREDENTIAL_CONFIGS``; the union a route's ``credential``
validates against (discriminated on ``inject``, ``dpop`` when left out), the ``inject`` choices,
the schema and the "only for inject: …" messages are derived from that table. The runtime side
registers against the model: ``credentials/injectors/<name>.py``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import AfterValidator, BeforeValidator, Field, model_validator
from yarl import URL

from .. import aws_sdk
from .base import REGION, Model
from .issuers import (
    AWSIssuerConfig,
    IssuerConfig,
    OpenBaoIssuerConfig,
    SelfSignedJWTIssuerConfig,
    StaticIssuerConfig,
    sigv4_scope,
)

DEFAULT_INJECT = "dpop"
CREDENTIAL_CONFIGS: dict[str, type[CredentialConfig]] = {}
"""``inject`` → config model, in definition order (the order errors and the schema list them)."""

Problem = tuple[str, str]
"""(field under ``credential``, or "" for the section itself; what is wrong)."""


class CredentialConfig(Model):
    """What every credential declares. A subclass with ``inject: Literal["<name>"]`` is a
    plug-in: defining it registers it."""

    issuer: str
    audience: str | None = None
    scope: str | None = None
    inject: str

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        (tag,) = get_args(cls.model_fields["inject"].annotation)
        CREDENTIAL_CONFIGS[tag] = cls

    def cross_checks(self, issuer: IssuerConfig, upstream: str) -> list[Problem]:
        """Every problem of this credential with its route's issuer and upstream (all of them,
        not the first). That ``inject`` suits the issuer's type is checked before, for all."""
        del issuer, upstream
        return []

    def cache_audience(self, upstream: str) -> str | None:
        """The audience credentials for this route are requested (and cached) for."""
        del upstream
        return self.audience


PayloadMaxBytes = Annotated[
    int,
    Field(
        ge=0,
        le=256 * 1024 * 1024,
        description="bound on a body buffered to hash it (sigv4 signed, http_signature digest)",
    ),
]
_PAYLOAD_MAX_BYTES = 8 * 1024 * 1024


class BearerCredential(CredentialConfig):
    """``Authorization: Bearer`` (RFC 6750): the plain token, or a JWT minted for the request."""

    inject: Literal["bearer"]


class DPoPCredential(CredentialConfig):
    """``Authorization: DPoP`` and a proof per request (RFC 9449); the default."""

    inject: Literal["dpop"] = "dpop"


class SigV4Credential(CredentialConfig):
    """AWS Signature Version 4 over each request."""

    inject: Literal["sigv4"]
    service: str | None = Field(
        None, pattern=r"^[a-z0-9-]+$", description="signing name, e.g. s3, dynamodb, sqs"
    )
    region: str | None = Field(None, pattern=REGION, description="default: from upstream")
    payload: Literal["unsigned", "streaming", "signed"] | None = Field(
        None,
        description="body handling: unsigned streams (S3 accepts UNSIGNED-PAYLOAD); "
        "streaming streams aws-chunked with a CRC32 trailer (S3, needs Content-Length); signed "
        "buffers up to payload_max_bytes to hash it. Default: unsigned for s3 and "
        "vpc-lattice-svcs (VPC Lattice requires it), signed otherwise",
    )
    payload_max_bytes: PayloadMaxBytes = _PAYLOAD_MAX_BYTES

    def cross_checks(self, issuer: IssuerConfig, upstream: str) -> list[Problem]:
        region = issuer.region if isinstance(issuer, AWSIssuerConfig) else None
        service, region = sigv4_scope(self.service, self.region, upstream, region)
        problems: list[Problem] = []
        if service is None:
            problems.append(("service", "required for sigv4 (the upstream host does not name one)"))
        if region is None:
            problems.append(
                (
                    "region",
                    "required for sigv4 (neither the upstream host nor the issuer names one)",
                )
            )
        if self.payload == "streaming" and service != "s3":
            problems.append(
                ("payload", "streaming (aws-chunked with a checksum trailer) is for s3 only")
            )
        known = aws_sdk.known_service(service) if service is not None else True
        if known is None:
            problems.append(("inject", "sigv4 needs the aws extra: pip install 'credproxy[aws]'"))
        elif not known:
            problems.append(("service", f"{service!r} is not an AWS service botocore knows"))
        return problems


class HeaderCredential(CredentialConfig):
    """The credential in a header of the route's choosing."""

    inject: Literal["header"]
    header: str = Field(pattern=r"^[A-Za-z0-9-]+$", description="e.g. X-Api-Key")
    header_prefix: str = Field("", pattern=r"^[\x20-\x7e]*$", description="e.g. 'Token '")


class QueryCredential(CredentialConfig):
    """The credential in a query parameter."""

    inject: Literal["query"]
    query_param: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="e.g. api_key")


_SF_STRING = r"^[\x20\x21\x23-\x5b\x5d-\x7e]+$"

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
    # printable ASCII but '"' and backslash: each is written as an RFC 8941 string, unescaped
    tag: str | None = Field(None, pattern=_SF_STRING, description="application tag")
    key_id: str | None = Field(
        None,
        pattern=_SF_STRING,
        description="keyid; default: the JWK thumbprint (self_signed_jwt); required for static "
        "(HMAC-SHA256 with the secret)",
    )

    @model_validator(mode="after")
    def _unique(self) -> HTTPSignature:
        if len(set(self.components)) != len(self.components):
            raise ValueError("components must not repeat")
        return self


class HTTPSignatureCredential(CredentialConfig):
    """An RFC 9421 HTTP Message Signature over each request, with the issuer's key."""

    inject: Literal["http_signature"]
    signature: HTTPSignature = Field(default_factory=HTTPSignature)
    payload_max_bytes: PayloadMaxBytes = _PAYLOAD_MAX_BYTES

    def cross_checks(self, issuer: IssuerConfig, upstream: str) -> list[Problem]:
        key_id = self.signature.key_id
        if isinstance(issuer, StaticIssuerConfig | OpenBaoIssuerConfig) and not key_id:
            return [("signature.key_id", "required to sign with a static (HMAC) secret")]
        if isinstance(issuer, SelfSignedJWTIssuerConfig) and key_id:
            return [
                (
                    "signature.key_id",
                    "the keyid is the key's JWK thumbprint, as in the admin JWKS; remove key_id",
                )
            ]
        return []


class JWTSVIDCredential(CredentialConfig):
    """A JWT-SVID from the SPIFFE Workload API as ``Authorization: Bearer`` (SPIFFE
    service-to-service authentication); its audience is the route's, else the upstream's origin."""

    inject: Literal["jwt_svid"]

    def cache_audience(self, upstream: str) -> str | None:
        if self.audience:
            return self.audience
        url = URL(upstream)
        return f"{url.scheme}://{url.authority}"


def _default_inject(value: Any) -> Any:
    """``inject`` may be left out (``dpop``); the union's tag must be there to choose a model."""
    if isinstance(value, dict) and "inject" not in value:
        return {**value, "inject": DEFAULT_INJECT}
    return value


def credential_union() -> Any:
    """What a route's ``credential`` accepts: every registered model, told apart by ``inject``."""
    return Annotated[
        Union[tuple(CREDENTIAL_CONFIGS.values())],  # noqa: UP007
        Field(discriminator="inject"),
        BeforeValidator(_default_inject),
    ]


def injectors_with(option: str) -> list[str]:
    """The ``inject`` values whose credential takes ``option``: for "only for inject: …"."""
    return [tag for tag, model in CREDENTIAL_CONFIGS.items() if option in model.model_fields]
