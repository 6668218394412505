"""The performance targets (issue 7, raised by issue 23) as a table: each ``Target`` names the goal and checks it against
a run's rows, giving the report's "Targets" lines (measured, met or not)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .constants import UPLOAD_BYTES
from .results import Row, Settings


@dataclass(frozen=True)
class Run:
    """What the targets are checked against: the rows that did not fail, by key."""

    live: dict[str, Row]
    settings: Settings
    soak_rss: str | None = None  # the RSS line of the last ``bench/soak.py`` run

    @property
    def credproxies(self) -> list[Row]:
        return [row for key, row in self.live.items() if key.startswith("cp-")]


@dataclass(frozen=True)
class Line:
    """One line of the targets table, after its name."""

    measured: str
    verdict: str


def judged(value: float | None, good: bool, shown: str) -> Line:
    if value is None:
        return Line("—", "—")
    return Line(shown, "met" if good else "**not met**")


def _share(run: Run, key: str, of: str) -> float | None:
    """req/s at c=50 of ``key`` over ``of``, when both ran."""
    row, reference = run.live.get(key), run.live.get(of)
    if row is None or reference is None:
        return None
    return (row.rps or 0) / (reference.rps or 1)


def _ratio(value: float, bound: float) -> str:
    """Two decimals, or three where two would round onto the bound and hide the verdict."""
    shown = f"{value:.2f}"
    return f"{value:.3f}×" if float(shown) == bound and value != bound else shown + "×"


def _at_least(key: str, of: str, minimum: float) -> Callable[[Run], list[Line]]:
    def check(run: Run) -> list[Line]:
        value = _share(run, key, of)
        return [] if value is None else [judged(value, value >= minimum, _ratio(value, minimum))]

    return check


def _over_mitmproxy(run: Run) -> list[Line]:
    mitm = run.live.get("mitmproxy")
    if mitm is None or not run.credproxies:
        return []
    worst = min((row.rps or 0) / (mitm.rps or 1) for row in run.credproxies)
    return [judged(worst, worst >= 10, f"min {worst:.1f}×")]


def _per_core_over(of: str, minimum: float) -> Callable[[Run], list[Line]]:
    """Bearer's requests per fully busy core over ``of``'s."""

    def check(run: Run) -> list[Line]:
        bearer, reference = run.live.get("cp-bearer"), run.live.get(of)
        if bearer is None or reference is None:
            return []
        mine, theirs = bearer.per_core, reference.per_core
        share = mine / theirs if mine and theirs else None
        return [judged(share, (share or 0) >= minimum, _ratio(share or 0, minimum))]

    return check


def _uncapped_reference(run: Run) -> list[Line]:
    """The direct path must be clearly faster than every proxy, or the harness (wrk and the
    upstream on one core) caps the proxies it is compared with."""
    direct = run.live.get("direct")
    proxies = [row for key, row in run.live.items() if key != "direct" and row.rps]
    if direct is None or not direct.rps or not proxies:
        return []
    fastest = max(proxies, key=lambda row: row.rps or 0)
    share = direct.rps / (fastest.rps or 1)
    return [judged(share, share >= 1.1, f"{share:.2f}× the fastest ({fastest.label})")]


def _added_latency(
    percentile: str, limit_us: float, key: str | None = None
) -> Callable[[Run], list[Line]]:
    """Added latency at c=1 over direct: of ``key``, or of the worst credproxy scheme."""

    def check(run: Run) -> list[Line]:
        direct = run.live.get("direct")
        rows = run.credproxies if key is None else [r for k, r in run.live.items() if k == key]
        if direct is None or direct.small_c1 is None or not rows:
            return []
        base = getattr(direct.small_c1, percentile)
        added = max(getattr(r.small_c1, percentile) - base for r in rows if r.small_c1)
        return [judged(added, added <= limit_us, f"{added:.0f} µs")]

    return check


def _bearer_instructions(run: Run) -> list[Line]:
    bearer = run.live.get("cp-bearer")
    count = bearer.instructions_per_request if bearer else None
    return [] if count is None else [judged(count, count <= 200e3, f"{count / 1e3:.0f}k")]


def _instruction_share(
    key: str, of: str, at_most: float, digits: int = 2
) -> Callable[[Run], list[Line]]:
    """Instructions per request of ``key`` over ``of``'s, when both were counted (``digits``
    after the point for the share; two fewer for the counts, in thousands)."""

    def check(run: Run) -> list[Line]:
        row, reference = run.live.get(key), run.live.get(of)
        mine = row.instructions_per_request if row else None
        theirs = reference.instructions_per_request if reference else None
        if not mine or not theirs:
            return []
        share, k = mine / theirs, digits - 2
        shown = f"{share:.{digits}f}× ({mine / 1e3:.{k}f}k / {theirs / 1e3:.{k}f}k)"
        return [judged(share, share <= at_most, shown)]

    return check


def _startup(run: Run) -> list[Line]:
    many, one = run.live.get("cp-static-1000"), run.live.get("cp-static")
    if many is None or many.startup_s is None or many.check_config_s is None:
        return []
    shown = f"run {many.startup_s:.2f} s, check-config {many.check_config_s:.2f} s"
    if one is not None and one.startup_s is not None and one.check_config_s is not None:
        shown += f" (one route: {one.startup_s:.2f} s, {one.check_config_s:.2f} s)"
    slowest = max(many.startup_s, many.check_config_s)
    return [judged(slowest, slowest < 1.0, shown)]


def _two_workers(run: Run) -> list[Line]:
    if not run.settings.workers_supported:
        return [Line("—", "`credproxy run --workers` not there yet")]
    return _at_least("cp-bearer-2w", "cp-bearer", 1.7)(run)


def _rss_idle(run: Run) -> list[Line]:
    idle = [r.rss_idle_largest for r in run.credproxies if r.rss_idle_largest]
    if not idle:
        return []
    largest = max(idle)
    return [judged(largest, largest <= 50e6, f"max {largest / 1e6:.1f} MB")]


def _pss_idle(run: Run) -> list[Line]:
    two = run.live.get("cp-bearer-2w")
    if two is None or not two.pss_idle_largest:
        return []
    pss = two.pss_idle_largest
    return [judged(pss, pss <= 50e6, f"max {pss / 1e6:.1f} MB")]


def _token_requests(run: Run) -> list[Line]:
    window = run.settings.refresh_window_s
    counted = [r for r in run.credproxies if r.idp_token_requests and r.lifetime_s]
    if not counted:
        return []
    over = [
        r.label
        for r in counted
        if (r.idp_token_requests or 0) > 1 + math.floor((r.lifetime_s or 0) / window)
    ]
    total = sum(r.idp_token_requests or 0 for r in counted)
    shown = f"{total} requests" + (f"; too many: {', '.join(over)}" if over else "")
    return [judged(float(total), not over, shown)]


def _upload(run: Run) -> list[Line]:
    uploaded = [r for r in run.credproxies if r.upload is not None]
    if not uploaded and "cp-bearer" in run.live:
        return [Line("—", "not measured: see the log")]
    lines = []
    for row in uploaded:
        up = row.upload
        assert up is not None
        added = up.rss_peak - up.rss_before
        whole = up.status in (201, 204) and up.stored_bytes == UPLOAD_BYTES
        shown = (
            f"+{added / 1e6:.1f} MB ({up.rss_before / 1e6:.1f} → {up.rss_peak / 1e6:.1f} MB; "
            f"{row.label}; {up.seconds:.1f} s)"
        )
        if not whole:
            shown += f"; **upload failed**: {up.status}, {up.stored_bytes} bytes stored"
        lines.append(judged(added, whole and added < 20e6, shown))
    return lines


def _soak(run: Run) -> list[Line]:
    if run.soak_rss:
        return [Line(run.soak_rss, "see [soak.md](soak.md) (`bench/soak.py`)")]
    return [Line("—", "run `bench/soak.py`")]


@dataclass(frozen=True)
class Target:
    name: str
    check: Callable[[Run], list[Line]]  # no line when what it compares did not run


TARGETS: list[Target] = [
    Target("reference uncapped: direct ≥ 1.1× every proxy req/s", _uncapped_reference),
    Target(
        "shipped defaults ≥ 0.9× the tuned config (bearer)",
        _at_least("cp-bearer-defaults", "cp-bearer", 0.9),
    ),
    Target("DPoP ≥ 0.8× bearer req/s", _at_least("cp-dpop", "cp-bearer", 0.8)),
    Target(
        "DPoP ≤ 1.5× bearer instructions/request",
        _instruction_share("cp-dpop", "cp-bearer", 1.5),
    ),
    Target("bearer ≤ 200k instructions/request", _bearer_instructions),
    Target("bearer added p50 at c=1 ≤ 120 µs", _added_latency("p50_us", 120, "cp-bearer")),
    Target("added p50 at c=1 ≤ 120 µs (worst scheme)", _added_latency("p50_us", 120)),
    Target("added p99 at c=1 ≤ 400 µs (worst scheme)", _added_latency("p99_us", 400)),
    Target("bearer ≥ 0.25× nginx req/s", _at_least("cp-bearer", "nginx", 0.25)),
    Target("bearer ≥ 0.25× nginx per core", _per_core_over("nginx", 0.25)),
    Target("bearer ≥ 1.0× Envoy per core", _per_core_over("envoy", 1.0)),
    Target("every credproxy scheme ≥ 10× mitmproxy req/s", _over_mitmproxy),
    Target("2 workers ≥ 1.7× one worker", _two_workers),
    Target(
        "1,000 routes ≥ 0.95× one route (static)", _at_least("cp-static-1000", "cp-static", 0.95)
    ),
    Target(
        "… their instructions/request ≤ 1.05× one route's",
        _instruction_share("cp-static-1000", "cp-static", 1.05, digits=3),
    ),
    Target("1,000 routes: ready and check-config each < 1 s", _startup),
    Target("RSS idle ≤ 50 MB per worker", _rss_idle),
    Target("… as PSS per worker of 2 (pages shared by the fork counted once)", _pss_idle),
    Target("one IdP token request per credential per refresh window", _token_requests),
    Target("1 GiB streamed upload adds < 20 MB RSS", _upload),
    Target("RSS flat (±5 %) over 10 min", _soak),
]


def render_targets(run: Run) -> list[str]:
    """The report's "Targets" section, one table line per target line."""
    out = ["## Targets (issues 7 and 23)", "", "| target | measured | |", "|---|---:|---|"]
    for target in TARGETS:
        out += [f"| {target.name} | {x.measured} | {x.verdict} |" for x in target.check(run)]
    return out
