"""credproxy itself, one variant per credential scheme: a table of the issuer and credential each
route gets; every variant writes its config as YAML and waits for ``/readyz``."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..constants import CREDPROXY, CREDPROXY_LOG, KEY_HEADER
from ..processes import free_port, wait_ready
from ..workspace import Bench
from .subject import Started

Config = dict[str, Any]


def _static_issuer(bench: Bench) -> Config:
    return {"type": "static", "secret_file": str(bench.key_file)}


def _oauth2_issuer(bench: Bench) -> Config:
    return {
        "type": "oauth2",
        "issuer_url": bench.idp,
        "client_id": "orders-service",
        "client_auth": "private_key_jwt",
        "client_key_file": str(bench.client_key_file),
        "refresh_ahead_s": bench.settings.refresh_ahead_s,
        "revoke_on_shutdown": False,
    }


def _jwt_issuer(bench: Bench) -> Config:
    return {"type": "self_signed_jwt", "iss": "bench", "sub": "bench", "request_claims": True}


def _token_for_upstream(inject: str) -> Callable[[Bench], Config]:
    def credential(bench: Bench) -> Config:
        return {"audience": bench.upstream, "scope": "payments.write", "inject": inject}

    return credential


@dataclass(frozen=True)
class Variant:
    """One credproxy configuration under test."""

    name: str  # its process, log and work directory
    issuer: Callable[[Bench], Config]
    credential: Callable[[Bench], Config]
    workers: int = 1
    other_routes: int = 0  # declared before the measured one: the route table's cost
    shipped_defaults: bool = False  # no log or audit settings: access log on, audit on stdout

    def config(self, bench: Bench, port: int, admin: int, audit_file: str) -> Config:
        credential: Config = {"issuer": "bench-issuer", **self.credential(bench)}
        return {
            "listen": f"127.0.0.1:{port}",
            "admin": f"127.0.0.1:{admin}",
            "callers": {"bench": {"uid": os.getuid()}},
            "issuers": {"bench-issuer": self.issuer(bench)},
            "routes": [
                *(
                    {
                        "name": f"other-{i}",
                        "path_prefix": f"/api/v{i}/" if i % 2 else f"/svc-{i}/",
                        "upstream": bench.upstream,
                        "credential": credential,
                        "allow": [{"callers": ["bench"]}],
                    }
                    for i in range(self.other_routes)
                ),
                {
                    "name": "api",
                    "path_prefix": "/api/",
                    "upstream": bench.upstream,
                    "credential": credential,
                    "allow": [{"callers": ["bench"]}],
                },
            ],
            **(
                {}
                if self.shipped_defaults
                else {"audit": {"file": audit_file}, "log": CREDPROXY_LOG}
            ),
        }

    def _write(self, bench: Bench, name: str) -> tuple[Path, int, int]:
        """The config file under ``name``'s directory, its listen and admin ports."""
        prefix = bench.subdir(name, mode=0o700)
        port, admin = free_port(), free_port()
        config = self.config(bench, port, admin, str(prefix / "audit.jsonl"))
        path = prefix / "credproxy.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path, port, admin

    def startup(self, bench: Bench, tries: int = 3) -> tuple[float, float]:
        """Seconds, best of ``tries``, pinned to the proxy's core: ``credproxy run`` from exec
        to its first ``/readyz`` 200 (polled every 5 ms), and ``credproxy check-config``."""
        path, _, admin = self._write(bench, self.name + "-startup")
        cpus = bench.proxy_cpus or bench.all_cpus
        run, check = [], []
        for _ in range(tries):
            began = time.monotonic()
            process = bench.processes.start(
                self.name + "-startup", [str(CREDPROXY), "run", "-c", str(path)], cpus=cpus
            )
            try:
                wait_ready(f"http://127.0.0.1:{admin}/readyz", [process], poll_s=0.005)
                run.append(time.monotonic() - began)
            finally:
                bench.processes.stop(process)
            began = time.monotonic()
            subprocess.run(
                [str(CREDPROXY), "check-config", str(path)],
                check=True,
                capture_output=True,
                preexec_fn=lambda: os.sched_setaffinity(0, cpus),  # noqa: PLW1509 - no threads
            )
            check.append(time.monotonic() - began)
        return min(run), min(check)

    def start(self, bench: Bench) -> Started:
        """``credproxy run`` (under ``bench.under`` when set: callgrind) until ``/readyz``."""
        path, port, admin = self._write(bench, self.name)
        argv = [*bench.under, str(CREDPROXY), "run", "-c", str(path)]
        cpus = bench.proxy_cpus
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
            cpus = bench.all_cpus  # the workers need more than the one proxy core
        process = bench.processes.start(self.name, argv, cpus=cpus)
        admin_url = f"http://127.0.0.1:{admin}"
        wait_ready(admin_url + "/readyz", [process], timeout_s=180 if bench.under else 30)
        return Started(f"http://127.0.0.1:{port}/api", [process], admin_url=admin_url)


VARIANTS: dict[str, Variant] = {
    "cp-static": Variant(
        "credproxy-static", _static_issuer, lambda _: {"inject": "header", "header": KEY_HEADER}
    ),
    "cp-bearer": Variant("credproxy-bearer", _oauth2_issuer, _token_for_upstream("bearer")),
    "cp-dpop": Variant("credproxy-dpop", _oauth2_issuer, _token_for_upstream("dpop")),
    "cp-jwt": Variant("credproxy-jwt", _jwt_issuer, lambda _: {"inject": "bearer"}),
    "cp-static-1000": Variant(  # the same route among 999 others (half under its prefix)
        "credproxy-static-1000-routes",
        _static_issuer,
        lambda _: {"inject": "header", "header": KEY_HEADER},
        other_routes=999,
    ),
    "cp-bearer-defaults": Variant(
        "credproxy-bearer-defaults",
        _oauth2_issuer,
        _token_for_upstream("bearer"),
        shipped_defaults=True,
    ),
    "cp-bearer-2w": Variant(
        "credproxy-bearer-2w", _oauth2_issuer, _token_for_upstream("bearer"), workers=2
    ),
}
