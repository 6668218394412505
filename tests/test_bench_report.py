"""The bench report is rendered from the JSON alone: the committed compare.json renders into the
committed compare.md, and a run's results survive the trip through JSON."""

from __future__ import annotations

import json
from dataclasses import replace

from bench.compare.cli import main
from bench.compare.constants import RESULTS
from bench.compare.report import render, soak_rss
from bench.compare.results import Load, Results, Row, Settings, Upload

COMMITTED_JSON = RESULTS / "compare.json"
COMMITTED_MD = RESULTS / "compare.md"


def _without_soak(text: str) -> list[str]:
    # the soak line comes from soak.md, which bench/soak.py rewrites on its own schedule
    return [line for line in text.splitlines() if not line.startswith("| RSS flat")]


def _load(rps: float, p50_us: float, *, cpu_us: float | None = 100.0, other: float = 0.0) -> Load:
    return Load(
        50, int(rps * 5), 5.0, rps, p50_us, p50_us * 2, 0, 0, cpu_us, 1.0, 60_000_000, other
    )


def _row(key: str, label: str, rps: float, **extra: object) -> Row:
    row = Row(key, label, small_c1=_load(rps / 20, 200), small_c50=_load(rps, 5000))
    row.big_c50 = _load(rps / 10, 50_000)
    return replace(row, **extra)  # type: ignore[arg-type]


def test_the_committed_json_renders_into_the_committed_report():
    """compare.md is what rendering compare.json gives, so the report can be re-rendered (and
    its wording changed) without measuring again."""
    results = Results.load(COMMITTED_JSON)
    rendered = render(results, soak_rss(RESULTS))
    assert _without_soak(rendered) == _without_soak(COMMITTED_MD.read_text())


def test_the_rendered_report_has_the_sections_and_figures_the_readme_quotes():
    """The README's Performance excerpt (req/s, ratios, CPU µs/req, instructions per request) is
    found in the report rendered from the committed JSON."""
    rendered = render(Results.load(COMMITTED_JSON))
    for section in (
        "## Absolute",
        "## Ratios",
        "## Instructions per request",
        "## Targets (issues 7 and 23)",
        "## Notes",
    ):
        assert f"\n{section}\n" in rendered
    assert "| credproxy bearer (token cache) | 16,863 |" in rendered
    assert "| nginx reverse proxy, static header | 0.95× | 1.00× | 75.59× | 3.13× |" in rendered
    assert "| credproxy DPoP per request | 597,868 | 2.13× | Python interpreter 284k (48%) · " in (
        rendered
    )
    assert "| RSS flat (±5 %) over 10 min | — | run `bench/soak.py` |" in rendered


def test_render_option_rewrites_the_report_from_the_json(tmp_path):
    """``python -m bench.compare --render JSON`` measures nothing and writes the .md beside the
    JSON (or to --output)."""
    copy = tmp_path / "compare.json"
    copy.write_text(COMMITTED_JSON.read_text())
    assert main(["--render", str(copy)]) == 0
    assert (tmp_path / "compare.md").read_text().startswith("# credproxy vs nginx, Envoy")
    assert main(["--render", str(copy), "--output", str(tmp_path / "other.md")]) == 0
    assert (tmp_path / "other.md").read_text() == (tmp_path / "compare.md").read_text()


def test_results_survive_the_json_round_trip():
    """Rows (with their loads and upload) and the run's settings come back from JSON equal."""
    upload = Upload(201, 3.1, 1024**3, 67_000_000, 68_000_000)
    rows = [_row("cp-bearer", "credproxy bearer", 7000.0, upload=upload, metrics=["a 1"])]
    settings = Settings(duration=3, rounds=1, token_ttl=20, workers_supported=False)
    results = Results({"date": "today"}, 12.5, settings, rows)
    assert Results.from_json(results.to_json()) == results


def test_a_file_without_settings_gets_the_defaults_and_what_its_rows_show():
    """compare.json written before settings were stored: rounds and connections are read from
    the rows, the rest were the defaults of the time."""
    raw = json.loads(COMMITTED_JSON.read_text())
    del raw["settings"]  # as files from before settings were stored
    settings = Results.from_json(json.dumps(raw)).settings
    assert settings == Settings(rounds=2, connections=50)
    assert settings.refresh_ahead_s == 2 and settings.refresh_window_s == 8


def test_a_disturbed_row_is_marked_once():
    """A row run while other processes used > 0.1 core is marked †, also when an older file
    stored the mark in the label already."""
    disturbed = _row("nginx", "nginx", 20000.0)
    disturbed.small_c50 = _load(20000.0, 5000, other=0.5)
    for label in ("nginx", "nginx †"):
        results = Results({}, 1.0, Settings(), [replace(disturbed, label=label)])
        rendered = render(_with_env(results))
        assert "| nginx † | 20,000 |" in rendered and "† †" not in rendered
        assert "**rows marked † were disturbed (> 0.1 core)**" in rendered


def test_a_failed_path_is_reported_with_its_error_and_log():
    """A failed path gets a "failed:" row and a note with its log tail; the others render."""
    failed = Row("envoy", "Envoy", error="RuntimeError: exited with 1\nmore", log_tail="boom")
    results = Results({}, 1.0, Settings(), [_row("nginx", "nginx", 20000.0), failed])
    rendered = render(_with_env(results))
    assert "| Envoy | failed: RuntimeError: exited with 1 |" in rendered
    assert "- **Envoy failed**: RuntimeError: exited with 1" in rendered
    assert "  ```\n  boom\n  ```" in rendered


def _with_env(results: Results) -> Results:
    keys = ("date", "machine", "credproxy", "python", "nginx", "envoy", "mitmproxy", "wrk")
    return replace(results, environment={**{k: "?" for k in keys}, "pinning": "none"})
