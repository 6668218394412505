"""Keycloak, the second real IdP of the OAuth tests: the server distribution from Maven Central,
run in dev mode on loopback with the realm of the compose example (``examples/compose/realm.json``).

``python -m tests.keycloak install`` (run by ``scripts/setup --idp``) fetches the distribution once
into ``${XDG_CACHE_HOME:-~/.cache}/credproxy/keycloak-<version>`` and builds it for dev mode with
``BUILD_OPTIONS`` there (``dev-builds/<digest of the options>``: clones testing other features
share the download and never rebuild each other's), so a session only starts it (no download, no
Quarkus build). Each session runs its own copy of the small mutable parts (configuration, build
output, its database) beside a link to the cached libraries, so sessions never share state.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.credentials.jose import Signer, public_jwk

VERSION = "26.7.3"  # the newest served by Maven Central (26.7.4 is not)
ARTIFACT = f"org.keycloak:keycloak-quarkus-dist:{VERSION}:zip"
# Build options: a session must start with exactly these, or Keycloak rebuilds itself (~25 s).
# dpop, token-exchange-standard and client-auth-federated are on by default in 26.7; named so a
# change of default cannot silently turn them off. resource-indicators (experimental): RFC 8707
# ``resource`` narrows the token's audience. jwt-authorization-grant (preview): RFC 7523
# assertions from an identity provider the realm trusts (the cluster's service-account tokens).
# spiffe (preview): an identity provider trusting a SPIFFE trust domain's bundle endpoint, with
# which client-auth-federated authenticates a client by its JWT-SVID (``jwt-spiffe`` assertions).
FEATURES = (
    "dpop,token-exchange-standard,resource-indicators,jwt-authorization-grant,"
    "client-auth-federated,spiffe"
)
BUILD_OPTIONS = (f"--features={FEATURES}", "--https-client-auth=request")
REALM = "credproxy"
ROOT = Path(__file__).resolve().parent.parent
REALM_FILE = ROOT / "examples" / "compose" / "realm.json"
JAVA_HOMES = ("/usr/lib/jvm/temurin-25-jdk-amd64", "/usr/lib/jvm/java-17-openjdk-amd64")
_BUILT_MARKER = "credproxy-dev-build.txt"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "credproxy" / f"keycloak-{VERSION}"


def java_home() -> str:
    """The newest JDK Keycloak 26 supports that this machine has (25, else 17)."""
    for home in JAVA_HOMES:
        if Path(home, "bin", "java").exists():
            return home
    raise RuntimeError(f"Keycloak needs a JDK 17, 21 or 25; none of {JAVA_HOMES} exists")


def build_dir() -> Path:
    """The dev-mode build (Quarkus' ``lib/quarkus``) for ``BUILD_OPTIONS``, one per option set."""
    digest = hashlib.sha256("\n".join(BUILD_OPTIONS).encode()).hexdigest()[:12]
    return cache_dir() / "dev-builds" / digest


def downloaded() -> bool:
    return (cache_dir() / "lib" / "quarkus-run.jar").exists()


def installed() -> bool:
    marker = build_dir() / _BUILT_MARKER
    return marker.exists() and marker.read_text().split() == list(BUILD_OPTIONS)


def install() -> None:
    """Download (Maven) into the cache and build for dev mode with ``BUILD_OPTIONS``; nothing
    that is already there."""
    if installed():
        return
    if not downloaded():
        _download()
    builds = build_dir().parent
    builds.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=builds, prefix=".build-") as scratch:
        home = Path(scratch) / "keycloak"
        _copy_home(cache_dir() / "lib" / "quarkus", home)
        _dev_build(home)
        built = Path(scratch) / "build"
        built.mkdir()
        (home / "lib" / "quarkus").rename(built / "quarkus")
        (built / _BUILT_MARKER).write_text("\n".join(BUILD_OPTIONS) + "\n")
        if not installed():  # another clone may have built the same options meanwhile
            shutil.rmtree(build_dir(), ignore_errors=True)
            built.rename(build_dir())
    print(f"keycloak {VERSION}: ready in {cache_dir()} ({build_dir().name})", flush=True)


def _download() -> None:
    target = cache_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".keycloak-") as scratch:
        work = Path(scratch)
        started = time.monotonic()
        subprocess.run(
            ["mvn", "-B", "-q", "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy",
             f"-Dartifact={ARTIFACT}", f"-DoutputDirectory={work}"],
            check=True, stdin=subprocess.DEVNULL, cwd=work,
        )  # fmt: skip
        with zipfile.ZipFile(work / f"keycloak-quarkus-dist-{VERSION}.zip") as archive:
            archive.extractall(work)
        home = work / f"keycloak-{VERSION}"
        for script in (home / "bin").glob("*.sh"):
            script.chmod(0o755)
        print(f"keycloak {VERSION}: downloaded in {time.monotonic() - started:.0f} s", flush=True)
        if target.exists():
            shutil.rmtree(target)
        home.rename(target)


def _copy_home(quarkus: Path, home: Path) -> None:
    """A Keycloak home of its own: copies of what Keycloak writes (``quarkus``: the build to
    start from), the cached libraries linked."""
    cached = cache_dir()
    (home / "lib").mkdir(parents=True)
    for part in ("bin", "conf", "themes", "providers"):
        shutil.copytree(cached / part, home / part, symlinks=True)
    shutil.copytree(cached / "lib" / "app", home / "lib" / "app")
    shutil.copytree(quarkus, home / "lib" / "quarkus")
    shutil.copy2(cached / "lib" / "quarkus-run.jar", home / "lib")
    (home / "lib" / "lib").symlink_to(cached / "lib" / "lib")


def _dev_build(home: Path) -> None:
    """Dev mode builds itself on its first start: start once with the session's build options
    and stop when it listens, so sessions find the build done."""
    from tests.counterparts import free_port

    started = time.monotonic()
    log = home / "build.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(home / "bin" / "kc.sh"), "start-dev", *BUILD_OPTIONS,
             "--http-host=127.0.0.1", f"--http-port={free_port()}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "JAVA_HOME": java_home()}, start_new_session=True,
        )  # fmt: skip
        try:
            while "Listening on" not in log.read_text(errors="replace"):
                if process.poll() is not None or time.monotonic() - started > 600:
                    raise RuntimeError(f"keycloak dev build failed:\n{log.read_text()[-4000:]}")
                time.sleep(0.5)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)
    print(f"keycloak {VERSION}: built for dev mode in {time.monotonic() - started:.0f} s")


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Keycloak:
    """A Keycloak of this session on loopback: http for most tests, https (a certificate from
    ``tls``, client certificates asked for) for tls_client_auth. stop()/start() keep its
    database, so its realm and signing keys survive a restart, as a real deployment's do."""

    name = "keycloak"
    CLIENT_ID = "orders-service"
    LEGACY_CLIENT_ID = "orders-legacy"
    MTLS_CLIENT_ID = "orders-mtls"
    MTLS_SUBJECT = "CN=orders-workload"
    DISABLED_CLIENT_ID = "orders-disabled"
    SPIFFE_CLIENT_ID = "orders-spiffe"  # federated-jwt: a JWT-SVID verified by the IdP "spire"
    SUBJECT_CLIENT_ID = "workload-identity"  # issues the identity tokens orders-service exchanges
    API_CLIENT_ID = "payments-api"  # the API as a client: introspects, token exchange audience
    # the audiences the realm's scopes map (audience mapper), one per route in the tests
    PAYMENTS = "https://payments.example"
    REPORTS = "https://reports.example"

    def __init__(self, workdir: Path, *, tls: Any) -> None:
        from tests.counterparts import LEDGER, free_port

        if not installed():
            raise RuntimeError(
                f"Keycloak {VERSION} is not in {cache_dir()}: run scripts/setup --idp"
            )
        self.workdir = workdir
        self.home = workdir / "keycloak"
        self.port, self.https_port = free_port(), free_port()
        self.issuer = f"http://127.0.0.1:{self.port}/realms/{REALM}"
        self.https_issuer = f"https://127.0.0.1:{self.https_port}/realms/{REALM}"
        self.jwks_uri = self.issuer + "/protocol/openid-connect/certs"
        # where the realm's SPIFFE identity provider reads the trust domain's bundle: a SPIRE
        # server of the tests serves it there, with a certificate from ``tls``
        self.spiffe_bundle_port = free_port()
        self.tls = tls
        self.log_file = workdir / "keycloak.log"
        ec_key, rsa_key = (
            ec.generate_private_key(ec.SECP256R1()),
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
        )
        self.client_key_file = workdir / "client-es256.pem"
        self.client_key_file.write_bytes(_pem(ec_key))
        self.client_rsa_key_file = workdir / "client-rs256.pem"
        self.client_rsa_key_file.write_bytes(_pem(rsa_key))
        self._client_jwks = {
            "keys": [
                {**public_jwk(ec_key), "kid": "es256-1", "alg": "ES256", "use": "sig"},
                {**public_jwk(rsa_key), "kid": "rs256-1", "alg": "RS256", "use": "sig"},
            ]
        }
        self._secret = secrets.token_urlsafe(24)
        LEDGER.secret(self._secret)
        self.client_secret_file = workdir / "client_secret.txt"
        self.client_secret_file.write_text(self._secret + "\n")
        self._cluster_key = ec.generate_private_key(ec.SECP256R1())  # signs "projected" tokens
        self._process: subprocess.Popen[bytes] | None = None
        self.started_s = 0.0  # how long the last start took, for the session's report

    def _prepare_home(self) -> None:
        """The session's Keycloak home: the cached build for ``BUILD_OPTIONS`` and the
        repository's realm file to import."""
        _copy_home(build_dir() / "quarkus", self.home)
        (self.home / "data" / "import").mkdir(parents=True)
        shutil.copy2(REALM_FILE, self.home / "data" / "import" / "realm.json")

    def start(self, *, wait: bool = True) -> None:
        if not self.home.exists():
            self._prepare_home()
        assert self.tls is not None
        cert, key = self.tls.issue("127.0.0.1", server=True, stem="keycloak")
        env = {
            **os.environ,
            "JAVA_HOME": java_home(),
            "CREDPROXY_CLIENT_SECRET": self._secret,
            # substituted inside a JSON string of the realm file: escaped as one
            "CREDPROXY_CLIENT_JWKS": json.dumps(json.dumps(self._client_jwks))[1:-1],
            "CREDPROXY_SPIFFE_BUNDLE_ENDPOINT": f"https://127.0.0.1:{self.spiffe_bundle_port}",
            "CREDPROXY_CLUSTER_PUBLIC_KEY": base64.b64encode(
                self._cluster_key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ).decode(),
        }
        self._started_at = time.monotonic()
        log = open(self.log_file, "ab")  # noqa: SIM115 - closed with the process
        self._process = subprocess.Popen(
            [str(self.home / "bin" / "kc.sh"), "start-dev", *BUILD_OPTIONS, "--import-realm",
             "--http-host=127.0.0.1", f"--http-port={self.port}",
             f"--https-port={self.https_port}", f"--https-certificate-file={cert}",
             f"--https-certificate-key-file={key}", f"--truststore-paths={self.tls.ca_file}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 300) -> None:
        """Until the realm's discovery answers (the realm is imported before Keycloak listens)."""
        deadline = time.monotonic() + timeout_s
        url = self.issuer + "/.well-known/openid-configuration"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if self._process is None or self._process.poll() is not None:
                    raise RuntimeError(f"keycloak exited:\n{self.log()[-4000:]}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if self.started_s == 0.0:
            self.started_s = time.monotonic() - self._started_at

    def stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
            self._process = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # -- as the tests use an IdP ------------------------------------------------------------

    def openid_endpoint(self, path: str = "token") -> str:
        """The realm's OpenID Connect endpoint ``path`` (token, revoke, token/introspect, …)."""
        return f"{self.issuer}/protocol/openid-connect/{path}"

    def _form(
        self, url: str, form: dict[str, str], client_id: str, *, expect_json: bool = True
    ) -> dict[str, Any]:
        basic = base64.b64encode(f"{client_id}:{self._secret}".encode()).decode()
        request = urllib.request.Request(
            url,
            data=urlencode(form).encode(),
            headers={"Authorization": f"Basic {basic}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return dict(json.load(response)) if expect_json else {}
        except urllib.error.HTTPError as exc:
            return {"http_status": exc.code, **json.load(exc)}

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 at Keycloak, as the API ``payments-api`` (client_secret_basic): Keycloak
        answers only a client in the token's audience, by client id (so not for a token whose
        audience a ``resource`` narrowed to a URL)."""
        url = self.openid_endpoint("token/introspect")
        return self._form(url, {"token": token}, self.API_CLIENT_ID)

    # standard token exchange takes Keycloak access tokens, and names the audience by client id
    EXCHANGE_ISSUER_FIELDS = (
        "    subject_token_type: urn:ietf:params:oauth:token-type:access_token\n"
        "    audience_param: audience\n"
    )

    def refused_subject_tokens(self) -> dict[str, str]:
        """Identity tokens Keycloak must refuse to exchange: forged, revoked."""
        revoked = self.subject_token()
        url = self.openid_endpoint("revoke")
        self._form(url, {"token": revoked}, self.SUBJECT_CLIENT_ID, expect_json=False)
        return {"forged": self.subject_token(forged=True), "revoked": revoked}

    def subject_token(self, *, forged: bool = False) -> str:
        """The workload's identity token for standard token exchange: a Keycloak access token
        of ``SUBJECT_CLIENT_ID`` whose audience is orders-service; ``forged``: the same claims
        signed by a key Keycloak does not know."""
        from tests.counterparts import LEDGER

        answer = self._form(
            self.openid_endpoint(), {"grant_type": "client_credentials"}, self.SUBJECT_CLIENT_ID
        )
        token = str(answer["access_token"])
        if forged:
            header, claims = (json.loads(_unb64(part)) for part in token.split(".")[:2])
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            token = Signer(key, {k: v for k, v in header.items() if k != "alg"}).sign(claims)
        LEDGER.secret(token)
        return token

    SUBJECT_ISSUER = "https://kubernetes.default.svc"

    def projected_token(self, *, forged: bool = False) -> str:
        """A Kubernetes-style projected service-account token for Keycloak's JWT authorization
        grant (identity provider ``kubernetes``); ``forged``: signed by another key."""
        from tests.counterparts import LEDGER

        key = ec.generate_private_key(ec.SECP256R1()) if forged else self._cluster_key
        now = int(time.time())
        token = Signer(key, {"typ": "JWT", "kid": "cluster-1"}).sign({
            "iss": self.SUBJECT_ISSUER, "sub": "system:serviceaccount:shop:orders",
            "aud": self.issuer, "iat": now, "exp": now + 600, "jti": secrets.token_hex(8),
        })  # fmt: skip
        LEDGER.secret(token)
        return token

    def records(self) -> None:
        """Keycloak keeps no record of the requests it answered that the tests could read."""
        return None


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        raise SystemExit("usage: python -m tests.keycloak install")
    install()
