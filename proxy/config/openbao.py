"""What the ``openbao`` (alias ``vault``) issuer section is made of: how credproxy logs in to
OpenBao or Vault with the workload's identity (never a stored Vault token), and the KV v2 secret
and PKI certificates it serves from there. The section itself, ``OpenBaoIssuerConfig``, is in
``config.issuers`` with the other issuer types; the runtime side is
``credentials/issuers/openbao.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import Duration, Model, reject_inline_secrets

VAULT_PATH = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$"  # no '..'


def no_vault_token(data: Any) -> Any:
    """A Vault token is never configured: credproxy logs in with the workload's identity."""
    if isinstance(data, dict):
        for key in ("token", "token_file", "vault_token", "client_token"):
            if key in data:
                raise ValueError(
                    f"'{key}': credproxy never uses a stored Vault token; it logs in with the "
                    "workload's token (auth: {method: jwt, role: …, token_file: …})"
                )
    return data


class OpenBaoAuth(Model):
    """How credproxy logs in to OpenBao: the workload's own token (a projected service-account
    token read from its file, or a JWT-SVID from the SPIFFE Workload API) presented to a role
    of the JWT auth method or, ``method: kubernetes``, of the Kubernetes auth method (which has
    OpenBao check it with the TokenReview API): ``auth/<mount>/login`` {role, jwt} either way."""

    method: Literal["jwt", "kubernetes"] = "jwt"
    role: str = Field(min_length=1, pattern=r"^[\x21-\x7e]+$")
    mount: str | None = Field(None, pattern=VAULT_PATH, description="default: the method")
    identity: Literal["token_file", "jwt_svid"] = Field(
        "token_file",
        description="token_file: the workload's token file, re-read for every login; "
        "jwt_svid: a JWT-SVID for audience from the SPIFFE Workload API (method jwt)",
    )
    token_file: Path | None = Field(None, description="default: identity.token_file")
    audience: str | None = Field(
        None,
        min_length=1,
        description="identity jwt_svid: the JWT-SVID's audience (the role's bound_audiences); "
        "default: the issuer's address",
    )

    @property
    def path(self) -> str:
        return f"auth/{self.mount or self.method}/login"

    _no_inline = model_validator(mode="before")(reject_inline_secrets)

    @model_validator(mode="after")
    def _check(self) -> OpenBaoAuth:
        if self.identity == "jwt_svid":
            if self.method == "kubernetes":
                raise ValueError(
                    "identity jwt_svid logs in with the JWT auth method (method: jwt); the "
                    "Kubernetes method accepts only service-account tokens (TokenReview)"
                )
            if self.token_file is not None:
                raise ValueError(
                    "token_file is for identity token_file; identity jwt_svid fetches a "
                    "JWT-SVID from the SPIFFE Workload API instead"
                )
        elif self.audience is not None:
            raise ValueError(
                "audience is for identity jwt_svid; a token file's audience is set where the "
                "token is projected"
            )
        return self


class KVSecret(Model):
    """One field of a KV version 2 secret (``<mount>/data/<path>``), injected as a legacy
    static secret."""

    mount: str = Field("secret", pattern=VAULT_PATH)
    path: str = Field(pattern=VAULT_PATH)
    field: str = Field(min_length=1)


class PKICertificate(Model):
    """Short-lived client certificates from OpenBao's PKI engine, for mTLS to the upstreams of
    the routes that name this issuer in ``client_cert``; renewed ahead of expiry, revoked at
    shutdown, never written to disk."""

    mount: str = Field("pki", pattern=VAULT_PATH)
    role: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    common_name: str = Field(min_length=1, max_length=255, pattern=r"^[\x20-\x7e]+$")
    alt_names: tuple[str, ...] = Field((), description="DNS or email subject alternative names")
    uri_sans: tuple[str, ...] = ()
    ttl_s: Duration | None = Field(None, ge=2, description="default: the PKI role's TTL")
    key: Literal["memory", "openbao"] = Field(
        "memory",
        description="memory: the key is made in credproxy's memory and only a CSR is sent "
        "(pki/sign/<role>); openbao: OpenBao makes it and sends it once (pki/issue/<role>)",
    )
    key_type: Literal["ec", "rsa"] = Field("ec", description="ec: P-256; rsa: 2048 bits")
    renew_ahead_s: Duration = Field(
        300.0,
        description="renew this long before the certificate expires (at most half of its lifetime)",
    )
