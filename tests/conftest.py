from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import settings

from tests.counterparts import Credproxy, IdP, ResourceServer, environment_ok, idp_and_upstream

# CI replays the same generated examples every run (a red CI is a regression, not a new draw);
# local runs explore new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def counterparts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IdP, ResourceServer]]:
    """The shared oidc-provider and verifying resource server (60 s and 5 s token audiences)."""
    environment_ok()
    with idp_and_upstream(tmp_path_factory.mktemp("idp")) as pair:
        yield pair


@pytest.fixture(scope="session")
def idp(counterparts: tuple[IdP, ResourceServer]) -> IdP:
    return counterparts[0]


@pytest.fixture(scope="session")
def upstream(counterparts: tuple[IdP, ResourceServer]) -> ResourceServer:
    return counterparts[1]


@pytest.fixture
def credproxy(tmp_path: Path) -> Iterator[Callable[..., Credproxy]]:
    """Start ``credproxy run`` processes; all are stopped (SIGTERM) at teardown."""
    started: list[Credproxy] = []

    def start(
        config_text: str,
        *,
        expect_ready: bool = True,
        name: str = "credproxy",
        args: tuple[str, ...] = (),
        wrap: tuple[str, ...] = (),
    ) -> Credproxy:
        """``expect_ready=False``: return once listening (or exited), without waiting for /readyz."""
        proc = Credproxy(tmp_path, config_text, name=name, args=args, wrap=wrap)
        started.append(proc)  # first: a start that fails still gets its process stopped
        return proc.start(expect_ready=expect_ready)

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """The app: a plain HTTP client with no credential of its own."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
