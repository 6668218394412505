"""The source of a route whose credential is minted per request (self-signed JWTs): nothing to
cache, refresh or revoke; it stands where a ``token_cache.TokenSource`` would."""

from __future__ import annotations

from ..audit.trail import Audit
from ..secret import Secret
from .token import CacheKey, Revocation, Token


class MintingSource:
    """The source of a route whose credential is minted per request (self-signed JWTs): nothing
    to cache or refresh, always ready. ``get()`` returns a placeholder the injector ignores."""

    ready = True
    token = None  # nothing cached

    def __init__(self, key: CacheKey, *, key_id: str, audit: Audit) -> None:
        self.key = key
        self._key_id = key_id
        self._audit = audit
        label = Secret(f"per-request:{key.issuer}")  # not a secret: names the minted JWTs
        self._placeholder = Token(value=label, token_type="minted", lifetime_s=float("inf"))
        self._started = False
        self.routes: tuple[str, ...] = ()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._audit.emit(
                "credential.issued",
                issuer=self.key.issuer,
                routes=self.routes,
                audience=self.key.audience,
                per_request=True,
                fingerprint=self._placeholder.fingerprint,
                key_id=self._key_id,
            )

    async def get(self) -> Token:
        return self._placeholder

    def invalidate(self, token: Token) -> None:
        del token  # a fresh JWT is minted for the replay anyway

    async def revoke(self, *, reason: str, rotate: bool) -> Revocation | None:
        del reason, rotate
        return None  # nothing held: each JWT expires within a minute

    async def aclose(self) -> None:
        return None
