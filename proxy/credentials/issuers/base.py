"""What an issuer is (``Issuer``) and the table that pairs each issuer config model with its
implementation (``ISSUERS``), filled by the ``@issuer(<config model>)`` line of each module."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

import aiohttp

from ...config.issuers import IssuerConfig
from ...config.model import IdentityConfig
from ..dpop import DPoPKey
from ..signing import SignatureBatch
from ..token_cache import CacheKey, Token


class Issuer(Protocol):
    name: str
    config: Any
    region: str | None  # where the issuer's credentials are scoped (AWS), else None
    revoke_on_shutdown: bool
    # Tokens come over the network: with --workers, worker 0 fetches them for all (token_share).
    shared_by_workers: bool

    async def fetch(self, key: CacheKey) -> Token: ...

    async def revoke(self, token: Token) -> str: ...


@runtime_checkable
class PerRequestIssuer(Issuer, Protocol):
    """An issuer whose credential is made for each request (nothing cached): injectors that
    support it ask for a JWT (``mint``) or its key (``signing_key``) instead of a token."""

    per_request: bool
    kid: str

    def mint(self, batch: SignatureBatch, audience: str, htm: str, htu: str) -> Awaitable[str]: ...

    def signing_key(self, token: Token) -> tuple[str, str, Callable[[bytes], bytes]]: ...


class IssuerFactory(Protocol):
    def __call__(
        self,
        name: str,
        config: Any,  # the model it was registered for
        *,
        session: aiohttp.ClientSession,
        dpop_key: DPoPKey,
        identity: IdentityConfig,
    ) -> Issuer: ...


ISSUERS: dict[type[IssuerConfig], IssuerFactory] = {}

F = TypeVar("F", bound=IssuerFactory)


def issuer(config: type[IssuerConfig]) -> Callable[[F], F]:
    """Register the decorated class as the implementation of ``config``'s issuer type."""

    def register(factory: F) -> F:
        if config in ISSUERS:
            raise TypeError(f"{config.__name__} already has an implementation")
        ISSUERS[config] = factory
        return factory

    return register
