"""best_of: one row per path from its rounds, each load point from the round where it went best."""

from __future__ import annotations

from bench.compare.measuring import best_of
from bench.compare.results import Load, Row


def _load(rps: float, p50_us: float, non_2xx: int = 0) -> Load:
    return Load(50, int(rps), 1.0, rps, p50_us, p50_us * 2, 0, non_2xx)


def _round(c50_rps: float, c1_p50: float, big_rps: float, non_2xx: int = 0) -> Row:
    return Row(
        "cp-bearer",
        "credproxy bearer",
        small_c1=_load(1000, c1_p50),
        small_c50=_load(c50_rps, 5000, non_2xx),
        big_c50=_load(big_rps, 50_000),
        rss_idle=int(c50_rps),
    )


def test_each_point_comes_from_its_best_round():
    """c=1 from the round with the lowest p50, c=50 and 1 MiB from the highest req/s; the rest
    (RSS here) from the round with the best c=50."""
    first, second = _round(5000, 300, 700), _round(6000, 250, 600)
    merged = best_of([first, second])
    assert merged.small_c50 is second.small_c50 and merged.rss_idle == 6000
    assert merged.small_c1 is second.small_c1
    assert merged.big_c50 is first.big_c50
    assert merged.rounds == 2 and merged.round_errors == 0


def test_failures_in_rounds_not_shown_are_counted():
    """Failed requests of the other rounds, and failed rounds, land in round_errors."""
    failed = Row("cp-bearer", "credproxy bearer", error="RuntimeError: exited")
    merged = best_of([_round(5000, 300, 700, non_2xx=3), _round(6000, 250, 600), failed])
    assert merged.round_errors == 3 + 1 and merged.rounds == 3


def test_a_path_that_never_ran_keeps_its_last_error():
    """When every round failed, the last round's row (with its error) is the path's row."""
    rounds = [Row("envoy", "Envoy", error="first"), Row("envoy", "Envoy", error="last")]
    assert best_of(rounds).error == "last"
