"""Injectors put a credential into one outbound request; one module per kind.

``INJECTORS`` maps the route's ``credential.inject`` to a factory (STYLE habit 5).
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import Route
from ..dpop import DPoPKey
from .base import Injector, Outbound
from .bearer import BearerInjector
from .dpop import DPoPInjector
from .sigv4 import SigV4Injector

INJECTORS: dict[str, Callable[[Route, str | None, DPoPKey], Injector]] = {
    "bearer": lambda route, issuer_region, dpop_key: BearerInjector(),
    "dpop": lambda route, issuer_region, dpop_key: DPoPInjector(dpop_key),
    "sigv4": lambda route, issuer_region, dpop_key: SigV4Injector.for_route(route, issuer_region),
}


def make_injector(route: Route, issuer_region: str | None, dpop_key: DPoPKey) -> Injector:
    return INJECTORS[route.credential.inject](route, issuer_region, dpop_key)


__all__ = ["INJECTORS", "Injector", "Outbound", "make_injector"]
