"""Where the bench finds its tools, and what every path sends and serves."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = ROOT / ".venv" / "bin" / "python"
CREDPROXY = ROOT / ".venv" / "bin" / "credproxy"
ENVOY = BENCH / ".venv-envoy" / "bin" / "envoy"
MITMDUMP = BENCH / ".venv-mitmproxy" / "bin" / "mitmdump"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"

KEY_HEADER = "X-Api-Key"
SMALL_BODY = b'{"id":"ch_0001","amount":4200,"currency":"eur","status":"succeeded"}\n'
BIG_BYTES = 1024 * 1024
UPLOAD_BYTES = 1024**3
CREDPROXY_LOG = {"format": "text", "level": "warning", "access": False}
INSTRUCTION_REQUESTS = 1000  # requests counted under callgrind, after 100 warm-up ones
DISTURBED_CORES = 0.1  # other load above which a row is marked as disturbed
