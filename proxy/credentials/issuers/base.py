"""What an issuer is (``Issuer``) and the table that pairs each issuer config model with its
implementation (``ISSUERS``), filled by the ``@issuer(<config model>)`` line of each module;
``make_issuer`` builds the issuer a config section describes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Never, Protocol, TypeVar, cast, runtime_checkable

import aiohttp

from ...config.issuers import IssuerConfig
from ...config.model import IdentityConfig
from ..dpop import DPoPKey
from ..signing import SignatureBatch
from ..token import CacheKey, Token

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ...spiffe.workload_api import WorkloadAPI


class Issuer(Protocol):
    name: str
    region: str | None  # where the issuer's credentials are scoped (AWS), else None
    revoke_on_shutdown: bool
    # Tokens come over the network: with --workers, worker 0 fetches them for all (token_share).
    shared_by_workers: bool

    @property
    def config(self) -> IssuerConfig:
        """The section it was built from; a reload keeps the issuer while this is equal."""
        ...

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


@runtime_checkable
class SessionIssuer(Issuer, Protocol):
    """An issuer that logs in to its service and holds a session credential (a Vault token)
    besides what it issues. The session is a credential like the others: the assembly gives it
    a source (``CacheKey`` kind session) that renews it ahead of expiry, audits and lists it,
    and revokes it after the credentials issued with it."""

    holds_session: bool


C_contra = TypeVar("C_contra", bound=IssuerConfig, contravariant=True)
C = TypeVar("C", bound=IssuerConfig)


class IssuerFactory(Protocol[C_contra]):
    """An issuer class (or a function) that builds an issuer from the config model it was
    registered for (``@issuer(<model>)``; not checked statically: a TypeVar bound cannot name
    another)."""

    def __call__(
        self,
        name: str,
        config: C_contra,
        *,
        session: aiohttp.ClientSession,
        dpop_key: DPoPKey,
        identity: IdentityConfig,
        workload_api: WorkloadAPI | None = None,
    ) -> Issuer: ...


ISSUERS: dict[type[IssuerConfig], IssuerFactory[Never]] = {}
"""Config model → the factory registered for it, which takes that model (``make_issuer`` relies
on it); ``Never``: no one config type fits every factory."""

F = TypeVar("F", bound=IssuerFactory[Never])


def issuer(config: type[IssuerConfig]) -> Callable[[F], F]:
    """Register the decorated class as the implementation of ``config``'s issuer type."""

    def register(factory: F) -> F:
        if config in ISSUERS:
            raise TypeError(f"{config.__name__} already has an implementation")
        ISSUERS[config] = factory
        return factory

    return register


def make_issuer(
    name: str,
    config: C,
    *,
    session: aiohttp.ClientSession,
    dpop_key: DPoPKey,
    identity: IdentityConfig,
    workload_api: WorkloadAPI | None = None,
) -> Issuer:
    """The issuer ``config`` describes, built by the implementation registered for its model.
    ``workload_api``: the SPIFFE Workload API client, for issuers rooted in an SVID."""
    factory = cast(IssuerFactory[C], ISSUERS[type(config)])  # registered for exactly this model
    return factory(
        name,
        config,
        session=session,
        dpop_key=dpop_key,
        identity=identity,
        workload_api=workload_api,
    )
