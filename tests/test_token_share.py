"""credentials/token_share.py: followers get the leader's tokens over a Unix socket, in process.

The leader's sources are real ``TokenSource`` objects whose fetch is a counting fault injector,
so what reaches "the IdP" is counted; the socket lives in the test's tmp directory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from proxy.audit.trail import Audit
from proxy.credentials.minting import MintingSource
from proxy.credentials.token import CacheKey, Token
from proxy.credentials.token_cache import TokenSource
from proxy.credentials.token_share import LeaderClient, leader_app
from proxy.errors import IssuerError
from proxy.log import credentials_log
from proxy.metrics import Metrics
from proxy.secret import Secret
from proxy.tasks import spawn

KEY = CacheKey("idp", "https://api", "read", bound=True)
AWS = CacheKey("sts", None, None, bound=False)


class CountingFetch:
    """The IdP as the leader sees it: counts token requests, fails while ``failing``."""

    def __init__(self, make: Callable[[int], Token]) -> None:
        self.calls = 0
        self.failing = False
        self._make = make

    async def __call__(self) -> Token:
        self.calls += 1
        if self.failing:
            raise IssuerError("issuers.idp: fault injected")
        return self._make(self.calls)


@pytest.fixture
def audit(tmp_path: Path):
    audit = Audit(str(tmp_path / "audit.jsonl"))
    yield audit
    audit.aclose()


@pytest.fixture
async def leader(
    tmp_path: Path,
) -> AsyncIterator[Callable[[dict[CacheKey, object]], Awaitable[LeaderClient]]]:
    """Serve ``leader_app`` for the given sources on a socket in tmp; yield a follower's client."""
    runners: list[web.AppRunner] = []
    clients: list[LeaderClient] = []

    async def start(sources: dict[CacheKey, object]) -> LeaderClient:
        runner = web.AppRunner(leader_app(lambda: sources), access_log=None)
        await runner.setup()
        runners.append(runner)
        path = str(tmp_path / "leader.sock")
        await web.UnixSite(runner, path).start()
        clients.append(LeaderClient(path))
        return clients[-1]

    yield start
    for client in clients:
        await client.aclose()
    for runner in runners:
        await runner.cleanup()


def _source(key: CacheKey, fetch: CountingFetch, audit: Audit, **kwargs) -> TokenSource:
    return TokenSource(key, fetch, metrics=Metrics(), audit=audit, **kwargs)


async def test_followers_get_the_leaders_token_and_the_idp_sees_one_request(leader, audit):
    """However many follower fetches, the leader's source asks the IdP once; followers get the
    same value, type and key id, with a lifetime no longer than what the leader has left."""
    fetch = CountingFetch(lambda n: Token(Secret(f"tok-{n}"), "DPoP", 60.0, key_id="kid-1"))
    source = _source(KEY, fetch, audit)
    client = await leader({KEY: source})
    tokens = await asyncio.gather(*(client.fetch(KEY) for _ in range(10)))
    assert fetch.calls == 1
    assert {t.value.reveal() for t in tokens} == {"tok-1"}
    assert all(t.token_type == "DPoP" and t.key_id == "kid-1" for t in tokens)
    assert all(0 < t.lifetime_s <= 60.0 and t.signing_secret is None for t in tokens)
    await source.aclose()


async def test_a_signing_secret_and_the_legacy_mark_cross_to_the_follower(leader, audit):
    """An AWS-style token's signing secret and a legacy token's mark reach the follower."""
    fetch = CountingFetch(
        lambda n: Token(Secret("session"), "AWS4", 900.0, signing_secret=Secret("sk"), legacy=True)
    )
    source = _source(AWS, fetch, audit)
    client = await leader({AWS: source})
    token = await client.fetch(AWS)
    assert token.signing_secret is not None and token.signing_secret.reveal() == "sk"
    assert token.legacy and token.value.reveal() == "session"
    await source.aclose()


async def test_a_credential_the_leader_does_not_fetch_is_an_issuer_error(leader, audit):
    """A key the leader has no source for, or whose source mints per request, is refused
    (IssuerError), never answered with some other credential."""
    minting = MintingSource(AWS, key_id="kid", audit=audit)
    client = await leader({AWS: minting})
    for key in (KEY, AWS):
        with pytest.raises(IssuerError, match="has no token"):
            await client.fetch(key)


async def test_a_leader_without_a_token_is_an_issuer_error_with_its_reason(leader, audit):
    """When the leader's own source cannot get a token, the follower gets an IssuerError
    carrying the leader's reason (it then backs off like any failing issuer)."""
    fetch = CountingFetch(lambda n: Token(Secret("never"), "DPoP", 60.0))
    fetch.failing = True
    source = _source(KEY, fetch, audit, backoff_max_s=60.0)
    client = await leader({KEY: source})
    with pytest.raises(IssuerError, match="fault injected"):
        await client.fetch(KEY)
    await source.aclose()


async def test_a_leader_that_is_not_there_is_an_issuer_error(tmp_path):
    """No leader on the socket within ``connect_wait_s``: IssuerError saying it did not
    answer, not a crash."""
    client = LeaderClient(str(tmp_path / "nobody.sock"), connect_wait_s=0.2)
    try:
        with pytest.raises(IssuerError, match="did not answer"):
            await client.fetch(KEY)
    finally:
        await client.aclose()


async def test_a_follower_asking_before_the_leader_listens_gets_the_token(tmp_path, audit):
    """Workers start together: a follower's first ask may find no leader socket yet. It waits
    for the leader instead of failing (a failure would back off, and requests meanwhile get
    503), and gets the token once the leader listens."""
    path = str(tmp_path / "late-leader.sock")
    refused = asyncio.Event()

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "not listening" in record.getMessage():
                refused.set()

    handler, level = Waiting(), credentials_log.level
    credentials_log.addHandler(handler)
    credentials_log.setLevel(logging.INFO)
    fetch = CountingFetch(lambda n: Token(Secret(f"tok-{n}"), "Bearer", 60.0))
    source = _source(KEY, fetch, audit)
    client = LeaderClient(path)
    runner = web.AppRunner(leader_app(lambda: {KEY: source}), access_log=None)
    try:
        asking = spawn(client.fetch(KEY), name="follower-fetch")
        await asyncio.wait_for(refused.wait(), 10)  # the first connect found no leader
        assert not asking.done()
        await runner.setup()
        await web.UnixSite(runner, path).start()
        token = await asyncio.wait_for(asking, 10)
        assert token.value.reveal() == "tok-1" and fetch.calls == 1
    finally:
        credentials_log.removeHandler(handler)
        credentials_log.setLevel(level)
        await client.aclose()
        await runner.cleanup()
        await source.aclose()
