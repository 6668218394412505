"""What every injector is given (``Outbound``) and what it may tell the handler (``Injector``);
the table that pairs each credential config model with the factory of its injector
(``INJECTORS``), filled by the ``@injector(<config model>)`` line of each module."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Never, TypeVar, cast

from aiohttp import StreamReader
from multidict import CIMultiDict
from yarl import URL

from ...config.credential import CredentialConfig
from ...config.model import RouteConfig
from ...errors import AnswerFormat
from ..dpop import DPoPKey
from ..issuers.base import Issuer
from ..signing import SignatureBatch
from ..token import Token

Body = bytes | StreamReader | AsyncIterable[bytes] | None


@dataclass(slots=True)
class Outbound:
    """The request about to be sent upstream; injectors add headers to it."""

    method: str
    origin: str  # scheme://host[:port] of the upstream
    path_qs: str  # the request-target sent upstream: raw path and query, as encoded
    htu: str  # target without query, as DPoP wants it
    headers: CIMultiDict[str]
    body: bytes | None  # the buffered body, or None when there is none or it streams
    has_body: bool = False  # buffered or streaming
    nonce: str | None = None  # the resource server's latest DPoP-Nonce
    secret: str = ""  # what the injector put on the wire, to scrub from the response

    @property
    def url(self) -> URL:
        """The full target, for the signatures that cover it (built when asked, not per
        request)."""
        return URL(self.origin + self.path_qs, encoded=True)


class Injector:
    """Defaults: the token is not key-bound, the body may stream, no clock to correct."""

    binds_token = False  # the token must be bound to the sidecar's DPoP key
    needs_body = False  # the whole body must be buffered (and hashed) before signing
    body_max_bytes = 0  # bound on that buffer; larger bodies get 413
    strip: frozenset[str] = frozenset()  # app headers this scheme sets itself
    clock_sensitive = False  # a 403 may mean "clock skew": inspect it (``corrects_clock``)
    # What travels is the credential itself (a bearer value, not a proof bound to the sidecar's
    # key or a signature): an echo of it is usable, so answers must come scrubbable (identity).
    usable_if_echoed = False
    answer_as: AnswerFormat = "problem"  # how credproxy's own answers on the route are written

    async def apply(self, outbound: Outbound, token: Token) -> None:
        raise NotImplementedError

    def encode(self, outbound: Outbound, body: Body) -> Body:
        """The body as it goes upstream, after ``apply`` on ``outbound``; by default unchanged."""
        return body

    def corrects_clock(self, status: int, body: bytes, date: str | None) -> bool:
        """Whether this answer means "your clock is off", now corrected: worth one replay."""
        return False


@dataclass(frozen=True, slots=True)
class Signing:
    """What the sidecar signs with, shared by every route: its DPoP key and the batch in which
    per-request signatures are made (``signing``)."""

    dpop_key: DPoPKey
    batch: SignatureBatch


C = TypeVar("C", bound=CredentialConfig)
InjectorFactory = Callable[[C, RouteConfig, Issuer, Signing], Injector]
"""(the route's credential, the route, its issuer, the sidecar's signing) → the route's injector."""

INJECTORS: dict[type[CredentialConfig], InjectorFactory[Never]] = {}
"""Credential model → the factory registered for it, which takes that model (``make_injector``
relies on it); ``Never``: no one credential type fits every factory."""


def injector(config: type[C]) -> Callable[[InjectorFactory[C]], InjectorFactory[C]]:
    """Register the decorated factory as the injector of credentials modelled by ``config``."""

    def register(factory: InjectorFactory[C]) -> InjectorFactory[C]:
        if config in INJECTORS:
            raise TypeError(f"{config.__name__} already has an injector")
        INJECTORS[config] = factory
        return factory

    return register


def make_injector(route: RouteConfig, issuer: Issuer, signing: Signing) -> Injector:
    """The route's injector, made by the factory registered for its credential's model."""
    return _make(route.credential, route, issuer, signing)


def _make(credential: C, route: RouteConfig, issuer: Issuer, signing: Signing) -> Injector:
    factory = cast(InjectorFactory[C], INJECTORS[type(credential)])  # registered for this model
    return factory(credential, route, issuer, signing)
