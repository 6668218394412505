"""The pieces every path shares in one run: work directory, keys and secrets, the upstream's and
the IdP's ports, the CPU layout, the processes started."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .processes import Processes, free_port, http_get
from .results import Settings


class Bench:
    """The shared pieces: work directory, upstream, IdP, keys, CPU layout, processes."""

    def __init__(self, settings: Settings, workdir: Path, *, pin: bool) -> None:
        self.settings = settings
        self.workdir = workdir
        # uploads land in memory (tmpfs): a 1 GiB file written back to disk would slow the
        # paths measured after it
        shm = Path("/dev/shm")
        self.upload_dir = Path(
            tempfile.mkdtemp(prefix="credproxy-bench-", dir=shm if shm.is_dir() else workdir)
        )
        self.upload_dir.chmod(0o777)  # nginx's worker (nobody) writes there
        self.processes = Processes(workdir)
        self.key = secrets.token_hex(16)  # the static API key (hex: regex-safe for nginx)
        self.upstream_port = free_port()
        self.upstream = f"http://127.0.0.1:{self.upstream_port}"
        self.idp_port = free_port()
        self.idp = f"http://127.0.0.1:{self.idp_port}"
        self.secrets_dir = workdir / "secrets"
        self.secrets_dir.mkdir(mode=0o700)
        self.key_file = self.secrets_dir / "api-key"
        self.key_file.write_text(self.key + "\n")
        self.client_key_file = self.secrets_dir / "client.pem"
        self.client_key_file.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.client_secret_file = self.secrets_dir / "envoy-client-secret"
        self.client_secret_file.write_text(secrets.token_urlsafe(24))  # Envoy sends it verbatim
        for path in self.secrets_dir.iterdir():
            path.chmod(0o600)
        available = os.sched_getaffinity(0)
        self.all_cpus = set(available)
        self.proxy_cpus: set[int] | None = None
        self.client_cpus: set[int] | None = None
        if pin and len(available) >= 2:
            self.proxy_cpus = {max(available)}
            self.client_cpus = available - {max(available)}
        self.under: list[str] = []  # a command credproxy is started under (callgrind)

    def idp_token_requests(self) -> int | None:
        """How many tokens the bench IdP has issued so far."""
        try:
            _, body = http_get(self.idp + "/__stats")
            return int(json.loads(body)["token_requests"])
        except (OSError, ValueError, KeyError):
            return None

    def subdir(self, name: str, mode: int = 0o755) -> Path:
        """A new directory for one start of a path (its config, pid file, logs)."""
        path, taken = self.workdir / name, 1
        while path.exists():  # the same path in a later round
            taken += 1
            path = self.workdir / f"{name}-{taken}"
        path.mkdir(mode=mode)
        path.chmod(mode)  # nginx workers run as nobody when started as root
        return path
