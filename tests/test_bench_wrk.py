"""wrk's output, captured from real runs (tests/data/bench/wrk_*.txt), parsed into the figures
the bench reports; and the wrk command line it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.compare.wrk import duration_us, parse_wrk, wrk_argv

DATA = Path(__file__).parent / "data" / "bench"


def _output(name: str) -> str:
    return (DATA / f"wrk_{name}.txt").read_text()


def test_a_run_at_50_connections_gives_its_figures():
    """Requests, seconds, req/s and the p50/p99 of the latency distribution, in µs."""
    load = parse_wrk(_output("small_c50"), 50)
    assert (load.connections, load.requests, load.seconds) == (50, 104027, 2.0)
    assert load.rps == 51957.39
    assert (load.p50_us, load.p99_us) == (554.0, 6640.0)
    assert (load.socket_errors, load.non_2xx) == (0, 0)
    assert load.cpu_us_per_request is None and load.rss_peak is None  # the bench adds those


def test_microseconds_and_milliseconds_mix_in_one_distribution():
    """At c=1 the p50 is in µs and the p99 in ms; both come out in µs."""
    load = parse_wrk(_output("small_c1"), 1)
    assert (load.requests, load.seconds, load.rps) == (60881, 2.01, 30316.69)
    assert (load.p50_us, load.p99_us) == (19.0, 4250.0)


def test_non_2xx_answers_are_counted():
    """A path that forgets its credential gets 401s: they count as errors, not as speed."""
    load = parse_wrk(_output("unauthorized_c50"), 50)
    assert load.non_2xx == load.requests == 104500


def test_socket_errors_are_summed():
    """Connect, read, write and timeout errors add up (here: connections closed unanswered)."""
    load = parse_wrk(_output("dropped_c10"), 10)
    assert load.requests == 0 and load.socket_errors == 11199 and load.rps == 0.0


def test_output_without_figures_is_an_error_naming_what_is_missing():
    """wrk that could not connect prints no figures: parsing fails loudly, with the output."""
    with pytest.raises(ValueError, match=r"requests in.*\n.*Connection refused"):
        parse_wrk(_output("refused_c10"), 10)


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("45.00us", 45.0),
        ("2.20ms", 2200.0),
        ("1.02s", 1_020_000.0),
        ("1.50m", 90e6),
        ("1h", 3600e6),
    ],
)
def test_wrk_durations_in_microseconds(text, us):
    """Every unit wrk prints converts to µs."""
    assert duration_us(text) == pytest.approx(us)


def test_an_unknown_duration_unit_is_an_error():
    """A unit wrk never printed before is not guessed at."""
    with pytest.raises(ValueError, match="unexpected wrk duration"):
        duration_us("3.00ns")


def test_the_command_line_caps_threads_and_sends_the_headers():
    """wrk never gets more threads than connections, and every header goes as -H."""
    argv = wrk_argv(
        "http://127.0.0.1:1/small",
        connections=1,
        duration_s=5,
        headers={"X-Api-Key": "k"},
        threads=4,
    )
    assert argv[1:] == [
        "-t1",
        "-c1",
        "-d5s",
        "--latency",
        "--timeout",
        "10s",
        "-H",
        "X-Api-Key: k",
        "http://127.0.0.1:1/small",
    ]
