"""lifecycle/assembly.py: one parsed config into a runtime, and a reload that carries over what
did not change (DPoP key, issuers, token sources with their tokens) and replaces what did."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.audit.trail import Audit
from proxy.config.loader import parse
from proxy.credentials.minting import MintingSource
from proxy.credentials.token_cache import TokenSource
from proxy.inbound.runtime import Runtime
from proxy.lifecycle.assembly import build
from proxy.metrics import Metrics
from tests.inprocess import UID


def _config(tmp_path: Path, *, orders_secret: str = "orders", dpop_alg: str = "ES256") -> str:
    for name in ("orders", "orders-2", "billing"):
        secret = tmp_path / name
        secret.write_text(f"{name}-secret-value")
        secret.chmod(0o600)
    return f"""
listen: 127.0.0.1:0
identity: {{dpop_alg: {dpop_alg}}}
issuers:
  orders: {{type: static, secret_file: {tmp_path / orders_secret}}}
  billing: {{type: static, secret_file: {tmp_path / "billing"}}}
  minted: {{type: self_signed_jwt, iss: credproxy, sub: app}}
callers:
  me: {{uid: {UID}}}
routes:
  - name: orders
    path_prefix: /orders/
    upstream: https://orders.example
    credential: {{issuer: orders, inject: bearer}}
    allow: [{{callers: [me]}}]
  - name: orders-admin
    path_prefix: /orders-admin/
    upstream: https://orders.example
    credential: {{issuer: orders, inject: bearer}}
    allow: [{{callers: [me], methods: [GET]}}]
  - name: billing
    path_prefix: /billing/
    upstream: https://billing.example
    credential: {{issuer: billing, inject: header, header: X-Api-Key}}
  - name: jwt
    path_prefix: /jwt/
    upstream: https://jwt.example
    credential: {{issuer: minted, audience: https://jwt.example, inject: bearer}}
"""


@pytest.fixture
async def assemble(tmp_path: Path) -> AsyncIterator[Callable[..., Runtime]]:
    """``build`` with one session, metrics and audit; every runtime built is closed after."""
    built: list[Runtime] = []
    audit = Audit(str(tmp_path / "audit.jsonl"))
    async with aiohttp.ClientSession() as session:

        def assemble(text: str, previous: Runtime | None = None) -> Runtime:
            runtime = build(
                parse(text), session=session, metrics=Metrics(), audit=audit, previous=previous
            )
            built.append(runtime)
            return runtime

        yield assemble
        for runtime in built:
            await runtime.aclose()
    audit.aclose()


def _source(runtime: Runtime, route: str) -> TokenSource | MintingSource:
    return next(r.source for r in runtime.routes if r.name == route)


async def test_a_config_becomes_routes_in_order_with_shared_sources_per_credential(
    tmp_path, assemble
):
    """Routes keep their order; routes with one credential share one source that names them;
    a per-request JWT issuer gets a minting source; the admission check knows the callers."""
    runtime = assemble(_config(tmp_path))
    assert [r.name for r in runtime.routes] == ["orders", "orders-admin", "billing", "jwt"]
    orders = _source(runtime, "orders")
    assert orders is _source(runtime, "orders-admin") and len(runtime.sources) == 3
    assert orders.routes == ("orders", "orders-admin")
    assert isinstance(_source(runtime, "jwt"), MintingSource)
    assert runtime.routes[2].origin.host == "billing.example"
    assert "x-api-key" in runtime.routes[2].strip  # the injected header is never the app's
    assert set(runtime.issuers) == {"orders", "billing", "minted"}


async def test_a_reload_of_the_same_config_keeps_key_issuers_sources_and_tokens(tmp_path, assemble):
    """Reloading an unchanged config keeps the DPoP key, every issuer and every source, and
    the token a source holds keeps serving without a new fetch."""
    text = _config(tmp_path)
    first = assemble(text)
    token = await _source(first, "orders").get()
    second = assemble(text, previous=first)
    assert second.signing.dpop_key is first.signing.dpop_key
    assert second.signing.batch is first.signing.batch
    assert all(second.issuers[name] is first.issuers[name] for name in first.issuers)
    assert second.sources == first.sources
    assert all(second.sources[k] is first.sources[k] for k in first.sources)
    assert await _source(second, "orders").get() is token
    await first.aclose(keep=second)
    assert await _source(second, "orders").get() is token  # the old runtime let it be


async def test_a_reload_replaces_only_the_issuer_that_changed_and_its_source(tmp_path, assemble):
    """A changed issuer gets a new issuer object and a new source (its old token is not
    carried over); the unchanged issuer keeps both; closing the old runtime ends only the
    replaced source."""
    first = assemble(_config(tmp_path))
    old_orders = _source(first, "orders")
    assert (await old_orders.get()).value.reveal() == "orders-secret-value"
    second = assemble(_config(tmp_path, orders_secret="orders-2"), previous=first)
    assert second.issuers["orders"] is not first.issuers["orders"]
    assert second.issuers["billing"] is first.issuers["billing"]
    assert second.signing.dpop_key is first.signing.dpop_key
    new_orders = _source(second, "orders")
    assert new_orders is not old_orders and new_orders is _source(second, "orders-admin")
    assert _source(second, "billing") is _source(first, "billing")
    assert (await new_orders.get()).value.reveal() == "orders-2-secret-value"
    await first.aclose(keep=second)
    with pytest.raises(RuntimeError, match="closed"):
        old_orders.start()
    _source(second, "billing").start()  # kept, still open


async def test_a_reload_with_another_identity_replaces_the_dpop_key_and_everything_on_it(
    tmp_path, assemble
):
    """A new identity (here the DPoP algorithm) means a new DPoP key, so every issuer and
    source is new: no token bound to the old key is carried over."""
    first = assemble(_config(tmp_path))
    second = assemble(_config(tmp_path, dpop_alg="EdDSA"), previous=first)
    assert second.signing.dpop_key is not first.signing.dpop_key
    assert all(second.issuers[name] is not first.issuers[name] for name in first.issuers)
    assert all(second.sources[k] is not first.sources[k] for k in first.sources)
