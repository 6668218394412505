"""Real counterparts the tests start on loopback: the oidc-provider IdP (Node), the verifying
resource server (in a thread), and credproxy itself as a ``credproxy run`` subprocess.

Every credential value any of them sees is entered in ``LEDGER`` for the leak scan, together with
every log, audit file and response body credproxy produced.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.credentials.jose import b64url, public_jwk
from proxy.demo.resource_server import Verifier, resource_app
from tests.tls import TestCA

ROOT = Path(__file__).resolve().parent.parent
IDP_DIR = ROOT / "tests" / "idp"


class LeakLedger:
    """Every secret seen during the run, and every place credproxy wrote to."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()
        self.files: list[Path] = []
        self.texts: list[tuple[str, str]] = []

    def secret(self, value: str | None) -> None:
        if value:
            self.secrets.add(value)

    def output(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def save(self, path: Path) -> None:
        """For a run split over workers (``-n``): the controller merges them (``merged``)."""
        texts = [list(entry) for entry in self.texts]
        files = [str(p) for p in self.files]
        path.write_text(
            json.dumps({"secrets": sorted(self.secrets), "files": files, "texts": texts})
        )

    @classmethod
    def merged(cls, paths: list[Path]) -> LeakLedger:
        ledger = cls()
        for path in paths:
            saved = json.loads(path.read_text())
            ledger.secrets.update(saved["secrets"])
            ledger.files += [Path(p) for p in saved["files"]]
            ledger.texts += [(where, text) for where, text in saved["texts"]]
        return ledger

    def hits(self) -> list[str]:
        sources = [(str(p), p.read_text(errors="replace")) for p in self.files if p.exists()]
        found = []
        for where, text in [*sources, *self.texts]:
            for value in self.secrets:
                # the JWS signature alone is as damning as the whole value
                for needle in {value, value.rsplit(".", 1)[-1]}:
                    if len(needle) >= 16 and needle in text:
                        found.append(f"{where}: {hashlib.sha256(value.encode()).hexdigest()[:12]}")
        return found


LEDGER = LeakLedger()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, timeout_s: float = 20.0, context: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def ec_private_pem() -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, key


class IdP:
    """node-oidc-provider on a fixed loopback port; survives stop()/start() with the same keys.
    ``tests.keycloak.Keycloak`` offers the same interface for the tests parametrised over both
    (the ``oauth_idp`` fixture)."""

    name = "oidc-provider"
    CLIENT_ID = "orders-service"
    SUBJECT_ISSUER = "https://kubernetes.default.svc"
    LEGACY_CLIENT_ID = "legacy-service"

    MTLS_CLIENT_ID = "orders-mtls"
    MTLS_SUBJECT = "CN=orders-workload"

    def __init__(
        self,
        workdir: Path,
        *,
        scopes: Iterable[str] = ("payments.read", "payments.write"),
        tls: TestCA | None = None,
    ):
        """With ``tls``, the IdP serves https with a certificate from that CA, asks clients for
        certificates, and registers ``MTLS_CLIENT_ID`` (tls_client_auth, certificate-bound)."""
        self.workdir = workdir
        self.port = free_port()
        self.issuer = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.tls = tls
        self.ssl = ssl.create_default_context(cafile=tls.ca_file) if tls else None
        self.scopes = list(scopes)
        self.resources: dict[str, dict[str, Any]] = {}
        pem, client_key = ec_private_pem()
        self.client_key_file = workdir / "client.pem"
        self.client_key_file.write_bytes(pem)
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.client_rsa_key_file = workdir / "client-rs256.pem"
        self.client_rsa_key_file.write_bytes(
            rsa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.client_secret_file = workdir / "client_secret.txt"
        secret = secrets.token_urlsafe(24)
        self.client_secret_file.write_text(secret + "\n")
        LEDGER.secret(secret)
        signing = ec.generate_private_key(ec.SECP256R1())
        d = signing.private_numbers().private_value.to_bytes(32, "big")
        self._signing_jwk = {**public_jwk(signing), "d": b64url(d), "kid": "idp-1", "alg": "ES256"}
        self._client_jwks = [
            {**public_jwk(client_key), "alg": "ES256"},
            {**public_jwk(rsa_key), "alg": "RS256"},
        ]
        self._legacy_secret = secret
        self._cluster_key = ec.generate_private_key(ec.SECP256R1())  # signs "projected" tokens
        self._cluster_jwk = {**public_jwk(self._cluster_key), "kid": "cluster-1", "alg": "ES256"}
        # whose subject tokens token exchange accepts; a SPIFFE test sets SPIRE's JWT authorities
        self.subject_issuer = self.SUBJECT_ISSUER
        self.subject_jwks: list[dict[str, Any]] = [self._cluster_jwk]
        # clients that authenticate with a JWT-SVID: (client_id, SPIFFE ID); with their JWKS
        self.spiffe_clients: list[tuple[str, str]] = []
        self.spiffe_jwks: list[dict[str, Any]] = []
        # with tls: tls_client_auth clients known by the SPIFFE ID of their X.509-SVID, and the
        # SPIFFE bundle (PEM) their certificates chain to
        self.spiffe_mtls_clients: list[tuple[str, str]] = []
        self.spiffe_bundle_pem = ""
        self.record_file = workdir / "idp-records.jsonl"
        self._process: subprocess.Popen[bytes] | None = None
        self._nonce_secret = secrets.token_hex(32)

    def add_resource(
        self,
        audience: str,
        *,
        ttl_s: int,
        scope: str = "payments.read payments.write",
        opaque: bool = False,
    ) -> None:
        token_format = "opaque" if opaque else "jwt"
        self.resources[audience] = {"scope": scope, "ttl_s": ttl_s, "format": token_format}

    def start(self) -> None:
        scope = " ".join(self.scopes)
        base = {
            "grant_types": [
                "client_credentials",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ],
            "response_types": [],
            "redirect_uris": [],
            "id_token_signed_response_alg": "ES256",
            "scope": scope,
        }
        config: dict[str, Any] = {
            "port": self.port,
            "issuer": self.issuer,
            "scopes": [*self.scopes, "payments.admin"],  # a scope no client may have
            "signing_jwk": self._signing_jwk,
            "nonce_secret_hex": self._nonce_secret,
            "resources": self.resources,
            "subject_issuer": self.subject_issuer,
            "subject_jwks": self.subject_jwks,
            "record_file": str(self.record_file),
            "clients": [
                {
                    **base,
                    "client_id": self.CLIENT_ID,
                    "token_endpoint_auth_method": "private_key_jwt",
                    "jwks": {"keys": self._client_jwks},
                },
                {
                    **base,
                    "client_id": self.LEGACY_CLIENT_ID,
                    "client_secret": self._legacy_secret,
                    "token_endpoint_auth_method": "client_secret_basic",
                },
            ],
        }
        if self.tls is not None:
            cert, key = self.tls.issue("idp", server=True, stem="idp")
            client_ca = self.tls.ca_file
            if self.spiffe_bundle_pem:
                client_ca = self.workdir / "client-ca.pem"
                client_ca.write_text(self.tls.ca_file.read_text() + self.spiffe_bundle_pem)
            config["tls"] = {"cert": str(cert), "key": str(key), "ca": str(client_ca)}
            for client_id, spiffe_id in self.spiffe_mtls_clients:
                config["clients"].append({
                    **base, "client_id": client_id,
                    "token_endpoint_auth_method": "tls_client_auth",
                    "tls_client_auth_san_uri": spiffe_id,
                    "tls_client_certificate_bound_access_tokens": True,
                })  # fmt: skip
            config["clients"].append({
                **base,
                "client_id": self.MTLS_CLIENT_ID,
                "token_endpoint_auth_method": "tls_client_auth",
                "tls_client_auth_subject_dn": self.MTLS_SUBJECT,
                "tls_client_certificate_bound_access_tokens": True,
            })  # fmt: skip
        if self.spiffe_clients:
            spiffe = []
            for client_id, spiffe_id in self.spiffe_clients:
                secret = secrets.token_urlsafe(24)  # the IdP's own: never given to credproxy
                LEDGER.secret(secret)
                spiffe.append({"client_id": client_id, "spiffe_id": spiffe_id, "secret": secret})
                config["clients"].append({
                    **base, "client_id": client_id, "client_secret": secret,
                    "token_endpoint_auth_method": "client_secret_post",
                })  # fmt: skip
            config["spiffe"] = {"jwks": self.spiffe_jwks, "clients": spiffe}
        config_file = self.workdir / "idp.json"
        config_file.write_text(json.dumps(config))
        log = open(self.workdir / "idp.log", "ab")  # noqa: SIM115 - closed with the process
        self._process = subprocess.Popen(
            ["node", "server.mjs", str(config_file)], cwd=IDP_DIR, stdout=log, stderr=log
        )
        log.close()
        _wait_http(self.issuer + "/.well-known/openid-configuration", context=self.ssl)

    @property
    def jwks_uri(self) -> str:
        return self.issuer + "/jwks"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(
            self.issuer + "/__test/stats", timeout=5, context=self.ssl
        ) as response:
            return dict(json.load(response))

    def require_nonce(self, on: bool) -> None:
        request = urllib.request.Request(
            f"{self.issuer}/__test/require-nonce?on={int(on)}", method="POST"
        )
        urllib.request.urlopen(request, timeout=5, context=self.ssl).close()

    # how credproxy's token_exchange issuer is configured for this IdP
    EXCHANGE_ISSUER_FIELDS = ""

    def refused_subject_tokens(self) -> dict[str, str]:
        """Identity tokens this IdP must refuse to exchange, by what is wrong with them."""
        return {
            "untrusted": self.subject_token(key=ec.generate_private_key(ec.SECP256R1())),
            "expired": self.subject_token(lifetime_s=-60),
        }

    def subject_token(
        self, *, lifetime_s: int = 600, key: ec.EllipticCurvePrivateKey | None = None
    ) -> str:
        """A Kubernetes-style projected service-account token for token exchange."""
        from proxy.credentials.jose import Signer

        now = int(time.time())
        token = Signer(key or self._cluster_key, {"typ": "JWT", "kid": "cluster-1"}).sign({
            "iss": self.SUBJECT_ISSUER, "sub": "system:serviceaccount:shop:orders",
            "aud": self.issuer, "iat": now, "exp": now + lifetime_s, "jti": secrets.token_hex(8),
        })  # fmt: skip
        LEDGER.secret(token)
        return token

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 at the IdP, authenticated as the legacy client (client_secret_basic)."""
        import base64
        from urllib.parse import urlencode

        basic = base64.b64encode(f"{self.LEGACY_CLIENT_ID}:{self._legacy_secret}".encode()).decode()
        request = urllib.request.Request(
            self.issuer + "/token/introspection",
            data=urlencode({"token": token}).encode(),
            headers={
                "Authorization": f"Basic {basic}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        with urllib.request.urlopen(request, timeout=5, context=self.ssl) as response:
            return dict(json.load(response))

    def records(self) -> list[dict[str, Any]]:
        if not self.record_file.exists():
            return []
        entries = [json.loads(line) for line in self.record_file.read_text().splitlines()]
        for entry in entries:
            for field in ("client_assertion", "dpop", "access_token", "token", "subject_token"):
                LEDGER.secret(entry.get(field))
        return entries


class ThreadedApp:
    """An aiohttp application on its own event loop in a thread, on a port bound up front."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._tls = tls
        self.origin = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    def app(self) -> web.Application:
        raise NotImplementedError

    def start(self) -> None:
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            runner = web.AppRunner(self.app(), access_log=None)
            self._loop.run_until_complete(runner.setup())
            self._loop.run_until_complete(
                web.SockSite(runner, self._sock, ssl_context=self._tls).start()
            )
            self._runner = runner
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner.cleanup())
            self._loop.run_until_complete(asyncio.sleep(0.1))  # let closing transports finish

        self._thread = threading.Thread(target=serve, daemon=True, name=type(self).__name__)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
            self._loop.close()


def _pattern(n: int) -> bytes:
    return (b"0123456789abcdef" * 4096)[:n]


class ResourceServer(ThreadedApp):
    """The verifying upstream, plus endpoints for streaming, scrubbing and redirect tests."""

    def __init__(
        self,
        idp: Any,
        *,
        accept_bearer: bool = True,
        tls: ssl.SSLContext | None = None,
        audiences: tuple[str, str] | None = None,
        client_id: str | None = None,
    ) -> None:
        """``audiences``: this API's audience and another API's (a payments.read route's),
        where the IdP names them (Keycloak's realm), else URLs under this origin; ``client_id``:
        the API as the IdP's client, where it has one (Keycloak: introspection answers only a
        client named in the token's audience, and token exchange names the audience so)."""
        super().__init__(tls)
        self.idp = idp
        self.audience, self.other_audience = audiences or (self.origin, self.origin + "/reports")
        self.exchange_audience = client_id or self.audience  # what a token exchange asks for
        # the route audience whose tokens the IdP revokes and will introspect
        self.introspectable_audience = (
            f"urn:client:{client_id}" if client_id else self.origin + "/opaque"
        )
        self.short_audience = self.origin + "/short-lived"
        self.opaque_audience = self.origin + "/opaque"  # opaque tokens: revocable at the IdP
        self.uploads: list[dict[str, Any]] = []

        async def jwks() -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:
                async with session.get(idp.jwks_uri) as response:
                    return dict(await response.json())

        async def introspect(token: str) -> dict[str, Any]:
            return await asyncio.to_thread(idp.introspect, token)

        accepted = {self.audience, self.other_audience, self.short_audience}
        if client_id is None:  # oidc-provider: its opaque tokens, for revocation
            accepted.add(self.opaque_audience)
        self.verifier = Verifier(
            introspect=introspect,
            issuer=idp.issuer,
            audience=sorted(accepted | {self.exchange_audience}),
            jwks=jwks,
            origin=self.origin,
            accept_bearer=accept_bearer,
        )

    def seen(self) -> list[tuple[str, str]]:
        pairs = list(self.verifier.seen)
        for token, proof in pairs:
            LEDGER.secret(token)
            LEDGER.secret(proof)
        return pairs

    def app(self) -> web.Application:
        routes = web.RouteTableDef()

        @routes.post("/api/upload")
        async def upload(request: web.Request) -> web.Response:
            digest, size = hashlib.sha256(), 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
            self.uploads.append({"bytes": size, "sha256": digest.hexdigest()})
            return web.json_response(self.uploads[-1])

        @routes.get("/api/download")
        async def download(request: web.Request) -> web.StreamResponse:
            total = int(request.query["bytes"])
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = total
            await response.prepare(request)
            block = _pattern(65536)
            sent = 0
            while sent < total:
                piece = block[: min(len(block), total - sent)]
                await response.write(piece)
                sent += len(piece)
            await response.write_eof()
            return response

        @routes.get("/api/echo-credential")
        async def echo_credential(request: web.Request) -> web.Response:
            token = request.headers["Authorization"].partition(" ")[2]
            # split across the body so scrubbing must work across chunk boundaries
            return web.Response(
                text=f"you sent me {token} and again {token}",
                headers={"X-Echo": f"token={token}"},
            )

        @routes.get("/api/redirect")
        async def redirect(request: web.Request) -> web.Response:
            return web.Response(status=302, headers={"Location": "http://127.0.0.2:9/stolen"})

        @routes.get("/api/hop-by-hop")
        async def hop(request: web.Request) -> web.Response:
            return web.Response(
                text="ok",
                headers={"Connection": "X-Upstream-Hop", "X-Upstream-Hop": "1", "X-Kept": "1"},
            )

        app = resource_app(self.verifier, routes)

        async def load_keys(_: web.Application) -> None:
            await (
                self.verifier.load_keys()
            )  # like a real RS: keys cached before the IdP may go away

        app.on_startup.append(load_keys)
        return app


@contextmanager
def idp_and_upstream(
    workdir: Path, *, ttls_s: tuple[int, int] = (60, 5), tls: ssl.SSLContext | None = None
) -> Iterator[tuple[IdP, ResourceServer]]:
    """A running IdP and a resource server trusting it; the resource server's audience and its
    short-lived audience get tokens of ``ttls_s`` seconds. Secrets seen are entered in LEDGER."""
    idp = IdP(workdir)
    server = ResourceServer(idp, tls=tls)
    idp.add_resource(server.audience, ttl_s=ttls_s[0])
    idp.add_resource(server.short_audience, ttl_s=ttls_s[1])
    idp.add_resource(server.other_audience, ttl_s=ttls_s[0], scope="payments.read")
    idp.add_resource(server.opaque_audience, ttl_s=ttls_s[0], opaque=True)
    idp.start()
    try:
        server.start()
        yield idp, server
    finally:
        server.stop()
        idp.records()
        server.seen()
        idp.stop()


class Credproxy:
    """``credproxy run`` as a subprocess, its log captured to a file, ports learned from the log."""

    def __init__(
        self,
        workdir: Path,
        config_text: str,
        name: str = "credproxy",
        args: tuple[str, ...] = (),
        wrap: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.args = args  # more ``credproxy run`` arguments, e.g. --workers
        self.wrap = wrap  # a command that execs the rest, e.g. prlimit --nofile=256:256 --
        self.config_file = workdir / f"{name}.yaml"
        self.log_file = workdir / f"{name}.log"
        self.audit_file = workdir / f"{name}-audit.jsonl"
        self.control_path = workdir / f"{name}-control.sock"
        if not re.search(r"^control:", config_text, re.MULTILINE):  # a private control socket
            config_text += f'\ncontrol: {{listen: "unix:{self.control_path}"}}\n'
        self.config_file.write_text(config_text.replace("{audit}", str(self.audit_file)))
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin_url = ""
        LEDGER.files.extend([self.log_file, self.audit_file])

    def start(self, *, expect_ready: bool = True, timeout_s: float = 20) -> Credproxy:
        """Start and wait for the listeners; with ``expect_ready`` also for ``/readyz`` = 200."""
        log = open(self.log_file, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [
                *self.wrap,
                sys.executable,
                "-m",
                "proxy",
                "run",
                "-c",
                str(self.config_file),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # with --workers, only worker 0 has the admin listener
            match = re.search(r"credproxy serving (.+?); admin ((?!None)\S+?);", self.log())
            if match:
                self.url = "http://" + match[1].split(",")[0]
                self.admin_url = "http://" + match[2]
                control = re.search(r"; control unix:(\S+?);", self.log())
                if control:
                    self.control_path = Path(control[1])
                break
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"credproxy did not start:\n{self.log()}")
        if expect_ready:
            if not self.url:
                raise RuntimeError(f"credproxy exited {self.process.returncode}:\n{self.log()}")
            _wait_http(self.admin_url + "/readyz", timeout_s)
        return self

    def control(self) -> aiohttp.ClientSession:
        """A client of its control socket (as the test process: root, the sidecar's uid);
        requests go to ``http://localhost/…``, over at most the connections one uid may hold."""
        from proxy.lifecycle.admin_http import MAX_CONNECTIONS_PER_UID

        connector = aiohttp.UnixConnector(
            path=str(self.control_path), limit=MAX_CONNECTIONS_PER_UID
        )
        return aiohttp.ClientSession(connector=connector)

    def audit(self, event: str | None = None) -> list[dict[str, Any]]:
        """The audit events so far (of one kind). The sidecar writes them from a thread, so this
        reads until the file has not changed for 100 ms."""
        text, deadline = None, time.monotonic() + 5
        while time.monotonic() < deadline:
            current = self.audit_file.read_text() if self.audit_file.exists() else ""
            if current == text:
                break
            text = current
            time.sleep(0.1)
        events = [json.loads(line) for line in (text or "").splitlines()]
        return [e for e in events if event is None or e["event"] == event]

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def rss_bytes(self) -> int:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024  # type: ignore[index]

    def stop(self, timeout_s: float = 15) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code


def config(
    *,
    idp: Any,
    upstream: str,
    audience: str,
    inject: str = "dpop",
    client_auth: str = "private_key_jwt",
    client_key_file: Path | None = None,
    extra_route: str = "",
    extra_issuer: str = "",
    top: str = "",
) -> str:
    """A credproxy config for the test counterparts (``idp``: an ``IdP`` or a
    ``tests.keycloak.Keycloak``); ``{audit}`` is filled in by ``Credproxy``."""
    credential_file = (
        f"client_key_file: {client_key_file or idp.client_key_file}"
        if client_auth == "private_key_jwt"
        else f"client_secret_file: {idp.client_secret_file}"
    )
    client_id = idp.CLIENT_ID if client_auth == "private_key_jwt" else idp.LEGACY_CLIENT_ID
    return f"""\
listen: 127.0.0.1:0
admin: 127.0.0.1:0
issuers:
  test-idp:
    type: oauth2
    issuer_url: {idp.issuer}
    client_id: {client_id}
    client_auth: {client_auth}
    {credential_file}
{extra_issuer}
callers:
  test-suite: {{uid: 0}}
routes:
  - name: payments
    path_prefix: /payments/
    upstream: {upstream}
    strip_headers: [X-Api-Key]
    credential: {{issuer: test-idp, audience: "{audience}", scope: payments.write, inject: {inject}}}
    allow: [{{callers: [test-suite]}}]
{extra_route}
audit: {{file: "{{audit}}"}}
log: {{format: json}}
{top}
"""


async def rss_peak_during(proc: Credproxy, work: Callable[[], Awaitable[None]]) -> tuple[int, int]:
    """Run ``work`` while sampling credproxy's RSS; return (RSS before, peak RSS during)."""
    before = proc.rss_bytes()
    peak = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.rss_bytes())
            await asyncio.sleep(0.02)

    sampler = asyncio.ensure_future(sample())  # noqa: TID251 - test-local sampler
    try:
        await work()
    finally:
        done.set()
        await sampler
    return before, peak


# Every test config starts so: ephemeral loopback ports, the test process (root) as the caller.
PREAMBLE = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ncallers:\n  test-suite: {uid: 0}\n"


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def environment_ok() -> None:
    """Fail loudly (never skip) when the test IdP was not installed by scripts/setup --idp."""
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError("tests/idp/node_modules missing: run scripts/setup --idp (npm ci)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


NOBODY = 65534
_ATTACKER = Path(__file__).with_name("attacker.py")


def attacker_command(*args: str) -> list[str]:
    """``tests/attacker.py ARGS`` under the system python, from a copy any uid can read and
    run (the checkout and the venv may sit under a private home)."""
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"credproxy-attacker-{os.getpid()}"
    script = directory / _ATTACKER.name
    if not script.exists():
        directory.mkdir(mode=0o755, exist_ok=True)
        directory.chmod(0o755)
        script.write_bytes(_ATTACKER.read_bytes())
        script.chmod(0o644)
    python = os.path.realpath(shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3")
    return [python, str(script), *args]


def attack(
    *args: str, user: int | None = None, wrap: Iterable[str] = (), timeout_s: float = 60
) -> Any:
    """Run the attacker (as ``user``, under ``wrap`` such as ``ip netns exec NS``); its JSON."""
    result = subprocess.run(
        [*wrap, *attacker_command(*args)],
        capture_output=True, text=True, timeout=timeout_s, user=user, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])
