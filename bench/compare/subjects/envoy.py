"""Envoy, one worker: a static header (``envoy-static.yaml``) or its OAuth2 credential injector
(``envoy-oauth2.yaml``)."""

from __future__ import annotations

from pathlib import Path

from ..constants import ENVOY, KEY_HEADER
from ..processes import free_port
from ..templates import render_template
from ..workspace import Bench
from .subject import Started

HERE = Path(__file__).parent


def config(bench: Bench, port: int, *, oauth2: bool) -> str:
    """The bootstrap for a listener on ``port``."""
    if oauth2:
        return render_template(
            HERE / "envoy-oauth2.yaml",
            port=port,
            upstream_port=bench.upstream_port,
            idp_port=bench.idp_port,
            idp=bench.idp,
            upstream=bench.upstream,
            client_secret_file=bench.client_secret_file,
        )
    return render_template(
        HERE / "envoy-static.yaml",
        port=port,
        upstream_port=bench.upstream_port,
        header=KEY_HEADER,
        key=bench.key,
    )


def _start(bench: Bench, name: str, *, oauth2: bool) -> Started:
    prefix = bench.subdir(name)
    port = free_port()
    path = prefix / "envoy.yaml"
    path.write_text(config(bench, port, oauth2=oauth2))
    argv = [str(ENVOY), "-c", str(path), "--concurrency", "1", "--disable-hot-restart"]
    argv += ["--log-level", "warn"]
    process = bench.processes.start(name, argv, cpus=bench.proxy_cpus)
    return Started(f"http://127.0.0.1:{port}", [process])


def start_static(bench: Bench) -> Started:
    return _start(bench, "envoy-static", oauth2=False)


def start_oauth2(bench: Bench) -> Started:
    return _start(bench, "envoy-oauth2", oauth2=True)
