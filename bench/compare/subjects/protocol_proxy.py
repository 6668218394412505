"""The protocol-level floor (``bench/protocol_proxy.py``): credproxy's own HTTP/1.1 machinery
with none of its logic, so that its instructions per request show what credproxy's logic costs
above it."""

from __future__ import annotations

from ..constants import BENCH, KEY_HEADER, PYTHON
from ..processes import free_port, wait_ready
from ..workspace import Bench
from .subject import Started


def start(bench: Bench) -> Started:
    """Under ``bench.under`` when set (callgrind), like credproxy."""
    port = free_port()
    argv = [*bench.under, str(PYTHON), str(BENCH / "protocol_proxy.py"), "--port", str(port)]
    argv += ["--upstream", bench.upstream, "--header", KEY_HEADER]
    argv += ["--key-file", str(bench.key_file)]
    process = bench.processes.start("protocol-proxy", argv, cpus=bench.proxy_cpus)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/small", [process], timeout_s=180 if bench.under else 30)
    return Started(base, [process])
