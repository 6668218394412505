from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import settings

from tests.counterparts import (
    LEDGER,
    Credproxy,
    IdP,
    LeakLedger,
    ResourceServer,
    environment_ok,
    idp_and_upstream,
)
from tests.keycloak import Keycloak
from tests.openbao import OpenBao
from tests.spire import (
    CREDPROXY_ID,
    JWT_ISSUER,
    JWT_TTL_S,
    SPIFFE_CLIENT,
    X509_TTL_S,
    Spire,
    SVIDUpstream,
)
from tests.tls import TestCA

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


# -- Keycloak: started in the background as soon as the session knows it needs it ---------------

_keycloak: list[Keycloak] = []


def _needs_keycloak(item: pytest.Item) -> bool:
    """Whether a test uses the session's Keycloak: it names the fixture, or it is the Keycloak
    case of a fixture parametrised over IdPs (``oauth_idp``, ``mtls_idp``, …: those ask for
    ``keycloak`` only when they run)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "keycloak" in callspec.params.values():
        return True
    return "keycloak" in getattr(item, "fixturenames", ())


def _start_keycloak(tmp_path_factory: pytest.TempPathFactory, *, wait: bool) -> Keycloak:
    if not _keycloak:
        workdir = tmp_path_factory.mktemp("keycloak")
        server = Keycloak(workdir, tls=TestCA(workdir))
        server.start(wait=wait)
        _keycloak.append(server)
    return _keycloak[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With ``-n`` (pytest-xdist, ``--dist loadgroup``): a file's tests run in one worker (its
    counterparts start once), and every Keycloak test in the same one (one Keycloak)."""
    for item in items:
        group = "keycloak" if _needs_keycloak(item) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Keycloak takes ~15 s to start (more on a busy machine): start it while the tests before
    the first that needs it run. A worker of ``-n`` cannot know yet whether it will get the
    Keycloak tests: there it starts when first needed."""
    if os.environ.get("PYTEST_XDIST_WORKER") or session.config.option.collectonly:
        return
    if any(_needs_keycloak(item) for item in session.items):
        _start_keycloak(session.config._tmp_path_factory, wait=False)  # type: ignore[attr-defined]


def pytest_configure_node(node: Any) -> None:
    """xdist's controller: every worker saves its leak ledger in one directory."""
    node.workerinput["ledger_dir"] = node.config.ledger_dir


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller, or a run without -n
        config.ledger_dir = tempfile.mkdtemp(prefix="credproxy-ledgers-")  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session) -> None:
    for server in _keycloak:
        server.stop()
        if server.started_s:  # it was waited for
            print(f"\nkeycloak: ready {server.started_s:.1f} s after it was started")
    config = session.config
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # a worker: its ledger, for the controller's scan
        LEDGER.save(Path(workerinput["ledger_dir"]) / f"{workerinput['workerid']}.json")
        return
    ledgers = sorted(Path(config.ledger_dir).glob("*.json"))  # type: ignore[attr-defined]
    if ledgers:  # -n: the workers' outputs scanned for every worker's secrets, as one session
        merged = LeakLedger.merged(ledgers)
        hits = merged.hits()
        print(
            f"\nleak scan across {len(ledgers)} workers: {len(merged.secrets)} credential values "
            f"× {len(merged.files)} files + {len(merged.texts)} outputs: {len(hits)} hits"
        )
        if hits:
            print("\n".join(hits))
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(config.ledger_dir, ignore_errors=True)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def keycloak(tmp_path_factory: pytest.TempPathFactory) -> Keycloak:
    """The session's Keycloak (realm: examples/compose/realm.json), https beside http."""
    server = _start_keycloak(tmp_path_factory, wait=True)
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def keycloak_upstream(keycloak: Keycloak) -> Iterator[ResourceServer]:
    """The verifying resource server, trusting Keycloak: the realm's payments and reports
    audiences, and payments-api (the client id token exchange names it by)."""
    server = ResourceServer(
        keycloak,
        audiences=(keycloak.PAYMENTS, keycloak.REPORTS),
        client_id=keycloak.API_CLIENT_ID,
    )
    server.start()
    yield server
    server.stop()
    server.seen()


@pytest.fixture(params=["oidc-provider", "keycloak"])
def oauth_idp(request: pytest.FixtureRequest) -> IdP | Keycloak:
    """Each real IdP in turn: an OAuth test taking this runs against oidc-provider and Keycloak."""
    return request.getfixturevalue("idp" if request.param == "oidc-provider" else "keycloak")  # type: ignore[no-any-return]


@pytest.fixture
def oauth_upstream(oauth_idp: IdP | Keycloak, request: pytest.FixtureRequest) -> ResourceServer:
    """The verifying resource server trusting ``oauth_idp``."""
    name = "upstream" if oauth_idp.name == "oidc-provider" else "keycloak_upstream"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


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


# SPIFFE: a real SPIRE server and agent (tests/spire.py), started once for the session.
@pytest.fixture(scope="session")
def spire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spire]:
    """One SPIRE server and agent for the session; credproxy's entry: uid 0 (the test suite)."""
    server = Spire(tmp_path_factory.mktemp("spire")).start()
    try:
        server.register(CREDPROXY_ID, uid=0, x509_ttl_s=X509_TTL_S, jwt_ttl_s=JWT_TTL_S)
        server.wait_for_svid(CREDPROXY_ID)
        print(f"SPIRE server and agent ready in {time.monotonic() - server.began:.1f}s")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def svid_upstream(spire: Spire) -> Iterator[SVIDUpstream]:
    upstream = SVIDUpstream(spire)
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def spiffe_idp(spire: Spire, tmp_path_factory) -> Iterator[tuple[IdP, ResourceServer]]:
    """The test IdP trusting SPIRE's published bundle: token exchange accepts a JWT-SVID subject
    (issuer SPIRE's jwt_issuer, audience the IdP), and client ``spiffe-orders`` authenticates
    with a JWT-SVID for credproxy's SPIFFE ID; a resource server verifying the IdP's tokens."""
    environment_ok()
    idp = IdP(tmp_path_factory.mktemp("spiffe-idp"))
    # the JWT authorities of SPIRE's bundle, as a JWKS a JOSE library takes ("use": "jwt-svid" is
    # SPIFFE's; jose skips keys whose "use" is not "sig")
    jwt_keys = [
        {**{k: v for k, v in key.items() if k != "use"}, "use": "sig"}
        for key in spire.jwks()["keys"]
        if key.get("use") == "jwt-svid"
    ]
    idp.subject_issuer, idp.subject_jwks = JWT_ISSUER, jwt_keys
    idp.spiffe_clients, idp.spiffe_jwks = [(SPIFFE_CLIENT, CREDPROXY_ID)], jwt_keys
    server = ResourceServer(idp)
    idp.add_resource(server.audience, ttl_s=60)
    idp.start()
    server.start()
    yield idp, server
    idp.records()
    server.seen()
    server.stop()
    idp.stop()


@pytest.fixture(scope="session")
def keycloak_spire(keycloak: Keycloak, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spire]:
    """A SPIRE server and agent whose bundle endpoint is the one the realm's SPIFFE identity
    provider reads (https, a certificate from Keycloak's trust store); credproxy's entry as for
    ``spire``."""
    cert, key = keycloak.tls.issue("127.0.0.1", server=True, stem="spire-bundle-endpoint")
    endpoint = (keycloak.spiffe_bundle_port, cert, key)
    server = Spire(tmp_path_factory.mktemp("keycloak-spire"), bundle_endpoint=endpoint).start()
    try:
        server.register(CREDPROXY_ID, uid=0, x509_ttl_s=X509_TTL_S, jwt_ttl_s=JWT_TTL_S)
        server.wait_for_svid(CREDPROXY_ID)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One configured OpenBao dev server (tests/openbao.py) for the session."""
    server = OpenBao(tmp_path_factory.mktemp("openbao")).start()
    try:
        server.configure()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> Iterator[Any]:
    """moto's server (AWS STS and S3), one per test module that uses it."""
    from tests.aws_counterparts import Moto

    server = Moto(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sts_relay(moto) -> Iterator[Any]:
    """A relay between credproxy and moto's STS that keeps what crossed it."""
    from tests.aws_counterparts import Relay

    relay = Relay(moto.port)
    yield relay
    relay.close()
