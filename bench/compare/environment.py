"""The machine and the versions of everything measured, for the report's header."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path

from .constants import CREDPROXY, ENVOY, MITMDUMP, NGINX, ROOT, WRK
from .workspace import Bench


def _version(argv: list[str], pattern: str = r"(\d+\.\d+(?:\.\d+)?)") -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "missing"
    match = re.search(pattern, done.stdout + done.stderr)
    return match[1] if match else "?"


def environment(bench: Bench) -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if bench.proxy_cpus:
        pinning = f"proxy on CPU {sorted(bench.proxy_cpus)}, wrk/upstream/IdP on {sorted(bench.client_cpus or ())}"
    else:
        pinning = "none"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}",
        "credproxy": f"{_version([str(CREDPROXY), '--version'])} (git {commit or '?'})",
        "python": platform.python_version(),
        "nginx": _version([NGINX, "-v"]),
        "envoy": _version([str(ENVOY), "--version"], r"/(\d+\.\d+\.\d+)/"),
        "mitmproxy": _version([str(MITMDUMP), "--version"]),
        "wrk": _version([WRK, "-v"]),
        "pinning": pinning,
    }
