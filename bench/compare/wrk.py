"""Driving wrk against one URL while sampling the proxy's CPU and RSS, and parsing wrk's output."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time

from .constants import WRK
from .results import Load
from .sampling import cpu_seconds, process_tree, rss_bytes, system_busy_seconds

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def duration_us(text: str) -> float:
    """A wrk duration (``45.00us``, ``2.20ms``, ``5.10s``, ``1.00m``) in microseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(output: str, connections: int) -> Load:
    """The figures of one ``wrk --latency`` run; the proxy's CPU and RSS are left empty."""

    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output without {pattern!r}:\n{output}")
        return match

    done = find(r"^\s*(\d+) requests in ([\d.]+)(\w+),")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Load(
        connections=connections,
        requests=int(done[1]),
        seconds=duration_us(done[2] + done[3]) / 1e6,
        rps=float(find(r"^Requests/sec:\s+([\d.]+)")[1]),
        p50_us=duration_us(find(r"^\s+50%\s+(\S+)")[1]),
        p99_us=duration_us(find(r"^\s+99%\s+(\S+)")[1]),
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
    )


def wrk_argv(
    url: str, *, connections: int, duration_s: int, headers: dict[str, str], threads: int
) -> list[str]:
    argv = [WRK, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration_s}s"]
    argv += ["--latency", "--timeout", "10s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    return [*argv, url]


def run_wrk(
    url: str,
    *,
    connections: int,
    duration_s: int,
    headers: dict[str, str],
    threads: int,
    watch: list[int],
) -> Load:
    """wrk against ``url``; meanwhile the RSS of the ``watch`` trees is sampled every 0.2 s, and
    their CPU time and the machine's are read before and after."""
    argv = wrk_argv(
        url, connections=connections, duration_s=duration_s, headers=headers, threads=threads
    )
    pids = [pid for root in watch for pid in process_tree(root)]
    ours = process_tree(os.getpid())  # the bench, upstream, IdP, proxy; wrk once reaped
    cpu_before, ours_before, busy_before = (
        cpu_seconds(pids),
        cpu_seconds(ours),
        system_busy_seconds(),
    )
    peak = rss_bytes(pids)
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + duration_s + 30
        while process.poll() is None:
            peak = max(peak, rss_bytes(pids))
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"wrk did not finish: {' '.join(argv)}")
            time.sleep(0.2)
        cpu_after, ours_after, busy_after = (
            cpu_seconds(pids),
            cpu_seconds(ours),
            system_busy_seconds(),
        )
        out.seek(0)
        output = out.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited {process.returncode}:\n{output}")
    load = parse_wrk(output, connections)
    others = (busy_after - busy_before) - (ours_after - ours_before)
    load.other_cores = max(0.0, others) / load.seconds if load.seconds else None
    if pids:
        spent = cpu_after - cpu_before
        load.cpu_us_per_request = spent * 1e6 / load.requests if load.requests else None
        load.cpu_utilization = spent / load.seconds if load.seconds else None
        load.rss_peak = peak
    return load
