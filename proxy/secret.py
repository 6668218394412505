"""A credential value that cannot leak by accident: no repr, no str, only a fingerprint."""

from __future__ import annotations

import hashlib


def fingerprint(value: str | bytes) -> str:
    """First 12 hex digits of SHA-256: enough to correlate audit events, useless to an attacker."""
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:12]


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
