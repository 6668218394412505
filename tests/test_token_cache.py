"""TokenSource logic: single-flight, refresh ahead, backoff, serving through failures.

The fetch functions here are scripted fault injectors for the cache's own logic; the same
behaviour against the real IdP is covered in test_e2e*.py.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.audit.trail import Audit
from proxy.credentials.token import CacheKey, Token
from proxy.credentials.token_cache import TokenSource
from proxy.errors import CredentialUnavailable, IssuerError
from proxy.metrics import Metrics
from proxy.secret import Secret

KEY = CacheKey("idp", "https://api", "s", bound=True)


class ScriptedFetch:
    """Counts calls; fails while ``failing`` is set; takes ``delay_s`` per call."""

    def __init__(self, lifetime_s: float = 60, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.failing = False
        self.lifetime_s = lifetime_s
        self.delay_s = delay_s

    async def __call__(self) -> Token:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.failing:
            raise IssuerError("issuers.idp: fault injected")
        return Token(Secret(f"token-{self.calls}"), "DPoP", self.lifetime_s)


@pytest.fixture
def audit(tmp_path):
    audit = Audit(str(tmp_path / "audit.jsonl"))
    yield audit
    audit.aclose()


def _source(fetch: ScriptedFetch, audit: Audit, **kwargs) -> TokenSource:
    return TokenSource(KEY, fetch, metrics=Metrics(), audit=audit, **kwargs)


async def _until(predicate, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_concurrent_cold_gets_share_one_fetch(audit):
    """100 concurrent first requests wait for one token request and all get its token."""
    fetch = ScriptedFetch(delay_s=0.1)
    source = _source(fetch, audit)
    tokens = await asyncio.gather(*(source.get() for _ in range(100)))
    assert fetch.calls == 1 and len({id(t) for t in tokens}) == 1
    await source.aclose()


async def test_refreshes_ahead_of_expiry_in_background(audit):
    """A 1 s token with 0.5 s refresh-ahead is replaced without any caller asking."""
    fetch = ScriptedFetch(lifetime_s=1.0)
    source = _source(fetch, audit, refresh_ahead_s=0.5)
    first = await source.get()
    await _until(lambda: fetch.calls >= 3)
    assert (await source.get()).value != first.value
    await source.aclose()


async def test_latest_waits_for_the_refresh_in_flight_get_does_not(audit):
    """While a refresh is in flight, get() answers the old (still valid) token at once and
    latest() the new one: a follower worker asking the leader near expiry gets the fresh one."""
    fetch = ScriptedFetch(delay_s=0.3)
    source = _source(fetch, audit)
    first = await source.get()
    source.refresh()
    assert await source.get() is first
    newer = await source.latest()
    assert newer is not first and fetch.calls == 2
    await source.aclose()


async def test_valid_token_keeps_serving_while_issuer_fails(audit):
    """Refresh failures do not disturb callers while the cached token is valid."""
    fetch = ScriptedFetch(lifetime_s=2.0)
    source = _source(fetch, audit, refresh_ahead_s=1.5, backoff_max_s=0.2)
    token = await source.get()
    fetch.failing = True
    await _until(lambda: fetch.calls >= 3)  # refresh attempts are failing, with backoff
    assert await source.get() is token
    await source.aclose()


async def test_expired_and_failing_answers_unavailable_with_retry_after_at_once(audit):
    """Once the token expired and the issuer fails, callers get CredentialUnavailable immediately."""
    fetch = ScriptedFetch(lifetime_s=0.5)
    source = _source(fetch, audit, refresh_ahead_s=0.1, backoff_max_s=30)
    await source.get()
    fetch.failing = True
    await _until(lambda: not source.ready)
    await _until(lambda: fetch.calls >= 3)
    with pytest.raises(CredentialUnavailable) as caught:
        async with asyncio.timeout(0.5):
            await source.get()
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s >= 1
    assert "fault injected" in str(caught.value)
    fetch.failing = False
    await _until(lambda: source.ready, timeout_s=40)
    await source.aclose()


async def test_backoff_grows_between_failures(audit):
    """Failed attempts are spaced by growing, bounded delays, not retried in a tight loop."""
    fetch = ScriptedFetch()
    fetch.failing = True
    source = _source(fetch, audit, backoff_max_s=0.4)
    source.start()
    await asyncio.sleep(1.5)
    # 0.25–0.5, 0.5–1 (capped 0.2–0.4) … → a handful of attempts, never dozens
    assert 3 <= fetch.calls <= 8, fetch.calls
    await source.aclose()


async def test_invalidate_fetches_one_new_token(audit):
    """After invalidate(), concurrent callers share one new token request."""
    fetch = ScriptedFetch(delay_s=0.05)
    source = _source(fetch, audit)
    old = await source.get()
    source.invalidate(old)
    tokens = await asyncio.gather(*(source.get() for _ in range(20)))
    assert fetch.calls == 2 and all(t is tokens[0] and t is not old for t in tokens)
    await source.aclose()


async def test_a_rejection_of_an_already_replaced_token_does_not_refresh_again(audit):
    """Concurrent 401 invalid_token answers for one token cost one refresh, including one that
    arrives after the token was already replaced; a rejection of the current token refreshes."""
    fetch = ScriptedFetch(delay_s=0.01)
    source = _source(fetch, audit)
    rejected = await source.get()

    async def retried(token: Token) -> Token:  # what the handler does on 401 invalid_token
        source.invalidate(token)
        return await source.get()

    first, second = await asyncio.gather(retried(rejected), retried(rejected))
    late = await retried(rejected)  # the same old token, rejected once more
    assert first is second is late and first is not rejected
    assert fetch.calls == 2
    assert await retried(first) is not first and fetch.calls == 3
    await source.aclose()


async def test_closed_source_refuses_use(audit):
    """aclose() ends the background task; a later start() fails with a clear message."""
    source = _source(ScriptedFetch(), audit)
    await source.get()
    await source.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await source.get()


def test_secret_repr_never_shows_the_value():
    """A Secret in a repr, f-string or log shows only its fingerprint."""
    secret = Secret("super-secret-token-value")
    for text in (repr(secret), str(secret), f"{secret}", f"{[secret]}"):
        assert "super-secret" not in text and secret.fingerprint in text


async def test_an_unexpected_error_in_a_fetch_backs_off_instead_of_hanging(audit, caplog):
    """A fetch raising something other than CredentialUnavailable (a non-ASCII value: the token's
    ``ath`` needs ASCII) answers callers 503-style with Retry-After, is logged with its traceback,
    and a later good fetch serves without restart."""
    values = ["clé", "token-ok"]

    async def fetch() -> Token:
        return Token(Secret(values[0]), "DPoP", 60)

    source = TokenSource(KEY, fetch, metrics=Metrics(), audit=audit, backoff_max_s=0.2)
    with pytest.raises(CredentialUnavailable) as caught:
        async with asyncio.timeout(5):  # a hang guard only: today's refresher dies, get() waits
            await source.get()
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s >= 1
    assert "UnicodeEncodeError" in str(caught.value)
    assert "Traceback" in caplog.text and "clé" not in caplog.text
    values.pop(0)
    await _until(lambda: source.ready)
    assert (await source.get()).value.reveal() == "token-ok"
    await source.aclose()


async def test_a_fetch_that_never_ends_bounds_the_wait(audit):
    """A token request that hangs makes get() answer CredentialUnavailable after wait_max_s."""
    never = asyncio.Event()

    async def fetch() -> Token:
        await never.wait()
        raise AssertionError("unreachable")

    source = TokenSource(KEY, fetch, metrics=Metrics(), audit=audit, wait_max_s=0.2)
    with pytest.raises(CredentialUnavailable, match="still pending"):
        async with asyncio.timeout(5):  # a hang guard only
            await source.get()
    await source.aclose()
