"""Issuers obtain short-lived credentials with the workload's identity; one module per type.

``ISSUERS`` maps the config's ``type`` to the implementation (STYLE habit 5).
"""

from __future__ import annotations

from .oauth2 import OAuth2Issuer

ISSUERS = {"oauth2": OAuth2Issuer}

__all__ = ["ISSUERS", "OAuth2Issuer"]
