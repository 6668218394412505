"""The targets (issues 7 and 23) are a table checked against a run: each target gives its line, or none when
what it compares did not run."""

from __future__ import annotations

from dataclasses import replace

from bench.compare.constants import RESULTS
from bench.compare.results import Results, Row, Upload
from bench.compare.targets import TARGETS, Run, render_targets


def _committed() -> Run:
    results = Results.load(RESULTS / "compare.json")
    live = {row.key: row for row in results.rows if not row.error}
    return Run(live, results.settings, soak_rss="RSS MiB 65.3 → 65.4 (+0.1%)")


def test_targets_are_one_table_with_unique_names():
    """Every target is a record of the table; the report lists them in its order, one line
    each (the committed run ran every path)."""
    names = [target.name for target in TARGETS]
    assert len(names) == len(set(names)) == 21
    rendered = render_targets(_committed())
    positions = [next(i for i, line in enumerate(rendered) if f"| {n} |" in line) for n in names]
    assert positions == sorted(positions)


def test_the_committed_run_meets_and_misses_what_its_report_says():
    """Checked against the committed results, the targets give the committed verdicts."""
    rendered = render_targets(_committed())
    for line in (
        "| reference uncapped: direct ≥ 1.1× every proxy req/s | 1.06× the fastest "
        "(nginx reverse proxy, static header) | **not met** |",
        "| shipped defaults ≥ 0.9× the tuned config (bearer) | 0.89× | **not met** |",
        "| DPoP ≥ 0.8× bearer req/s | 0.60× | **not met** |",
        "| DPoP ≤ 1.5× bearer instructions/request | 2.12× (598k / 282k) | **not met** |",
        "| bearer ≤ 200k instructions/request | 282k | **not met** |",
        "| bearer ≥ 1.0× Envoy per core | 0.79× | **not met** |",
        "| every credproxy scheme ≥ 10× mitmproxy req/s | min 11.5× | met |",
        "| 1,000 routes ≥ 0.95× one route (static) | 1.09× | met |",
        "| … their instructions/request ≤ 1.05× one route's | 0.975× (273.8k / 280.7k) | met |",
        "| 1,000 routes: ready and check-config each < 1 s | run 0.63 s, check-config 0.29 s "
        "(one route: 0.49 s, 0.21 s) | met |",
        "| bearer ≥ 0.25× nginx req/s | 0.254× | met |",
        "| bearer ≥ 0.25× nginx per core | 0.251× | met |",
        "| one IdP token request per credential per refresh window | 12 requests | met |",
        "| RSS flat (±5 %) over 10 min | RSS MiB 65.3 → 65.4 (+0.1%) | "
        "see [soak.md](soak.md) (`bench/soak.py`) |",
    ):
        assert line in rendered


def test_a_ratio_that_would_round_onto_its_bound_shows_a_third_decimal():
    """0.897 of a 0.9 bound is not shown as 0.90× beside "not met"."""
    run = _committed()
    bearer = run.live["cp-bearer"]
    assert bearer.small_c50 is not None
    slower = replace(bearer.small_c50, rps=bearer.small_c50.rps * 0.897)
    defaults = replace(run.live["cp-bearer-defaults"], small_c50=slower)
    rendered = render_targets(replace(run, live={**run.live, "cp-bearer-defaults": defaults}))
    assert "| shipped defaults ≥ 0.9× the tuned config (bearer) | 0.897× | **not met** |" in (
        rendered
    )


def test_a_target_whose_reference_did_not_run_gives_no_line():
    """Without nginx in the run (``--only``), the target against nginx is left out."""
    run = _committed()
    without_nginx = replace(run, live={k: r for k, r in run.live.items() if k != "nginx"})
    assert not any("× nginx req/s" in line for line in render_targets(without_nginx))


def test_two_workers_without_workers_support_says_so():
    """Where `credproxy run --workers` does not exist, the 2-worker target says why it is empty."""
    run = _committed()
    settings = replace(run.settings, workers_supported=False)
    live = {k: r for k, r in run.live.items() if k != "cp-bearer-2w"}
    rendered = render_targets(Run(live, settings))
    assert "| 2 workers ≥ 1.7× one worker | — | `credproxy run --workers` not there yet |" in (
        rendered
    )


def test_an_incomplete_upload_is_not_met():
    """An upload that nginx did not store whole fails its target, whatever the RSS did."""
    run = _committed()
    bearer: Row = run.live["cp-bearer"]
    broken = replace(bearer, upload=Upload(502, 1.0, 12345, 67_000_000, 67_500_000))
    rendered = render_targets(replace(run, live={**run.live, "cp-bearer": broken}))
    [line] = [x for x in rendered if x.startswith("| 1 GiB streamed upload")]
    assert "**upload failed**: 502, 12345 bytes stored" in line and line.endswith("**not met** |")


def test_start_up_of_a_thousand_routes_is_judged_on_the_slower_of_run_and_check_config():
    """Either command at 1 s or more misses the target; the one-route figures are shown beside."""
    run = _committed()
    one = replace(run.live["cp-static"], startup_s=0.51, check_config_s=0.22)

    def line(startup_s: float, check_config_s: float) -> str:
        many = replace(
            run.live["cp-static-1000"], startup_s=startup_s, check_config_s=check_config_s
        )
        live = {**run.live, "cp-static": one, "cp-static-1000": many}
        rendered = render_targets(replace(run, live=live))
        return next(x for x in rendered if "ready and check-config" in x)

    assert line(0.66, 0.34).endswith(
        "| run 0.66 s, check-config 0.34 s (one route: 0.51 s, 0.22 s) | met |"
    )
    assert line(0.66, 1.2).endswith("| **not met** |")
    assert line(1.0, 0.3).endswith("| **not met** |")
