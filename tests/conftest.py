from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.counterparts import Credproxy, IdP, ResourceServer, environment_ok


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdP]:
    """The shared oidc-provider; resources are registered by the ``upstream`` fixture."""
    environment_ok()
    yield IdP(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="session")
def upstream(idp: IdP) -> Iterator[ResourceServer]:
    """The shared verifying resource server, with a 60 s and a 5 s token audience at the IdP."""
    server = ResourceServer(idp)
    idp.add_resource(server.audience, ttl_s=60)
    idp.add_resource(server.short_audience, ttl_s=5)
    idp.start()
    server.start()
    yield server
    server.stop()
    idp.records()
    server.seen()
    idp.stop()


@pytest.fixture
def credproxy(tmp_path: Path) -> Iterator[Callable[..., Credproxy]]:
    """Start ``credproxy run`` processes; all are stopped (SIGTERM) at teardown."""
    started: list[Credproxy] = []

    def start(config_text: str, *, expect_ready: bool = True, name: str = "credproxy") -> Credproxy:
        """``expect_ready=False``: return once listening (or exited), without waiting for /readyz."""
        proc = Credproxy(tmp_path, config_text, name=name).start(expect_ready=expect_ready)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """The app: a plain HTTP client with no credential of its own."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
