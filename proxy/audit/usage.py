"""Credential use: counted per credential for the inventory, and audited as ``credential.used``
— one event per request (``audit.used: request``), or one per (route, credential, caller,
method) and interval (``interval``, the default), which keeps the trail small under load."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ..tasks import spawn
from .trail import Audit


class Caller(Protocol):
    """What a use records of its caller (``access.callers.Caller``)."""

    def attributes(self) -> dict[str, object]: ...

    def known(self) -> tuple[tuple[str, object], ...]: ...


@dataclass(slots=True)
class Tally:
    count: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0


class Usage:
    def __init__(self, audit: Audit, *, mode: str, interval_s: float) -> None:
        self._audit = audit
        self._mode = mode
        self._interval_s = interval_s
        self.totals: dict[tuple[str, str], Tally] = {}  # (issuer, credential label) → uses
        # the caller's attributes as a tuple (Caller.known): one entry per distinct caller
        self._pending: dict[tuple[str, str, str, tuple[tuple[str, object], ...], str], Tally] = {}
        self._task: asyncio.Task[None] | None = None

    def record(
        self,
        *,
        route: str,
        issuer: str,
        label: str,
        fingerprint: str,
        caller: Caller,
        method: str,
        path: str,
    ) -> None:
        now = time.time()
        total = self.totals.get((issuer, label))
        if total is None:
            total = self.totals[issuer, label] = Tally(first_ts=now)
        total.count += 1
        total.last_ts = now
        if self._mode == "off":
            return
        if self._mode == "request":
            self._audit.emit(
                "credential.used", route=route, issuer=issuer, fingerprint=fingerprint,
                caller=caller.attributes(), method=method, path=path[:256], count=1,
            )  # fmt: skip
            return
        key = (route, issuer, fingerprint, caller.known(), method)
        tally = self._pending.get(key)
        if tally is None:
            tally = self._pending[key] = Tally(first_ts=now)
            if self._task is None:
                self._task = spawn(self._flush_every(), name="usage-flush")
        tally.count += 1
        tally.last_ts = now

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.flush()

    def flush(self) -> None:
        """Audit the uses counted since the last flush (also at shutdown, before revocation)."""
        pending, self._pending = self._pending, {}
        for (route, issuer, fingerprint, caller, method), tally in pending.items():
            self._audit.emit(
                "credential.used", route=route, issuer=issuer, fingerprint=fingerprint,
                caller=dict(caller), method=method, count=tally.count,
                first_ts=round(tally.first_ts, 3), last_ts=round(tally.last_ts, 3),
            )  # fmt: skip

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.flush()

    def snapshot(self, issuer: str, label: str) -> dict[str, Any]:
        tally = self.totals.get((issuer, label))
        if tally is None:
            return {"use_count": 0, "last_use": None}
        return {"use_count": tally.count, "last_use": round(tally.last_ts, 3)}
