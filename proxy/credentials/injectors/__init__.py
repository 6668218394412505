"""Injectors put a credential into one outbound request; one module per kind.

A plug-in is one module here plus its config model in ``config/credential.py`` (which declares
the ``inject`` name and the options). The module defines the injector and registers a factory
for that model with ``@injector(<config model>)``; ``make_injector`` looks the route's credential
up in ``INJECTORS`` (STYLE habit 5). Every module of this package is imported here, so adding the
module is all it takes; a config model without a factory fails at import. Credentials minted per
request (self-signed JWTs) are carried by the ``jwt`` injector, chosen by the factories of the
injectors that support them.
"""

from __future__ import annotations

import importlib
import pkgutil

from ...config.credential import CREDENTIAL_CONFIGS
from .base import INJECTORS, Injector, Outbound, Signing, injector, make_injector


def _import_plugins() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    missing = [tag for tag, model in CREDENTIAL_CONFIGS.items() if model not in INJECTORS]
    if missing:
        raise ImportError(f"inject values without an injector in {__name__}: {missing}")


_import_plugins()

__all__ = ["INJECTORS", "Injector", "Outbound", "Signing", "injector", "make_injector"]
