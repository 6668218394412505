"""``bench/run`` / ``python -m bench.compare``: the options, one run (measure, write the JSON,
render the report), or ``--render`` to render a saved JSON again."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .constants import CREDPROXY, NGINX, RESULTS, WRK
from .counterparts import start_idp, start_upstream
from .environment import environment
from .measuring import measure_all
from .report import render, soak_rss
from .results import Results, Settings
from .subjects import Subject, available
from .workspace import Bench

DEFAULTS = Settings()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run", description="credproxy against nginx, Envoy and mitmproxy."
    )
    parser.add_argument(
        "--duration", type=int, default=DEFAULTS.duration, help="seconds per wrk point"
    )
    parser.add_argument(
        "--warmup", type=int, default=DEFAULTS.warmup, help="seconds of warm-up per path"
    )
    parser.add_argument("--connections", type=int, default=DEFAULTS.connections)
    parser.add_argument("--wrk-threads", type=int, default=DEFAULTS.wrk_threads)
    parser.add_argument(
        "--token-ttl", type=int, default=DEFAULTS.token_ttl, help="IdP token lifetime (s)"
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    parser.add_argument("--only", default="", help="comma-separated keys, e.g. direct,cp-dpop")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULTS.rounds,
        help="measure every path this often; best per point",
    )
    parser.add_argument(
        "--output", type=Path, help="the report (default bench/results/compare.md); JSON beside it"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: render this saved compare.json into its .md (or --output)",
    )
    return parser


def rerender(path: Path, output: Path | None) -> int:
    """Render a saved run's JSON into its report, without measuring."""
    output = output or path.with_suffix(".md")
    output.write_text(render(Results.load(path), soak_rss(RESULTS)))
    print(f"written: {output}", file=sys.stderr)
    return 0


def chosen(args: argparse.Namespace, workers: bool, fail: argparse.ArgumentParser) -> list[Subject]:
    """The paths ``--only`` names (direct always runs)."""
    wanted = available(workers)
    if not args.only:
        return wanted
    keys = {key.strip() for key in args.only.split(",")}
    unknown = keys - {s.key for s in wanted}
    if unknown:
        fail.error(f"unknown --only keys {sorted(unknown)}: {[s.key for s in wanted]}")
    return [s for s in wanted if s.key in keys or s.key == "direct"]


def main(argv: list[str] | None = None) -> int:
    options = parser()
    args = options.parse_args(argv)
    if args.render is not None:
        return rerender(args.render, args.output)
    output: Path = args.output or RESULTS / "compare.md"

    for tool in (Path(NGINX), Path(WRK), CREDPROXY):
        if not tool.exists():
            sys.exit(f"{tool} missing: run bench/run, which installs it (credproxy: scripts/setup)")
    run_help = subprocess.run(
        [str(CREDPROXY), "run", "--help"], capture_output=True, text=True, check=False
    )
    workers = "--workers" in run_help.stdout
    wanted = chosen(args, workers, options)
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        wrk_threads=args.wrk_threads,
        token_ttl=args.token_ttl,
        rounds=args.rounds,
        workers_supported=workers,
    )

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    started_at = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="credproxy-bench-"))
    workdir.chmod(0o755)
    bench = Bench(settings, workdir, pin=args.pin)
    if bench.client_cpus:
        os.sched_setaffinity(0, bench.client_cpus)  # wrk, upstream and IdP inherit it
    try:
        start_upstream(bench)
        start_idp(bench)
        env = environment(bench)
        rows = measure_all(bench, wanted)
    finally:
        bench.processes.stop_all()
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(bench.upload_dir, ignore_errors=True)
    results = Results(env, time.monotonic() - started_at, settings, rows)
    text = render(results, soak_rss(RESULTS))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    output.with_suffix(".json").write_text(results.to_json())
    print(text)
    print(f"\nwritten: {output} and {output.with_suffix('.json').name}", file=sys.stderr)
    return 0
