"""Command line: ``credproxy run | check-config | schema | inventory | evidence | demo``.

Exit codes: 0 success, 1 invalid configuration, failed start, a failed evidence check or (with
``--strict``) a secret file others may read or a config others may write, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import __version__, config, config_file, file_modes
from .errors import ConfigError, CredproxyError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="credproxy",
        description="Sidecar credential proxy: injects short-lived, sender-bound credentials.",
    )
    parser.add_argument("--version", action="version", version=f"credproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="serve with a config file")
    run.add_argument("-c", "--config", type=Path, required=True, metavar="FILE")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        choices=range(1, 65),
        metavar="N",
        help="worker processes sharing the listeners (SO_REUSEPORT); default 1",
    )
    check = commands.add_parser("check-config", help="validate a config file (exit 0/1)")
    check.add_argument("file", type=Path, metavar="FILE")
    for command in (run, check):
        command.add_argument(
            "--strict",
            action="store_true",
            help="refuse (exit 1) when a key, secret or token file is readable by others or the "
            "config writable by others, instead of warning",
        )
    commands.add_parser("schema", help="print the config's JSON Schema")
    listing = commands.add_parser(
        "inventory", help="list the credentials held (live from the admin listener) or configured"
    )
    listing.add_argument("-c", "--config", type=Path, required=True, metavar="FILE")
    listing.add_argument("--json", action="store_true", help="JSON instead of a Markdown table")
    evidence = commands.add_parser(
        "evidence", help="summarize an audit log for an auditor, with checks (exit 1 on a FAIL)"
    )
    evidence.add_argument("--audit", type=Path, required=True, metavar="FILE")
    evidence.add_argument("--since", metavar="WHEN", help="24h, 30m, 7d or an ISO 8601 time")
    evidence.add_argument(
        "-c", "--config", type=Path, metavar="FILE", help="check each use against this policy"
    )
    evidence.add_argument("--format", choices=("markdown", "json"), default="markdown")
    commands.add_parser("demo", help="a scripted tour that needs no external service")
    args = parser.parse_args(argv)

    if args.command == "schema":
        print(json.dumps(config_file.json_schema(), indent=2))
        return 0
    if args.command == "demo":
        from .demo.tour import main as demo_main

        return demo_main()
    if args.command == "evidence":
        return _evidence(args)
    path: Path = args.file if args.command == "check-config" else args.config
    loaded = _load(path)
    if loaded is None:
        return 1
    if args.command == "inventory":
        return _inventory(loaded, as_json=args.json)
    exposed = file_modes.exposed(loaded, path)
    if args.strict and exposed:
        print(f"credproxy: {path}: refused (--strict):", file=sys.stderr)
        for line in exposed:
            print(f"  {line}", file=sys.stderr)
        return 1
    for note in config_file.warnings(loaded) + exposed:
        print(f"credproxy: warning: {note}", file=sys.stderr)
    if args.command == "check-config":
        print(f"{path}: valid ({len(loaded.routes)} route(s), {len(loaded.issuers)} issuer(s))")
        return 0
    return _run(loaded, path, workers=args.workers)


def _load(path: Path) -> config.Config | None:
    try:
        return config_file.load(path)
    except ConfigError as exc:
        print(f"credproxy: {path}: {len(exc.errors)} error(s):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return None


def _inventory(loaded: config.Config, *, as_json: bool) -> int:
    """Live from the running sidecar's admin listener when it answers, else from the config."""
    from . import inventory

    entries, live = inventory.from_config(loaded), False
    if loaded.admin:
        address = config.parse_address(loaded.admin)
        url = f"http://{address.host}:{address.port}/credentials"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - http to admin
                entries, live = json.load(response)["credentials"], True
        except (OSError, ValueError, KeyError) as exc:
            print(f"credproxy: {url} not answering ({exc}); listing the config", file=sys.stderr)
    if as_json:
        print(json.dumps({"live": live, "credentials": entries}, indent=2))
    else:
        print(inventory.markdown(entries, live=live), end="")
    return 0


def _evidence(args: argparse.Namespace) -> int:
    from . import evidence

    now = time.time()
    policy = None
    if args.config is not None:
        policy = _load(args.config)
        if policy is None:
            return 1
    try:
        since = evidence.parse_since(args.since, now=now) if args.since else None
        with args.audit.open(encoding="utf-8", errors="replace") as lines:
            report = evidence.build(lines, since=since, config=policy)
    except (OSError, ValueError) as exc:
        print(f"credproxy: evidence: {exc}", file=sys.stderr)
        return 1
    source = str(args.audit)
    if args.format == "json":
        print(json.dumps(evidence.as_json(report, source=source, now=now), indent=2))
    else:
        print(evidence.markdown(report, source=source, now=now), end="")
    return 1 if any(status == "FAIL" for status, _, _ in report.checks(now)) else 0


def _run(loaded: config.Config, path: Path, *, workers: int) -> int:
    if workers > 1:  # before anything imports prometheus_client: workers share their metrics
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="credproxy-metrics-")
    from . import log, server
    from . import workers as supervisor

    log.configure(fmt=loaded.log.format, level=loaded.log.level, access=loaded.log.access)
    try:
        if workers > 1:
            return supervisor.supervise(loaded, path, workers)
        server.run(loaded, path)
    except CredproxyError as exc:
        log.server_log.error("cannot start: %s", exc)
        return 1
    finally:
        if workers > 1:
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
