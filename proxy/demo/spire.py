"""A SPIRE server and agent on loopback and a private Unix socket, for ``credproxy demo --spiffe``
and the tests: join-token node attestation, the ``unix`` workload attestor, registration entries
by uid; the config files are written here. The binaries come from ``scripts/build-spire`` (the
Go module proxy, built once into the project's cache).

The agent keeps its own key on disk (KeyManager ``disk``) so it can be stopped and started
again without a new join token, as an agent restart in a pod would. Whoever must trust SPIRE
takes the bundle it publishes (``bundle show``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

VERSION = "1.13.3"
TRUST_DOMAIN = "credproxy.test"
NODE_ID = f"spiffe://{TRUST_DOMAIN}/node/test"
JWT_ISSUER = "https://spire.credproxy.test"


def cached_binaries() -> Path:
    """Where ``scripts/build-spire`` puts spire-server and spire-agent."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "credproxy" / f"spire-{VERSION}" / "bin"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(predicate: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Spire:
    def __init__(self, workdir: Path, bin_dir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # the agent socket must be reachable by uid 65534 (attacker tests)
        self.bin = bin_dir
        self.server_socket = workdir / "server" / "api.sock"
        # outside pytest's private basetemp, so that other uids (the attacker tests) reach the
        # socket as a workload in another container of the pod would; short for sun_path
        self.agent_dir = Path(tempfile.mkdtemp(prefix="credproxy-spire-"))
        self.agent_socket = self.agent_dir / "public" / "api.sock"
        self.port = _free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.started_in_s = 0.0
        self.began = 0.0
        self.server_extra = ""  # more of the server block (e.g. a federation bundle endpoint)

    @property
    def socket_uri(self) -> str:
        return f"unix://{self.agent_socket}"

    def start(self) -> Self:
        self.began = time.monotonic()
        self._write_configs()
        self.server = self._spawn("spire-server", "server")
        _wait(
            lambda: self._ok("spire-server", "healthcheck", "-socketPath", str(self.server_socket)),
            "SPIRE server",
        )
        (self.workdir / "bundle.pem").write_text(self.server_cli("bundle", "show"))
        token = self.server_cli("token", "generate", "-spiffeID", NODE_ID, "-ttl", "600").split()[
            -1
        ]
        self.start_agent(join_token=token)
        self.started_in_s = time.monotonic() - self.began
        return self

    def start_agent(self, *, join_token: str | None = None) -> None:
        args = ("-joinToken", join_token) if join_token else ()
        self.agent = self._spawn("spire-agent", "agent", *args)
        _wait(
            lambda: self._ok("spire-agent", "healthcheck", "-socketPath", str(self.agent_socket)),
            "SPIRE agent",
        )

    def stop_agent(self) -> None:
        self._stop(self.agent)
        self.agent = None

    def stop(self) -> None:
        self._stop(self.agent)
        self._stop(self.server)
        self.agent = self.server = None
        shutil.rmtree(self.agent_dir, ignore_errors=True)

    def agent_cli_for_others(self) -> Path:
        """spire-agent where any uid may run it (the build cache may sit in a private home)."""
        target = self.agent_dir / "spire-agent"
        if not target.exists():
            shutil.copy2(self.bin / "spire-agent", target)
            target.chmod(0o755)
        return target

    def fetch_x509_as(self, user: int | None = None) -> subprocess.CompletedProcess[str]:
        """``spire-agent api fetch x509`` as ``user``: what the agent gives that uid."""
        return subprocess.run(
            [str(self.agent_cli_for_others()), "api", "fetch", "x509", "-output", "json",
             "-socketPath", str(self.agent_socket)],
            capture_output=True, text=True, timeout=30, check=False, user=user,
        )  # fmt: skip

    def register(
        self, spiffe_id: str, *, uid: int, x509_ttl_s: int = 3600, jwt_ttl_s: int = 300
    ) -> str:
        """A registration entry for processes of ``uid`` on the test node; its entry id."""
        out = self.server_cli(
            "entry", "create", "-parentID", NODE_ID, "-spiffeID", spiffe_id,
            "-selector", f"unix:uid:{uid}", "-x509SVIDTTL", str(x509_ttl_s),
            "-jwtSVIDTTL", str(jwt_ttl_s), "-output", "json",
        )  # fmt: skip
        return str(json.loads(out)["results"][0]["entry"]["id"])

    def wait_for_svid(self, spiffe_id: str, timeout_s: float = 30.0) -> None:
        """Until the agent hands ``spiffe_id`` to this process (entries reach it by sync)."""
        _wait(
            lambda: spiffe_id in self._run("spire-agent", "api", "fetch", "x509", "-socketPath", str(self.agent_socket)).stdout,
            f"an X.509-SVID for {spiffe_id}",
            timeout_s,
        )  # fmt: skip

    def jwks(self) -> dict[str, Any]:
        """The trust domain's bundle as SPIFFE publishes it: a JWKS with the X.509 authorities
        (``use: x509-svid``) and the JWT signing keys (``use: jwt-svid``)."""
        return dict(json.loads(self.server_cli("bundle", "show", "-format", "spiffe")))

    def bundle_pem(self) -> str:
        return self.server_cli("bundle", "show")

    def mint_x509(
        self, spiffe_id: str, directory: Path, *, dns: str = "localhost"
    ) -> tuple[Path, Path]:
        """An X.509-SVID signed by the server's CA for a counterpart (an upstream's server
        certificate), written as PEM: (certificate chain file, key file)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        directory.mkdir(parents=True, exist_ok=True)
        out = json.loads(self.server_cli(
            "x509", "mint", "-spiffeID", spiffe_id, "-dns", dns, "-ttl", "1h", "-output", "json"
        ))[0]  # fmt: skip
        pem = serialization.Encoding.PEM
        chain = "".join(
            x509.load_der_x509_certificate(base64.b64decode(c)).public_bytes(pem).decode()
            for c in out["x509_svid"]
        )
        key = serialization.load_der_private_key(base64.b64decode(out["private_key"]), None)
        cert_file, key_file = directory / "svid.pem", directory / "svid.key"
        cert_file.write_text(chain)
        key_file.write_bytes(key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))  # fmt: skip
        return cert_file, key_file

    def server_cli(self, *args: str) -> str:
        result = self._run("spire-server", *args, "-socketPath", str(self.server_socket))
        if result.returncode != 0:
            raise RuntimeError(f"spire-server {' '.join(args)}: {result.stderr}{result.stdout}")
        return result.stdout

    def _ok(self, *args: str) -> bool:
        return self._run(*args).returncode == 0

    def _run(self, binary: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / binary), *args], capture_output=True, text=True, timeout=30, check=False
        )

    def _spawn(self, binary: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [str(self.bin / binary), "run", "-config", str(self.workdir / f"{name}.conf"), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return process

    @staticmethod
    def _stop(process: subprocess.Popen[bytes] | None) -> None:
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _write_configs(self) -> None:
        data = self.workdir / "server"
        data.mkdir(exist_ok=True)
        (self.agent_dir / "public").mkdir(parents=True, exist_ok=True)
        (self.agent_dir / "public").chmod(0o755)
        self.agent_dir.chmod(0o755)
        (self.workdir / "server.conf").write_text(f"""\
server {{
  bind_address = "127.0.0.1"
  bind_port = "{self.port}"
  socket_path = "{self.server_socket}"
  trust_domain = "{TRUST_DOMAIN}"
  data_dir = "{data}"
  log_level = "INFO"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
  default_jwt_svid_ttl = "5m"
  jwt_issuer = "{JWT_ISSUER}"
{self.server_extra}}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{data}/datastore.sqlite3"
    }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
}}
""")
        (self.workdir / "agent.conf").write_text(f"""\
agent {{
  data_dir = "{self.agent_dir}"
  log_level = "INFO"
  server_address = "127.0.0.1"
  server_port = "{self.port}"
  socket_path = "{self.agent_socket}"
  trust_bundle_path = "{self.workdir / "bundle.pem"}"
  trust_domain = "{TRUST_DOMAIN}"
}}
plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "disk" {{
    plugin_data {{
      directory = "{self.agent_dir}"
    }}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{}}
  }}
}}
""")
