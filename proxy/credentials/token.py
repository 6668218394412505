"""What a token source holds and is keyed by: a ``Token`` (a short-lived credential, or a
certificate and its key), its ``CacheKey``, and what a revocation did (``Revocation``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from ..secret import Secret
from .dpop import access_token_hash


@dataclass(frozen=True, slots=True)
class Token:
    """A short-lived credential. ``value`` is what travels in requests (an access token, an AWS
    session token); ``signing_secret`` is what only signs (an AWS secret key), never sent."""

    value: Secret
    token_type: str  # "Bearer", "DPoP" or "AWS4"
    lifetime_s: float
    obtained_at: float = field(default_factory=time.time)
    obtained_mono: float = field(default_factory=time.monotonic)
    key_id: str | None = None
    signing_secret: Secret | None = None
    legacy: bool = False  # a long-lived static secret, audited so owners can retire it
    secret_version: int | None = None  # where a legacy secret is versioned (KV v2): audited
    certificate: str | None = None  # a client certificate chain (PEM, public); value: its key
    serial: str | None = None  # the certificate's serial number: audited, revoked by it
    ath: str = field(init=False)  # DPoP ``ath``, hashed once per token, not per request
    # Stop sending a token shortly before it expires so it is not rejected in flight.
    usable_until_mono: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ath", access_token_hash(self.value.reveal()))
        margin_s = min(1.0, 0.1 * self.lifetime_s)
        object.__setattr__(
            self, "usable_until_mono", self.obtained_mono + self.lifetime_s - margin_s
        )

    @property
    def fingerprint(self) -> str:
        """What audit events name it by: the value's fingerprint; for credentials minted per
        request (one JWT each) the placeholder's label, ``per-request:<issuer>``."""
        return self.value.fingerprint if self.token_type != "minted" else self.value.reveal()

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime_s


@dataclass(frozen=True, slots=True)
class Revocation:
    """What a revoke did. ``outcome``: revoked, unsupported or failed (the issuer's answer), or
    deferred (no replacement could be issued: the token keeps serving and is revoked after the
    next successful refresh). ``answered``: now; joined (the same revoke was in flight); recent
    (revoked less than ``revoke_min_interval_s`` ago: no new round-trip to the issuer)."""

    outcome: str
    fingerprint: str
    answered: Literal["now", "joined", "recent"] = "now"


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What a source holds: a token (for an audience and scope, bound or not); ``kind``
    client_cert: an issuer's client certificate for mTLS to upstreams; ``kind`` session: the
    session an issuer logged in with (a Vault token)."""

    issuer: str
    audience: str | None
    scope: str | None
    bound: bool
    kind: Literal["token", "client_cert", "session"] = "token"
    label: str = field(init=False, compare=False)  # bounded: for metrics and audit events

    def __post_init__(self) -> None:
        label = f"{self.audience or '-'}|{self.scope or '-'}|{self.binding}"
        object.__setattr__(self, "label", label if self.kind == "token" else self.kind)

    @property
    def binding(self) -> str:
        """What the credential is bound to: a DPoP key, a TLS connection (mtls), or nothing."""
        return "mtls" if self.kind == "client_cert" else "dpop" if self.bound else "bearer"


def sendable(value: str) -> bool:
    """Printable ASCII only: what a credential sent in an HTTP header or query may hold. A CR,
    LF or NUL would end a header line early for some parser: a forged header."""
    return value.isascii() and value.isprintable()
