"""Command line: ``credproxy run | check-config | schema | demo``.

Exit codes: 0 success, 1 invalid configuration or failed start, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__, config, config_file
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
    check = commands.add_parser("check-config", help="validate a config file (exit 0/1)")
    check.add_argument("file", type=Path, metavar="FILE")
    commands.add_parser("schema", help="print the config's JSON Schema")
    commands.add_parser("demo", help="a scripted tour that needs no external service")
    args = parser.parse_args(argv)

    if args.command == "schema":
        print(json.dumps(config_file.json_schema(), indent=2))
        return 0
    if args.command == "demo":
        from .demo.tour import main as demo_main

        return demo_main()
    path: Path = args.file if args.command == "check-config" else args.config
    try:
        loaded = config_file.load(path)
    except ConfigError as exc:
        print(f"credproxy: {path}: {len(exc.errors)} error(s):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    for note in config_file.warnings(loaded):
        print(f"credproxy: warning: {note}", file=sys.stderr)
    if args.command == "check-config":
        print(f"{path}: valid ({len(loaded.routes)} route(s), {len(loaded.issuers)} issuer(s))")
        return 0
    return _run(loaded)


def _run(loaded: config.Config) -> int:
    from . import log, server

    log.configure(fmt=loaded.log.format, level=loaded.log.level, access=loaded.log.access)
    try:
        server.run(loaded)
    except CredproxyError as exc:
        log.server_log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
