"""A credential value that cannot leak by accident: no repr, no str, only a fingerprint.

A fingerprint is HMAC-SHA256 under a key drawn at random when the process starts, never stored
or shown: whoever holds the audit log cannot confirm a guessed secret by hashing it, as they
could with a plain SHA-256. The key is drawn before ``--workers`` forks, so every worker of one
run fingerprints alike and the audit events of a run correlate. Across restarts fingerprints
differ: every audit event carries the run's ``INSTANCE`` id, the public name of its key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_KEY = secrets.token_bytes(32)
INSTANCE = secrets.token_hex(8)


def fingerprint(value: str | bytes) -> str:
    """First 12 hex digits of the keyed HMAC: correlates events of a run, confirms no guess."""
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
