"""Issuers obtain short-lived credentials with the workload's identity; one module per type.

A plug-in is one module here plus its config model in ``config/issuers.py`` (which declares the
``type``, the fields and the injectors it supports). The module defines the issuer class and
registers it against that model with ``@issuer(<config model>)``; ``ISSUERS`` (config model →
implementation, STYLE habit 5) is what ``make_issuer``, which assembly calls, looks up. Every module of this package is imported
here, so adding the module is all it takes; a config model without one fails at import.
"""

from __future__ import annotations

import importlib
import pkgutil

from ...config.issuers import ISSUER_CONFIGS
from .base import ISSUERS, Issuer, PerRequestIssuer, SessionIssuer, issuer, make_issuer
from .self_signed_jwt import SelfSignedJWTIssuer


def _import_plugins() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    missing = [tag for tag, model in ISSUER_CONFIGS.items() if model not in ISSUERS]
    if missing:
        raise ImportError(f"issuer types without an implementation in {__name__}: {missing}")


_import_plugins()

__all__ = [
    "ISSUERS",
    "Issuer",
    "PerRequestIssuer",
    "SelfSignedJWTIssuer",
    "SessionIssuer",
    "issuer",
    "make_issuer",
]
