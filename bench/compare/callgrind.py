"""Instructions per request under callgrind: credproxy started under valgrind, instrumentation
switched on for a fixed number of requests (``callgrind_control``), and the dump's totals read."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

from .constants import INSTRUCTION_REQUESTS
from .subjects import Subject
from .workspace import Bench

WARMUP_REQUESTS = 100


def parse_totals(dump: str) -> int | None:
    """The ``totals:`` line of a callgrind dump (instructions, the first event), or None."""
    match = re.search(r"^totals: (\d+)", dump, re.MULTILINE)
    return int(match[1]) if match else None


# Shared objects by what they do, for "where the instructions go" (the rest under their name).
_KINDS = {
    "libpython": "Python interpreter",
    "libc.so": "libc",
    "_http_parser": "llhttp (aiohttp's parser)",
    "loop.cpython": "uvloop",
    "_multidict": "multidict",
    "libcrypto": "OpenSSL libcrypto",
    "_rust.abi3": "cryptography (Rust)",
    "libssl": "OpenSSL libssl",
}


def by_object(dump: str) -> dict[str, int]:
    """Instructions spent in each shared object's own code (self cost, not inclusive), from a
    callgrind dump: the cost lines under each ``ob=``, minus the inclusive lines after
    ``calls=`` (those are the callee's, counted where it runs)."""
    names: dict[str, str] = {}
    spent: dict[str, int] = {}
    current = "?"
    skip = False
    for line in dump.splitlines():
        if line.startswith(("ob=", "cob=")):
            match = re.match(r"c?ob=\((\d+)\)(?: (.*))?", line)
            if match:
                if match[2]:
                    names[match[1]] = match[2]
                if line.startswith("ob="):
                    current = names.get(match[1], "?")
        elif line.startswith("calls="):
            skip = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
                continue
            parts = line.split()
            if len(parts) >= 2:
                kind = next((k for key, k in _KINDS.items() if key in current), None)
                label = kind or current.rsplit("/", 1)[-1].split(".cpython")[0]
                spent[label] = spent.get(label, 0) + int(parts[1])
    return spent


def latest_dump(out: Path) -> Path | None:
    """The newest of ``<out>.<n>`` (``callgrind_control --dump`` numbers its dumps)."""
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda path: path.stat().st_mtime)
    return dumps[-1] if dumps else None


def valgrind_argv(out: Path) -> list[str]:
    """Callgrind with instrumentation off until ``callgrind_control --instr=on``."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def count_instructions(bench: Bench, subject: Subject) -> tuple[float, dict[str, float]] | None:
    """Instructions credproxy executes per request, one request at a time on one keep-alive
    connection, counted by callgrind after 100 warm-up requests. Unlike req/s it is the same
    from run to run (within about 1 %), so a change to the hot path shows even on a noisy VM.
    Token refreshes that fall in the window are counted too, as they would be in service.
    Also per request: the instructions spent in each shared object (``by_object``)."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return None
    out = bench.subdir(f"{subject.key}-callgrind") / "callgrind.out"
    bench.under = valgrind_argv(out)
    known = bench.processes.mark()
    try:
        started = subject.start(bench)
        [process] = started.watch
        target = urllib.parse.urlsplit(started.base_url + "/small")
        connection = http.client.HTTPConnection(target.hostname or "", target.port, timeout=60)

        def send(count: int) -> None:
            for _ in range(count):
                connection.request("GET", target.path, headers=started.headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"{subject.key} answered {response.status} under callgrind")

        def control(option: str) -> None:
            subprocess.run(
                ["callgrind_control", option, str(process.pid)], check=True, capture_output=True
            )

        send(WARMUP_REQUESTS)
        control("--instr=on")
        send(INSTRUCTION_REQUESTS)
        control("--instr=off")
        control("--dump")
        connection.close()
        dump = latest_dump(out)
        text = dump.read_text() if dump else ""
        totals = parse_totals(text)
        if not totals:
            return None
        where = {name: count / INSTRUCTION_REQUESTS for name, count in by_object(text).items()}
        return totals / INSTRUCTION_REQUESTS, where
    except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"   instructions not counted: {exc}", file=sys.stderr, flush=True)
        return None
    finally:
        bench.under = []
        bench.processes.stop_since(known)
