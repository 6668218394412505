"""What one config gives the request path: per-route facts (target, credential source, injector,
header strip set, timeouts, TLS context, policy) computed once, so each request only looks them
up. ``lifecycle.assembly`` builds it; the handler reads it; a reload swaps it whole.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field

from ..access.policy import Admission, RoutePolicy
from ..config.model import Config, RouteConfig
from ..credentials.injectors import Injector, Signing
from ..credentials.issuers import Issuer
from ..credentials.minting import MintingSource
from ..credentials.token import CacheKey, Revocation
from ..credentials.token_cache import TokenSource
from ..outbound.origin import Origin, Timeouts
from ..outbound.tls import ClientTLS
from .guard import Guard
from .routing import RouteTable, Target


@dataclass(eq=False)
class RouteRuntime:
    name: str
    config: RouteConfig
    target: Target
    source: TokenSource | MintingSource
    injector: Injector
    strip: frozenset[str]
    origin: Origin
    timeouts: Timeouts
    tls: ClientTLS
    policy: RoutePolicy
    certificate: TokenSource | None = None  # a client certificate issued into memory (mTLS)
    nonce: str | None = field(default=None)  # the resource server's latest DPoP-Nonce

    @functools.cached_property
    def issuer_names(self) -> frozenset[str]:
        """The issuers this route's credentials come from."""
        sources = (self.source, self.certificate)
        return frozenset(s.key.issuer for s in sources if s is not None)

    @functools.cached_property
    def where(self) -> str:
        """How errors and logs name this route and its upstream."""
        return f"route {self.name} upstream {self.target.base}"


@dataclass(eq=False)
class Runtime:
    guard: Guard
    admission: Admission
    table: RouteTable
    routes: list[RouteRuntime]
    sources: dict[CacheKey, TokenSource | MintingSource]
    issuers: dict[str, Issuer]
    signing: Signing  # the DPoP key and the signature batch, kept across reloads
    config: Config

    def route_named(self, name: str) -> RouteRuntime:
        return next(route for route in self.routes if route.name == name)

    async def revoke(
        self, *, reason: str, issuer: str | None = None, route: str | None = None
    ) -> list[dict[str, str]]:
        """Revoke cached credentials (all, or an issuer's, or a route's); one result each
        (``TokenSource.revoke``: rotated first, except at shutdown)."""
        chosen = [r for r in self.routes if route is None or r.name == route]
        wanted = {s.key for r in chosen for s in (r.source, r.certificate) if s is not None}
        wanted |= {k for k in self.sources if k.kind == "session" and any(
            k.issuer in r.issuer_names for r in chosen
        )}  # fmt: skip
        sources = [
            source for key, source in self.sources.items()
            if key in wanted and (issuer is None or key.issuer == issuer)
            and (reason != "shutdown" or self.issuers[key.issuer].revoke_on_shutdown)
        ]  # fmt: skip
        # Certificates first, sessions last: revoking a certificate or a token may need the
        # session (a Vault token) that revoking the session ends.
        order = {"client_cert": 0, "token": 1, "session": 2}
        sources.sort(key=lambda s: order[s.key.kind])
        outcomes: list[Revocation | None] = []
        for kind in order:  # a session is revoked, then (on demand) logged in anew
            rotate = reason != "shutdown" and kind != "session"
            outcomes += await asyncio.gather(
                *(s.revoke(reason=reason, rotate=rotate) for s in sources if s.key.kind == kind)
            )
        for source in sources:
            if source.key.kind == "session" and reason != "shutdown":
                assert isinstance(source, TokenSource)
                source.refresh()
        return [
            {
                "issuer": s.key.issuer,
                "credential": s.key.label,
                "outcome": result.outcome,
                "fingerprint": result.fingerprint,
                "answered": result.answered,
            }
            for s, result in zip(sources, outcomes, strict=True)
            if result is not None
        ]

    async def aclose(self, *, keep: Runtime | None = None) -> None:
        """Stop the token sources, except those ``keep`` (the reloaded runtime) took over. A
        session whose issuer a reload replaced is revoked: the new issuer logs in anew."""
        kept = {id(source) for source in keep.sources.values()} if keep is not None else set()
        for source in self.sources.values():
            if id(source) not in kept:
                if keep is not None and source.key.kind == "session":
                    await source.revoke(reason="reload", rotate=False)
                await source.aclose()
