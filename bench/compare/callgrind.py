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


def latest_dump(out: Path) -> Path | None:
    """The newest of ``<out>.<n>`` (``callgrind_control --dump`` numbers its dumps)."""
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda path: path.stat().st_mtime)
    return dumps[-1] if dumps else None


def valgrind_argv(out: Path) -> list[str]:
    """Callgrind with instrumentation off until ``callgrind_control --instr=on``."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def count_instructions(bench: Bench, subject: Subject) -> float | None:
    """Instructions credproxy executes per request, one request at a time on one keep-alive
    connection, counted by callgrind after 100 warm-up requests. Unlike req/s it is the same
    from run to run (within about 1 %), so a change to the hot path shows even on a noisy VM.
    Token refreshes that fall in the window are counted too, as they would be in service."""
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
        totals = parse_totals(dump.read_text()) if dump else None
        return totals / INSTRUCTION_REQUESTS if totals else None
    except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"   instructions not counted: {exc}", file=sys.stderr, flush=True)
        return None
    finally:
        bench.under = []
        bench.processes.stop_since(known)
