"""``credproxy demo --spiffe``: the SPIFFE mode on loopback with a real SPIRE server and agent
(``scripts/build-spire`` builds them once). The agent attests credproxy by its uid and hands it
SVIDs over the Workload API; no key or token file exists. A verifying upstream checks the
JWT-SVID credproxy sends against the bundle SPIRE publishes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import uvloop
from aiohttp import web

from .. import log
from ..audit.trail import Audit
from ..config import loader
from ..lifecycle.server import Server
from .spire import TRUST_DOMAIN, Spire, cached_binaries
from .tour import _bind_origin, _start, _Tour

WORKLOAD_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/orders"

_CONFIG = """\
listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity:
  spiffe: {{socket: "{socket}"}}
issuers:
  workload: {{type: spiffe}}
callers:
  demo-app: {{uid: {uid}}}
routes:
  - name: inventory
    path_prefix: /inventory/
    upstream: {upstream}
    credential: {{issuer: workload, inject: jwt_svid}}
    allow: [{{callers: [demo-app]}}]
audit: {{file: {workdir}/audit.jsonl}}
log: {{access: false}}
"""


def _upstream(spire: Spire, audience: str) -> web.Application:
    """An API that accepts only a JWT-SVID for itself from SPIRE's trust domain."""
    keys = {
        jwk["kid"]: jwt.PyJWK(jwk).key
        for jwk in spire.jwks()["keys"]
        if jwk.get("use") == "jwt-svid"
    }

    async def handle(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            key = keys[jwt.get_unverified_header(token)["kid"]]
            claims = jwt.decode(token, key, algorithms=["ES256", "RS256"], audience=audience)
        except (jwt.PyJWTError, KeyError) as exc:
            return web.json_response({"error": type(exc).__name__}, status=401)
        return web.json_response({"caller": claims["sub"]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _run(tour: _Tour, workdir: Path) -> None:
    tour.step("1. A SPIRE server and agent; the agent attests processes by uid")
    spire = Spire(workdir / "spire", cached_binaries()).start()
    try:
        spire.register(WORKLOAD_ID, uid=os.getuid(), x509_ttl_s=3600, jwt_ttl_s=300)
        spire.wait_for_svid(WORKLOAD_ID)
        print(f"   registration entry: {WORKLOAD_ID} for unix:uid:{os.getuid()}")
        print(f"   Workload API socket {spire.agent_socket}; no key, no token file for credproxy")
        await _with_spire(tour, spire, workdir)
    finally:
        spire.stop()


async def _with_spire(tour: _Tour, spire: Spire, workdir: Path) -> None:
    sock, upstream = _bind_origin()
    runner = await _start(_upstream(spire, upstream), sock)
    config_path = workdir / "credproxy.yaml"
    config_path.write_text(
        _CONFIG.format(socket=spire.socket_uri, uid=os.getuid(), upstream=upstream, workdir=workdir)
    )
    loaded = loader.load(config_path)
    try:
        async with Server(loaded, audit=Audit(loaded.audit.file)) as server:
            base = f"http://127.0.0.1:{server.app_addresses[0].port}"
            assert server.admin_address is not None
            admin = f"http://127.0.0.1:{server.admin_address.port}"
            assert server.workload_api is not None
            await server.workload_api.wait_x509(30)
            tour.step(f"2. The app calls {base}/inventory/… with no credential")
            async with aiohttp.ClientSession() as app:
                async with app.get(base + "/inventory/items") as response:
                    seen: dict[str, Any] = await response.json()
                tour.check(
                    response.status == 200 and seen.get("caller") == WORKLOAD_ID,
                    f"→ {response.status}: the upstream verified a JWT-SVID for itself from "
                    f"{seen.get('caller')}",
                )
                tour.step("3. Operators see the SVID, never its key")
                async with app.get(admin + "/readyz") as response:
                    ready = await response.json()
                tour.check(ready.get("svid") == "current", f"/readyz → {ready}")
        events = [json.loads(line) for line in (workdir / "audit.jsonl").read_text().splitlines()]
        received = [e for e in events if e["event"] == "svid.received"]
        tour.check(
            bool(received),
            "audit svid.received: "
            + ", ".join(f"{k}={received[0][k]}" for k in ("spiffe_id", "serial", "not_after"))
            if received
            else "no svid.received event",
        )
    finally:
        await runner.cleanup()


def main() -> int:
    log.configure(fmt="text", level="warning")
    tour = _Tour()
    if not (cached_binaries() / "spire-agent").exists():
        print(f"SPIRE is not built yet ({cached_binaries()}): run scripts/build-spire first")
        return 1
    print("credproxy demo --spiffe: the workload's identity is an SVID from a SPIRE agent.")
    with tempfile.TemporaryDirectory(prefix="credproxy-demo-spiffe-") as workdir:
        os.chmod(workdir, 0o700)
        uvloop.run(_run(tour, Path(workdir)))
    print("\n" + ("demo passed" if not tour.failures else f"demo FAILED: {tour.failures} check(s)"))
    return 1 if tour.failures else 0
