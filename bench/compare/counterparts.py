"""What every path talks to: the upstream nginx (``upstream.nginx.conf``) and the bench IdP
(``bench/bench_idp.py``), started once per run."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .constants import BENCH, BIG_BYTES, KEY_HEADER, NGINX, PYTHON, SMALL_BODY
from .processes import http_get, wait_ready
from .templates import render_template
from .workspace import Bench

UPSTREAM_CONF = Path(__file__).with_name("upstream.nginx.conf")


def start_upstream(bench: Bench) -> subprocess.Popen[bytes]:
    """nginx serving /small and /big (1 MiB) to requests carrying a credential, else 401, and
    storing a PUT /upload/NAME body in ``bench.upload_dir`` (the streamed-upload measure)."""
    prefix = bench.subdir("upstream")
    docroot = prefix / "www"
    docroot.mkdir(mode=0o755)
    (docroot / "big").write_bytes((b"0123456789abcdef" * 65536)[:BIG_BYTES])
    for path in docroot.iterdir():
        path.chmod(0o644)
    conf = render_template(
        UPSTREAM_CONF,
        prefix=prefix,
        port=bench.upstream_port,
        key=bench.key,
        docroot=docroot,
        upload_dir=bench.upload_dir,
        small=SMALL_BODY.rstrip(b"\n").decode(),  # JSON: no quote or backslash to escape
    )
    (prefix / "nginx.conf").write_text(conf)
    process = bench.processes.start(
        "upstream-nginx", [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    )
    wait_ready(bench.upstream + "/small", [process], {KEY_HEADER: bench.key})
    status, _ = http_get(bench.upstream + "/small")
    if status != 401:
        raise RuntimeError(f"upstream answers {status} without a credential; expected 401")
    return process


def start_idp(bench: Bench) -> subprocess.Popen[bytes]:
    """The demo IdP issuing short-lived tokens (``--token-ttl``) and counting token requests."""
    argv = [str(PYTHON), str(BENCH / "bench_idp.py"), "--port", str(bench.idp_port)]
    argv += ["--client-key", str(bench.client_key_file)]
    argv += ["--client-secret-file", str(bench.client_secret_file)]
    argv += ["--token-ttl", str(bench.settings.token_ttl)]
    process = bench.processes.start("idp", argv)
    wait_ready(bench.idp + "/.well-known/openid-configuration", [process])
    return process
