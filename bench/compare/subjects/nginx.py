"""nginx as a reverse proxy adding the static key (``nginx.conf``): the fast reference."""

from __future__ import annotations

from pathlib import Path

from ..constants import KEY_HEADER, NGINX
from ..processes import free_port
from ..templates import render_template
from ..workspace import Bench
from .subject import Started

CONF = Path(__file__).with_name("nginx.conf")


def start(bench: Bench) -> Started:
    prefix = bench.subdir("nginx-proxy")
    port = free_port()
    conf = render_template(
        CONF,
        prefix=prefix,
        port=port,
        upstream_port=bench.upstream_port,
        header=KEY_HEADER,
        key=bench.key,
    )
    (prefix / "nginx.conf").write_text(conf)
    argv = [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    process = bench.processes.start("nginx-proxy", argv, cpus=bench.proxy_cpus)
    return Started(f"http://127.0.0.1:{port}", [process])
