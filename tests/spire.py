"""The tests' SPIFFE counterparts: a real SPIRE server and agent (v1.13.3, ``proxy/demo/spire.py``,
built once by ``scripts/build-spire`` into the project's cache), upstreams that verify JWT-SVIDs
and X.509-SVIDs against the bundle SPIRE publishes (never a key the test made), and the
collection of SVID keys for the leak ledger."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web

from proxy.demo.spire import JWT_ISSUER, TRUST_DOMAIN, cached_binaries
from proxy.demo.spire import Spire as DemoSpire
from tests.counterparts import LEDGER, ROOT, ThreadedApp

__all__ = ["JWT_ISSUER", "MTLSUpstream", "SVIDUpstream", "SVIDVerifier", "Spire"]

CREDPROXY_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/credproxy"
SPIFFE_CLIENT = "spiffe-orders"  # the test IdP's client that authenticates with a JWT-SVID
X509_TTL_S = 20  # credproxy's entry: the agent rotates at about half-life, every ~10 s
JWT_TTL_S = 20


def binaries() -> Path:
    """Where ``scripts/build-spire`` put spire-server and spire-agent (building them if not)."""
    directory = cached_binaries()
    if not (directory / "spire-agent").exists():
        subprocess.run([ROOT / "scripts" / "build-spire"], check=True, stdin=subprocess.DEVNULL)
    return directory


class Spire(DemoSpire):
    """SPIRE for the tests: the binaries are built first when the cache has none.
    ``bundle_endpoint`` (port, certificate, key): the server also publishes its trust bundle
    (SPIFFE federation's bundle endpoint, profile https_web) on 127.0.0.1 at that port."""

    def __init__(
        self, workdir: Path, *, bundle_endpoint: tuple[int, Path, Path] | None = None
    ) -> None:
        super().__init__(workdir, binaries())
        if bundle_endpoint is not None:
            port, cert, key = bundle_endpoint
            # file_sync_interval: 1.13.3 refuses to start without one (its 1h default is parsed
            # from the empty string first)
            self.server_extra = f"""\
  federation {{
    bundle_endpoint {{
      address = "127.0.0.1"
      port = {port}
      profile "https_web" {{
        serving_cert_file {{
          cert_file_path = "{cert}"
          key_file_path = "{key}"
          file_sync_interval = "1h"
        }}
      }}
    }}
  }}
"""

    def freeze_agent(self) -> None:
        """SIGSTOP the agent: its socket still takes requests, and nothing answers them."""
        assert self.agent is not None
        self.agent.send_signal(signal.SIGSTOP)

    def thaw_agent(self) -> None:
        assert self.agent is not None
        self.agent.send_signal(signal.SIGCONT)


class SVIDVerifier:
    """Verifies JWT-SVIDs as a SPIFFE resource server does: signature against the JWT authorities
    of SPIRE's published bundle, ``aud`` = this upstream, ``exp``; remembers every token."""

    def __init__(self, spire: Spire, audience: str) -> None:
        self.spire = spire
        self.audience = audience
        self.seen: list[str] = []
        self.subjects: list[str] = []
        self._keys: dict[str, Any] = {}

    def _key(self, kid: str) -> Any:
        if kid not in self._keys:  # keys rotate: read the bundle again for an unknown kid
            for jwk in self.spire.jwks()["keys"]:
                if jwk.get("use") == "jwt-svid":
                    self._keys[jwk["kid"]] = jwt.PyJWK(jwk).key
        return self._keys[kid]

    def verify(self, authorization: str) -> str:
        """The SPIFFE ID of a valid JWT-SVID; ``jwt.InvalidTokenError`` (or KeyError) if not."""
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token:
            raise jwt.InvalidTokenError("no bearer token")
        LEDGER.secret(token)
        self.seen.append(token)
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(
            token, self._key(header["kid"]), algorithms=["ES256", "RS256", "PS256"],
            audience=self.audience, options={"require": ["exp", "sub", "aud"]},
        )  # fmt: skip
        self.subjects.append(claims["sub"])
        return str(claims["sub"])


class SVIDUpstream(ThreadedApp):
    """An upstream that answers 200 only to a JWT-SVID for its own origin from SPIRE's trust
    domain (401 otherwise), and says which SPIFFE ID called."""

    def __init__(self, spire: Spire) -> None:
        super().__init__()
        self.verifier = SVIDVerifier(spire, self.origin)
        self.rejected = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            try:
                caller = self.verifier.verify(request.headers.get("Authorization", ""))
            except (jwt.InvalidTokenError, KeyError) as exc:
                self.rejected += 1
                return web.json_response({"error": type(exc).__name__}, status=401)
            return web.json_response({"spiffe_id": caller, "path": request.path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def record_svid_keys(spire: Spire) -> list[bytes]:
    """The X.509-SVID keys the agent hands uid 0 (credproxy's entry) right now, entered in the
    leak ledger (base64 DER as the Workload API carries them, and each PEM line); their DER."""
    from cryptography.hazmat.primitives import serialization

    answer = spire.fetch_x509_as(0)
    assert answer.returncode == 0, answer.stderr
    keys = []
    for svid in json.loads(answer.stdout)["svids"]:
        encoded = svid["x509_svid_key"]
        der = base64.b64decode(encoded)
        key = serialization.load_der_private_key(der, password=None)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        LEDGER.secret(encoded)
        for line in pem.splitlines():
            if not line.startswith("-----"):
                LEDGER.secret(line)
        keys.append(der)
    return keys


def record_jwt_svid(spire: Spire, audience: str) -> dict[str, Any]:
    """The JWT-SVID the agent gives uid 0 (credproxy's entry) for ``audience``, entered in the
    leak ledger; its claims. The agent caches JWT-SVIDs until half their lifetime: fetched soon
    after credproxy fetched one, it is the same token (check ``iat``)."""
    answer = subprocess.run(
        [str(spire.agent_cli_for_others()), "api", "fetch", "jwt", "-audience", audience,
         "-output", "json", "-socketPath", str(spire.agent_socket)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    [token] = [svid["svid"] for part in json.loads(answer.stdout) for svid in part.get("svids", [])]
    LEDGER.secret(token)
    return dict(jwt.decode(token, options={"verify_signature": False}))


class MTLSUpstream(ThreadedApp):
    """An HTTPS upstream with an X.509-SVID of its own (``spiffe_id``, minted by SPIRE) that
    requires a client certificate chained to SPIRE's published bundle and answers 200 only to
    ``allowed`` (the client's URI SAN), 403 to another SPIFFE ID."""

    def __init__(self, spire: Spire, workdir: Path, spiffe_id: str, allowed: str) -> None:
        import ssl

        cert, key = spire.mint_x509(spiffe_id, workdir)
        bundle = workdir / "spire-bundle.pem"
        bundle.write_text(spire.bundle_pem())
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(bundle))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(cert, key)
        super().__init__(context)
        self.allowed = allowed
        self.requests: list[str] = []  # the client SPIFFE ID of each request received
        self.serials: list[str] = []  # and the serial of its client certificate (hex)

    def app(self) -> web.Application:
        from cryptography import x509

        from proxy.spiffe.svid import uri_sans

        async def handle(request: web.Request) -> web.Response:
            assert request.transport is not None
            der = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            certificate = x509.load_der_x509_certificate(der)
            client = next(iter(uri_sans(certificate)), "")
            self.requests.append(client)
            self.serials.append(format(certificate.serial_number, "x"))
            if client != self.allowed:
                return web.json_response({"error": "wrong SPIFFE ID"}, status=403)
            return web.json_response({"client_spiffe_id": client, "path": request.path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app
