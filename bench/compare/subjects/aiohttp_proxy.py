"""The bare aiohttp proxy (``bench/aiohttp_proxy.py``): credproxy's HTTP stack alone, the floor
for credproxy's CPU per request."""

from __future__ import annotations

from ..constants import BENCH, KEY_HEADER, PYTHON
from ..processes import free_port
from ..workspace import Bench
from .subject import Started


def start(bench: Bench) -> Started:
    port = free_port()
    argv = [str(PYTHON), str(BENCH / "aiohttp_proxy.py"), "--port", str(port)]
    argv += ["--upstream", bench.upstream, "--header", KEY_HEADER]
    argv += ["--key-file", str(bench.key_file)]
    process = bench.processes.start("aiohttp-proxy", argv, cpus=bench.proxy_cpus)
    return Started(f"http://127.0.0.1:{port}", [process])
