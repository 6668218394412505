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
from ..credentials.token_cache import CacheKey, TokenSource
from ..outbound.tls import ClientTLS
from ..outbound.upstream import Origin, Timeouts
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
    nonce: str | None = field(default=None)  # the resource server's latest DPoP-Nonce

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
        wanted = {r.source.key for r in self.routes if route is None or r.name == route}
        sources = [
            source for key, source in self.sources.items()
            if key in wanted and (issuer is None or key.issuer == issuer)
            and (reason != "shutdown" or self.issuers[key.issuer].revoke_on_shutdown)
        ]  # fmt: skip
        outcomes = await asyncio.gather(
            *(s.revoke(reason=reason, rotate=reason != "shutdown") for s in sources)
        )
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
        """Stop the token sources, except those ``keep`` (the reloaded runtime) took over."""
        kept = {id(source) for source in keep.sources.values()} if keep is not None else set()
        for source in self.sources.values():
            if id(source) not in kept:
                await source.aclose()
