"""Measuring: one path's round (idle RSS, warm-up, the three wrk points, its metrics), the rounds
taking turns, the best of them per point, then callgrind and the upload."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace

from .callgrind import count_instructions
from .fmt import num
from .processes import http_get, wait_ready
from .results import Load, Row, Upload
from .sampling import process_tree, pss_each, rss_each
from .subjects import Subject
from .upload import measure_upload
from .workspace import Bench
from .wrk import run_wrk


def measure(bench: Bench, subject: Subject) -> Row:
    """One round of one path: started, idle RSS and PSS read, warmed up, the wrk points run,
    stopped; a failure is recorded in the row, not raised."""
    row = Row(subject.key, subject.label, note=subject.note)
    settings = bench.settings
    started_at = time.monotonic()
    idp_before = bench.idp_token_requests()
    known = bench.processes.mark()
    try:
        started = subject.start(bench)
        small, big = started.base_url + "/small", started.base_url + "/big"
        wait_ready(small, started.watch, started.headers)
        roots = [p.pid for p in started.watch]
        if roots:
            time.sleep(0.5)
            tree = [pid for root in roots for pid in process_tree(root)]
            each = rss_each(tree)
            row.rss_idle, row.rss_idle_largest = sum(each), max(each, default=0)
            row.pss_idle_largest = max(pss_each(tree), default=0)

        def load(url: str, connections: int, duration_s: int) -> Load:
            return run_wrk(
                url,
                connections=connections,
                duration_s=duration_s,
                headers=started.headers,
                threads=settings.wrk_threads,
                watch=roots,
            )

        load(small, settings.connections, settings.warmup)  # pools, caches; not recorded
        row.small_c1 = load(small, 1, settings.duration)
        row.small_c50 = load(small, settings.connections, settings.duration)
        row.big_c50 = load(big, settings.connections, settings.duration)
        if started.admin_url:
            _, text = http_get(started.admin_url + "/metrics")
            row.metrics = [
                line
                for line in text.decode().splitlines()
                if line.startswith(("credproxy_requests_total", "credproxy_credential_issued"))
            ]
    except Exception as exc:  # one path failing must not stop the others
        row.error = f"{type(exc).__name__}: {exc}"
    finally:
        for name in bench.processes.stop_since(known):  # started for this path
            if row.error or row.errors:
                row.log_tail = bench.processes.log(name)
    row.lifetime_s = time.monotonic() - started_at
    idp_after = bench.idp_token_requests()
    if subject.idp and idp_before is not None and idp_after is not None:
        row.idp_token_requests = idp_after - idp_before
    return row


def best_of(rounds: list[Row]) -> Row:
    """One row per path from its rounds: each load point from the round where it went best (on a
    shared VM a neighbour slows a single run by 15-25 %): c=1 by p50, c=50 and 1 MiB by req/s;
    RSS, token counts and the upload from the round with the best c=50. Failed requests or
    rounds elsewhere are counted in ``round_errors``."""
    done = [r for r in rounds if not r.error and r.small_c50 is not None]
    if not done:
        return rounds[-1]
    best = max(done, key=lambda r: r.small_c50.rps if r.small_c50 else 0.0)
    merged = replace(best, rounds=len(rounds))
    c1 = [r.small_c1 for r in done if r.small_c1 is not None]
    big = [r.big_c50 for r in done if r.big_c50 is not None]
    merged.small_c1 = min(c1, key=lambda load: load.p50_us) if c1 else None
    merged.big_c50 = max(big, key=lambda load: load.rps) if big else None
    merged.round_errors = sum(r.errors for r in rounds if r is not best) + sum(
        1 for r in rounds if r.error
    )
    return merged


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure_all(bench: Bench, wanted: list[Subject]) -> list[Row]:
    """Every path ``settings.rounds`` times, the paths taking turns; then instructions per
    request for the credproxy paths, then the streamed upload; one merged row per path."""
    measured: dict[str, list[Row]] = {subject.key: [] for subject in wanted}
    for round_ in range(1, bench.settings.rounds + 1):
        for subject in wanted:
            _say(f"── {subject.label} (round {round_})")
            why = subject.missing_tool()
            row = Row(subject.key, subject.label, error=why) if why else measure(bench, subject)
            measured[subject.key].append(row)
            if row.error:
                _say(f"   failed: {row.error}")
            elif row.small_c50 is not None:
                c1 = row.small_c1
                _say(
                    f"   {row.small_c50.rps:,.0f} req/s, "
                    f"{num(row.small_c50.cpu_us_per_request)} µs CPU/req, "
                    + (f"c=1 p50/p99 {c1.p50_us:.0f}/{c1.p99_us:.0f} µs, " if c1 else "")
                    + f"{row.errors} errors"
                )
    instructions: dict[str, tuple[float, dict[str, float]] | None] = {}
    for subject in (s for s in wanted if s.instructions):
        _say(f"── {subject.label}: instructions (callgrind)")
        instructions[subject.key] = count_instructions(bench, subject)
    startups: dict[str, tuple[float, float]] = {}
    for subject in (s for s in wanted if s.startup is not None):
        _say(f"── {subject.label}: start-up and check-config")
        assert subject.startup is not None
        try:
            startups[subject.key] = subject.startup(bench)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            _say(f"   failed: {exc}")
    uploads: dict[str, Upload | None] = {}
    for subject in (s for s in wanted if s.upload and not s.missing_tool()):
        _say(f"── {subject.label}: 1 GiB streamed upload")
        uploads[subject.key] = measure_upload(bench, subject)
    rows = [best_of(rounds) for rounds in measured.values() if rounds]
    for row in rows:
        row.upload = uploads.get(row.key)
        if row.key in startups:
            row.startup_s, row.check_config_s = startups[row.key]
        counted = instructions.get(row.key)
        if counted is not None:
            row.instructions_per_request, row.instructions_by_object = counted
    return rows
