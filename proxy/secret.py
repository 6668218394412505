"""A credential value that cannot leak by accident: no repr, no str, only a fingerprint.

A fingerprint is HMAC-SHA256 under a key never shown: whoever holds the audit log cannot confirm
a guessed secret by hashing it, as they could with a plain SHA-256. ``credproxy run`` installs
the deployment's key (``audit.fingerprint_key_file``: a 0600 file made once) before any
credential is read and before ``--workers`` forks, so every worker — and every later run of the
deployment — names a credential alike. Until then, and where that file cannot be had, the key is drawn at random for
this run (``key_scope()`` says which). ``INSTANCE`` names the run; ``key_id()`` names the key
without revealing it, so a reader can tell which fingerprints compare.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Literal

KEY_BYTES = 32
_KEY = secrets.token_bytes(KEY_BYTES)
_SCOPE: Literal["run", "deployment"] = "run"
INSTANCE = secrets.token_hex(8)


def use_key(key: bytes) -> None:
    """Fingerprint under the deployment's ``key`` from now on: call it before any ``Secret`` is
    made (a Secret keeps the fingerprint it was made with)."""
    global _KEY, _SCOPE
    if len(key) != KEY_BYTES:
        raise ValueError(f"a fingerprint key is {KEY_BYTES} bytes, not {len(key)}")
    _KEY, _SCOPE = key, "deployment"


def key_scope() -> Literal["run", "deployment"]:
    """``deployment``: fingerprints compare across restarts; ``run``: within this run only."""
    return _SCOPE


def key_id() -> str:
    """A public name for the key: equal ids, comparable fingerprints; says nothing of the key."""
    return hmac.new(_KEY, b"credproxy fingerprint key id", hashlib.sha256).hexdigest()[:8]


def fingerprint(value: str | bytes) -> str:
    """First 12 hex digits of the keyed HMAC: correlates events, confirms no guess."""
    data = value.encode() if isinstance(value, str) else value
    return hmac.new(_KEY, data, hashlib.sha256).hexdigest()[:12]


class Secret:
    """Holds a credential; ``reveal()`` is the only way out and is greppable in review."""

    __slots__ = ("_value", "fingerprint")

    def __init__(self, value: str) -> None:
        self._value = value
        self.fingerprint = fingerprint(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('…{self.fingerprint}')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)
