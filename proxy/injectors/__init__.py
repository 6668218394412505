"""Injectors put a credential into one outbound request; one module per kind.

``INJECTORS`` maps the route's ``credential.inject`` to the implementation (STYLE habit 5).
"""

from __future__ import annotations

from typing import Protocol

from multidict import CIMultiDict

from ..dpop import DPoPKey
from ..token_cache import Token
from .bearer import BearerInjector
from .dpop import DPoPInjector


class Injector(Protocol):
    binds_token: bool  # the token must be bound to the sidecar's DPoP key

    def apply(
        self, headers: CIMultiDict[str], token: Token, method: str, htu: str, nonce: str | None
    ) -> None: ...


def make_injector(kind: str, dpop_key: DPoPKey) -> Injector:
    return INJECTORS[kind](dpop_key)


INJECTORS: dict[str, type[BearerInjector] | type[DPoPInjector]] = {
    "bearer": BearerInjector,
    "dpop": DPoPInjector,
}

__all__ = ["INJECTORS", "Injector", "make_injector"]
