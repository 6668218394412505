"""The token cache: one ``TokenSource`` per ``CacheKey`` (issuer, audience, scope, binding, kind).

A source fetches its first token when first asked, then refreshes ahead of expiry in the
background. However many requests wait, one token request is in flight (single-flight); failures
back off with jitter; a token that is still valid keeps serving while the issuer is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable

from ..audit.trail import Audit
from ..errors import CredentialUnavailable, IssuerError
from ..log import credentials_log
from ..metrics import Metrics
from ..tasks import spawn
from .token import CacheKey, Revocation, Token

_BACKOFF_BASE_S = 0.5
_RETRY_AFTER_MAX_S = 300.0  # an issuer asking for longer is retried after 5 minutes anyway
_WAIT_MAX_S = 60.0


class TokenSource:
    def __init__(
        self,
        key: CacheKey,
        fetch: Callable[[], Awaitable[Token]],
        *,
        revoke: Callable[[Token], Awaitable[str]] | None = None,
        metrics: Metrics,
        audit: Audit,
        refresh_ahead_s: float | None = None,
        backoff_max_s: float = 30.0,
        wait_max_s: float = _WAIT_MAX_S,
        owns_tokens: bool = True,
        revoke_min_interval_s: float = 30.0,
        rotate_wait_s: float = 10.0,
    ) -> None:
        """``wait_max_s`` bounds how long ``get()`` waits for a token request in flight: longer
        than the issuer's own timeouts, so it only ends waits on a request that hangs."""
        self.key = key
        self._revoke_min_interval_s = revoke_min_interval_s
        self._rotate_wait_s = rotate_wait_s  # beyond, a revocation without replacement defers
        self._revoking: asyncio.Task[Revocation | None] | None = None
        self._last_revocation: tuple[float, Revocation] | None = None
        self._pending: list[tuple[Token, str]] = []  # (token, reason) awaiting revocation
        self._wait_max_s = wait_max_s
        self._owns_tokens = owns_tokens  # False: a worker's copy of the leader's tokens
        self._fetch = fetch
        self._revoke = revoke
        self._metrics = metrics
        self._audit = audit
        self._refresh_ahead_s = refresh_ahead_s
        self._backoff_max_s = backoff_max_s
        self._token: Token | None = None
        self._attempt: asyncio.Future[None] | None = None
        self._backoff_until = 0.0
        self._last_failure = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.refreshes = 0
        self._last_fingerprint = ""
        self._audited_expiry = 0.0  # what the last audit event said the credential expires at
        self.routes: tuple[str, ...] = ()  # the routes it serves, for audit events
        self._kind = {"kind": key.kind} if key.kind != "token" else {}  # in audit events

    @property
    def ready(self) -> bool:
        token = self._token
        return token is not None and time.monotonic() < token.usable_until_mono

    @property
    def token(self) -> Token | None:
        """The cached token, for the inventory (never its value)."""
        return self._token

    def start(self) -> None:
        if self._closed:
            raise RuntimeError(f"token source {self.key} is closed")
        if self._task is None:
            self._begin_attempt()
            self._task = spawn(self._run(), name=f"token-source:{self.key.issuer}:{self.key.label}")

    async def get(self) -> Token:
        token = self._token
        if token is not None and time.monotonic() < token.usable_until_mono:
            return token
        self.start()
        if self._attempt is None:
            wait_s = self._backoff_until - time.monotonic()
            if wait_s > 0:
                raise self._unavailable(wait_s)
            self._begin_attempt()
        assert self._attempt is not None
        try:
            async with asyncio.timeout(self._wait_max_s):
                await asyncio.shield(self._attempt)
        except TimeoutError:
            raise self._unavailable(
                1.0, f"token request still pending after {self._wait_max_s:g}s"
            ) from None
        token = self._token
        if token is not None and time.monotonic() < token.usable_until_mono:
            return token
        raise self._unavailable(max(self._backoff_until - time.monotonic(), 1.0))

    async def latest(self) -> Token:
        """``get()``, after the refresh in flight if one is: what the leader worker gives a
        follower, which asks when its copy nears expiry, the very moment the leader refreshes;
        the old token would expire in the follower's hands before its next ask."""
        attempt = self._attempt
        if attempt is not None and self._token is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._wait_max_s):
                    await asyncio.shield(attempt)
        return await self.get()

    def refresh(self) -> None:
        """Fetch a new credential now, in the background (a session revoked on demand)."""
        if self._task is not None and not self._closed:
            self._begin_attempt()

    def invalidate(self, token: Token) -> None:
        """The upstream rejected ``token`` (401 invalid_token): fetch a new one now."""
        if self._token is token:
            self._token = None
            if self._attempt is None and time.monotonic() >= self._backoff_until:
                self._begin_attempt()

    async def revoke(self, *, reason: str, rotate: bool) -> Revocation | None:
        """Revoke the cached token at its issuer (None: nothing cached). Failures are logged,
        counted and audited, never raised.

        ``rotate`` (on demand): a replacement is issued first and the old token keeps serving
        until it is, so an issuer outage never leaves the route without a credential; without
        one the revocation is ``deferred`` and done after the next successful refresh.
        Concurrent calls join the one in flight; within ``revoke_min_interval_s`` of the last
        one the answer is that one's, with no round-trip. Without ``rotate`` (shutdown) the token
        is dropped and revoked at once."""
        if not rotate:
            return await self._revoke_and_drop(reason)
        if self._revoking is not None:
            joined = await asyncio.shield(self._revoking)
            return dataclasses.replace(joined, answered="joined") if joined else None
        if self._last_revocation is not None:
            at, last = self._last_revocation
            if time.monotonic() - at < self._revoke_min_interval_s:
                return dataclasses.replace(last, answered="recent")
        task = spawn(self._rotate_then_revoke(reason), name=f"revoke:{self.key.issuer}")
        self._revoking = task
        return await asyncio.shield(task)

    async def _rotate_then_revoke(self, reason: str) -> Revocation | None:
        old = self._token
        try:
            if old is None or not self._owns_tokens:
                return None
            self._begin_attempt()  # a refresh now, or join the one under way
            attempt = self._attempt
            if attempt is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._rotate_wait_s):
                        await asyncio.shield(attempt)
            if self._token is old or self._token is None:
                self._defer(old, reason)
                result = Revocation("deferred", old.value.fingerprint)
            else:
                outcome = await self._revoke_token(old, reason, retry=True)
                result = Revocation(outcome, old.value.fingerprint)
            self._last_revocation = (time.monotonic(), result)
            return result
        finally:
            self._revoking = None

    def _defer(self, token: Token, reason: str) -> None:
        credentials_log.warning(
            "revocation of %s deferred: no replacement could be issued (%s); it keeps serving "
            "and is revoked after the next successful refresh",
            token.value.fingerprint,
            self._last_failure or "token request pending",
        )
        self._pending.append((token, reason))
        self._record_revocation(token, "deferred", reason)

    async def _revoke_pending(self) -> None:
        """After a successful refresh: revoke what earlier revocations had to defer."""
        pending, self._pending = self._pending, []
        for token, reason in pending:
            if time.monotonic() < token.usable_until_mono:  # an expired token needs nothing
                await self._revoke_token(token, reason, retry=True, deferred=True)
        self._metrics.revocations_pending.labels(self.key.issuer, self.key.label).set(
            len(self._pending)
        )

    async def _revoke_and_drop(self, reason: str) -> Revocation | None:
        token, self._token = self._token, None
        if token is None or not self._owns_tokens:
            return None
        for earlier, earlier_reason in self._pending:  # deferred ones too, while still valid
            if time.monotonic() < earlier.usable_until_mono:
                await self._revoke_token(earlier, f"{earlier_reason},{reason}", retry=False)
        self._pending = []
        outcome = await self._revoke_token(token, reason, retry=False)
        self._metrics.credential_expiry.labels(self.key.issuer, self.key.label).set(0)
        return Revocation(outcome, token.value.fingerprint)

    async def _revoke_token(
        self, token: Token, reason: str, *, retry: bool, deferred: bool = False
    ) -> str:
        """One RFC 7009 call; with ``retry``, a failure is tried again after the next refresh."""
        try:
            outcome = await self._revoke(token) if self._revoke else "unsupported"
        except CredentialUnavailable as exc:
            outcome = "failed"
            credentials_log.warning("revocation of %s failed: %s", token.value.fingerprint, exc)
            if retry:
                self._pending.append((token, reason))
        self._record_revocation(token, outcome, reason, deferred=deferred)
        return outcome

    def _record_revocation(
        self, token: Token, outcome: str, reason: str, *, deferred: bool = False
    ) -> None:
        self._metrics.credential_revoked.labels(self.key.issuer, outcome).inc()
        self._metrics.revocations_pending.labels(self.key.issuer, self.key.label).set(
            len(self._pending)
        )
        self._audit.emit(
            "credential.revoked",
            issuer=self.key.issuer,
            **self._kind,
            routes=self.routes,
            audience=self.key.audience,
            scope=self.key.scope,
            fingerprint=token.value.fingerprint,
            outcome=outcome,
            reason=reason,
            **({"serial": token.serial} if token.serial else {}),
            **({"deferred": True} if deferred else {}),
        )

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._attempt is not None and not self._attempt.done():
            self._attempt.set_result(None)
        self._token = None

    def _begin_attempt(self) -> None:
        if self._attempt is None:
            self._attempt = asyncio.get_running_loop().create_future()
            self._wake.set()

    def _unavailable(self, retry_after_s: float, why: str = "") -> CredentialUnavailable:
        return CredentialUnavailable(
            f"no valid credential for issuer {self.key.issuer} ({self.key.label}): "
            f"{why or self._last_failure or 'first token request pending'}",
            retry_after_s=max(1.0, round(retry_after_s)),
        )

    async def _run(self) -> None:
        failures = 0
        while True:
            self._begin_attempt()
            self._wake.clear()
            started = time.monotonic()
            try:
                token = await self._fetch()
                self._accept(token, time.monotonic() - started)
            except Exception as exc:  # never a dead refresher (CancelledError ends it: aclose)
                failures += 1
                await self._back_off(failures, self._as_unavailable(exc))
                continue
            failures = 0
            self._finish_attempt()
            if self._pending:
                spawn(self._revoke_pending(), name=f"revoke-deferred:{self.key.issuer}")
            await self._sleep_until_refresh(token)

    def _as_unavailable(self, exc: Exception) -> CredentialUnavailable:
        """An issuer's expected failure as is; anything else (a bug, a file it could not
        handle) logged with its traceback and then treated the same: backoff and retry."""
        if isinstance(exc, CredentialUnavailable):
            return exc
        credentials_log.error(
            "token request for issuer %s (%s) failed unexpectedly",
            self.key.issuer,
            self.key.label,
            exc_info=exc,
        )
        return IssuerError(
            f"issuers.{self.key.issuer}: unexpected {type(exc).__name__} (traceback in the log)"
        )

    async def _back_off(self, failures: int, exc: CredentialUnavailable) -> None:
        delay_s = self._backoff_s(failures)
        asked_s = getattr(exc, "asked_delay_s", None)
        if asked_s is not None:  # the issuer's Retry-After, within reason
            delay_s = max(delay_s, min(asked_s, _RETRY_AFTER_MAX_S))
        self._backoff_until = time.monotonic() + delay_s
        self._last_failure = str(exc)
        self._metrics.credential_issued.labels(self.key.issuer, "failure").inc()
        self._metrics.credential_backoff.labels(self.key.issuer, self.key.label).set(delay_s)
        credentials_log.warning(
            "token request failed (attempt %d, next in %.1fs): %s", failures, delay_s, exc
        )
        self._finish_attempt()
        await asyncio.sleep(delay_s)

    def _accept(self, token: Token, duration_s: float) -> None:
        self._backoff_until = 0.0
        self._last_failure = ""
        self._token = token
        self.refreshes += 1
        self._record(token, duration_s)

    def _finish_attempt(self) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None and not attempt.done():
            attempt.set_result(None)

    async def _sleep_until_refresh(self, token: Token) -> None:
        if self._refresh_ahead_s is None:
            ahead_s = min(60.0, 0.2 * token.lifetime_s)
        else:  # as configured, short of a refresh loop tighter than a second
            ahead_s = min(
                self._refresh_ahead_s, max(token.lifetime_s - 1.0, 0.5 * token.lifetime_s)
            )
        delay_s = token.obtained_mono + token.lifetime_s - ahead_s - time.monotonic()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=max(delay_s, 0.0))
        except TimeoutError:
            pass

    def _backoff_s(self, failures: int) -> float:
        ceiling = min(self._backoff_max_s, _BACKOFF_BASE_S * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto

    def _renewed(self, token: Token) -> None:
        """The same credential again. A legacy secret re-read unchanged: nothing new to audit.
        A token the issuer handed back with a later expiry (some IdPs return the cached token):
        ``credential.renewed`` with the new expiry (once per refresh, as a new token would be),
        so the uses until then are not read as uses after the recorded expiry."""
        if token.legacy or token.expires_at <= self._audited_expiry:
            return
        self._audited_expiry = token.expires_at
        self._audit.emit(
            "credential.renewed",
            issuer=self.key.issuer,
            **self._kind,
            routes=self.routes,
            audience=self.key.audience,
            fingerprint=token.value.fingerprint,
            expires_at=round(token.expires_at, 3),
            lifetime_s=token.lifetime_s,
        )

    def _record(self, token: Token, duration_s: float) -> None:
        labels = (self.key.issuer, self.key.label)
        self._metrics.credential_issued.labels(self.key.issuer, "success").inc()
        self._metrics.credential_refresh_duration.labels(self.key.issuer).observe(duration_s)
        self._metrics.credential_expiry.labels(*labels).set(token.expires_at)
        self._metrics.credential_backoff.labels(*labels).set(0)
        if token.value.fingerprint == self._last_fingerprint:
            self._renewed(token)
            return
        self._last_fingerprint = token.value.fingerprint
        self._audited_expiry = token.expires_at
        # A legacy secret (a file re-read every lifetime_s) has no expiry of its own: it lives
        # until its owner rotates it, and is audited so, with how often the file is re-read.
        ends = (
            {"legacy": True, "expires_at": None, "lifetime_s": None, "reread_s": token.lifetime_s}
            if token.legacy
            else {"expires_at": round(token.expires_at, 3), "lifetime_s": token.lifetime_s}
        )
        self._audit.emit(
            "credential.issued" if self.refreshes == 1 else "credential.refreshed",
            issuer=self.key.issuer,
            **self._kind,
            routes=self.routes,
            audience=self.key.audience,
            scope=self.key.scope,
            binding=self.key.binding,
            fingerprint=token.value.fingerprint,
            **ends,
            **({"version": token.secret_version} if token.secret_version is not None else {}),
            **({"serial": token.serial} if token.serial else {}),
        )
        credentials_log.info(
            "credential %s for issuer %s (%s), lifetime %.0fs",
            token.value.fingerprint,
            self.key.issuer,
            self.key.label,
            token.lifetime_s,
        )
