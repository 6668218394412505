"""``credproxy demo``: the whole story on loopback, no external service.

A demo IdP and a verifying upstream start in-process; credproxy runs with a generated config;
the app calls through it; then another process replays what it could capture, and fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import log
from ..audit.trail import Audit
from ..config import loader
from ..lifecycle.server import Server
from ..secret import fingerprint
from .idp import DemoIdP
from .resource_server import Verifier, resource_app

_CONFIG = """\
listen: 127.0.0.1:0
admin: 127.0.0.1:0
issuers:
  demo-idp:
    type: oauth2
    issuer_url: {idp}
    client_id: orders-service
    client_auth: private_key_jwt
    client_key_file: {workdir}/client.pem
callers:
  demo-app: {{uid: {uid}, exe: "{exe}"}}
routes:
  - name: payments
    path_prefix: /payments/
    upstream: {upstream}
    credential: {{issuer: demo-idp, audience: "{upstream}", scope: payments.write, inject: dpop}}
    allow: [{{callers: [demo-app], methods: [GET, POST], paths: ["/v1/charges/**"]}}]
audit: {{file: {workdir}/audit.jsonl}}
log: {{access: false}}
"""


class _Tour:
    def __init__(self) -> None:
        self.failures = 0

    def check(self, ok: bool, text: str) -> None:
        print(f"   {'✓' if ok else '✗'} {text}")
        self.failures += not ok

    @staticmethod
    def step(text: str) -> None:
        print(f"\n── {text}")


async def _start(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


def _bind_origin() -> tuple[socket.socket, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def _run(tour: _Tour, workdir: Path) -> None:
    tour.step("1. The workload identity: a private key mounted only into the sidecar")
    client_key = ec.generate_private_key(ec.SECP256R1())
    key_file = workdir / "client.pem"
    key_file.write_bytes(
        client_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    print(f"   {key_file} (mode 0600); the app never reads it")

    idp_sock, idp_url = _bind_origin()
    idp = DemoIdP(idp_url, client_id="orders-service", client_key=client_key.public_key())
    idp_runner = await _start(idp.app(), idp_sock)

    async def jwks() -> dict[str, Any]:
        return idp.jwks()

    rs_sock, upstream = _bind_origin()
    verifier = Verifier(issuer=idp_url, audience=upstream, jwks=jwks, origin=upstream)
    rs_runner = await _start(resource_app(verifier), rs_sock)
    print(f"   demo IdP at {idp_url}; verifying upstream (checks DPoP) at {upstream}")

    config_path = workdir / "credproxy.yaml"
    config_path.write_text(
        _CONFIG.format(
            idp=idp_url,
            workdir=workdir,
            upstream=upstream,
            uid=os.getuid(),
            exe=os.path.realpath(sys.executable),
        )
    )
    loaded = loader.load(config_path)
    try:
        async with Server(loaded, audit=Audit(loaded.audit.file)) as server:
            await _as_the_app(tour, server, verifier)
            sidecar = f"http://127.0.0.1:{server.app_addresses[0].port}"
            await _replay_elsewhere(tour, verifier, upstream, sidecar)
            await _observe(tour, server, idp)
    finally:
        await rs_runner.cleanup()
        await idp_runner.cleanup()
    events = [
        json.loads(line)["event"] for line in (workdir / "audit.jsonl").read_text().splitlines()
    ]
    tour.step("5. The audit trail holds fingerprints, never values")
    tour.check(
        events.count("credential.issued") == 1 and "request.denied" in events,
        f"audit events: {events}",
    )


async def _as_the_app(tour: _Tour, server: Server, verifier: Verifier) -> None:
    base = f"http://127.0.0.1:{server.app_addresses[0].port}"
    tour.step(f"2. The app calls {base}/payments/… with no usable secret")
    async with aiohttp.ClientSession() as app:
        headers = {"Authorization": "Bearer leftover-app-key"}
        async with app.get(base + "/payments/v1/charges?limit=1", headers=headers) as response:
            seen = await response.json()
        tour.check(response.status == 200, f"GET /payments/v1/charges → {response.status}")
        tour.check(
            seen.get("authorization_schemes") == ["DPoP"],
            "upstream saw one Authorization: DPoP, the app's own header was stripped",
        )
        tour.check(
            seen.get("jkt") == server.runtime.signing.dpop_key.jkt,
            f"token bound to the sidecar's in-memory key (cnf.jkt {str(seen.get('jkt'))[:12]}…)",
        )
        if verifier.seen:
            token = verifier.seen[-1][0]
            print(
                f"   token fingerprint {fingerprint(token)} (the value is never printed or logged)"
            )
        async with app.post(base + "/payments/v1/charges", json={"amount": 42}) as response:
            tour.check(response.status == 200, f"POST with a body → {response.status}, fresh proof")
        async with app.get(base + "/elsewhere") as response:
            problem = await response.json()
            tour.check(
                response.status == 404 and problem["code"] == "route_not_found",
                f"unknown route → {response.status} {response.content_type} {problem['code']}",
            )


async def _replay_elsewhere(tour: _Tour, verifier: Verifier, upstream: str, sidecar: str) -> None:
    tour.step("3. Another program on this host replays the captured token and proof")
    if not verifier.seen:
        tour.check(False, "nothing reached the upstream, so nothing to replay")
        return
    token, proof = verifier.seen[-1]
    # A different executable: a copy of the interpreter under another path.
    other = Path(tempfile.mkdtemp(prefix="credproxy-demo-other-")) / "other-program"
    shutil.copy2(os.path.realpath(sys.executable), other)
    package_root = str(Path(__file__).resolve().parents[2])
    replay = await asyncio.create_subprocess_exec(
        str(other), "-m", "proxy.demo.replay",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": package_root},
    )  # fmt: skip
    lines = f"{token}\n{proof}\n{upstream}/payments/v1/charges\n{sidecar}/payments/v1/charges\n"
    stdout, stderr = await asyncio.wait_for(replay.communicate(lines.encode()), timeout=30)
    shutil.rmtree(other.parent, ignore_errors=True)
    try:
        statuses = json.loads(stdout)
    except ValueError:
        tour.check(False, f"replay process failed: {stderr.decode().strip()[-300:]}")
        return
    sidecar_status = statuses.pop("sidecar_asked_by_another_program")
    for attempt, status in statuses.items():
        tour.check(status == 401, f"at the upstream, {attempt.replace('_', ' ')} → {status}")
    tour.check(
        sidecar_status == 403,
        f"through the sidecar as {other.name} (same uid, other executable) → {sidecar_status} "
        "caller_not_allowed",
    )


async def _observe(tour: _Tour, server: Server, idp: DemoIdP) -> None:
    assert server.admin_address is not None
    admin = f"http://127.0.0.1:{server.admin_address.port}"
    tour.step(f"4. Operators watch {admin}/metrics and /readyz")
    async with aiohttp.ClientSession() as client:
        async with client.get(admin + "/readyz") as response:
            tour.check(
                response.status == 200, f"/readyz → {response.status} {await response.text()}"
            )
        async with client.get(admin + "/metrics") as response:
            metrics = await response.text()
    for line in metrics.splitlines():
        if line.startswith(("credproxy_credential_issued_total", "credproxy_requests_total")):
            print(f"   {line}")
    tour.check(idp.token_requests == 1, f"IdP token requests: {idp.token_requests}")


def main() -> int:
    log.configure(fmt="text", level="warning")
    tour = _Tour()
    print("credproxy demo: an app calls an API through the sidecar and never holds a credential.")
    with tempfile.TemporaryDirectory(prefix="credproxy-demo-") as workdir:
        os.chmod(workdir, 0o700)
        uvloop.run(_run(tour, Path(workdir)))
    print("\n" + ("demo passed" if not tour.failures else f"demo FAILED: {tour.failures} check(s)"))
    return 1 if tour.failures else 0
