"""Command line: ``credproxy run | check-config | schema | inventory | revoke | break-glass |
evidence | demo``.

Exit codes: 0 success, 1 invalid configuration, failed start, a failed evidence check, a
control request that was refused or not answered, or (with ``--strict``) a secret file
others may read or a config others may write; 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import file_modes, loader, model
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
        "inventory", help="list the credentials held (live from the control socket) or configured"
    )
    listing.add_argument("-c", "--config", type=Path, required=True, metavar="FILE")
    listing.add_argument("--json", action="store_true", help="JSON instead of a Markdown table")
    revoke = commands.add_parser(
        "revoke", help="replace, then revoke cached credentials (through the control socket)"
    )
    revoke.add_argument("-c", "--config", type=Path, required=True, metavar="FILE")
    revoke.add_argument("--issuer", metavar="I", help="only this issuer's credentials")
    revoke.add_argument("--route", metavar="R", help="only this route's credential")
    revoke.add_argument("--json", action="store_true", help="the control plane's JSON answer")
    glass = commands.add_parser(
        "break-glass",
        help="grant a time-boxed exception to a route's policy (through the control socket)",
    )
    glass.add_argument("-c", "--config", type=Path, required=True, metavar="FILE")
    glass.add_argument("--route", required=True, metavar="R")
    glass.add_argument("--caller", required=True, metavar="C", help="a name under callers")
    glass.add_argument("--methods", nargs="+", metavar="M", help="default: any method")
    glass.add_argument("--paths", nargs="+", metavar="GLOB", help="default: /**")
    glass.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                       help="15m, 2h, … up to control.break_glass.max_duration_s")  # fmt: skip
    glass.add_argument("--reason", required=True, help="why: audited with every use")
    evidence = commands.add_parser(
        "evidence", help="summarize an audit log for an auditor, with checks (exit 1 on a FAIL)"
    )
    evidence.add_argument("--audit", type=Path, required=True, metavar="FILE")
    evidence.add_argument("--since", metavar="WHEN", help="24h, 30m, 7d or an ISO 8601 time")
    evidence.add_argument(
        "-c", "--config", type=Path, metavar="FILE", help="check each use against this policy"
    )
    evidence.add_argument("--format", choices=("markdown", "json"), default="markdown")
    demo = commands.add_parser("demo", help="a scripted tour that needs no external service")
    demo.add_argument(
        "--spiffe",
        action="store_true",
        help="the SPIFFE mode, with a SPIRE server and agent (built by scripts/build-spire)",
    )
    args = parser.parse_args(argv)

    if args.command == "schema":
        print(json.dumps(loader.json_schema(), indent=2))
        return 0
    if args.command == "demo" and args.spiffe:
        from .demo.spiffe_tour import main as spiffe_demo

        return spiffe_demo()
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
    if args.command == "revoke":
        return _revoke(loaded, issuer=args.issuer, route=args.route, as_json=args.json)
    if args.command == "break-glass":
        return _break_glass(loaded, args)
    exposed = file_modes.exposed(loaded, path)
    if args.strict and exposed:
        print(f"credproxy: {path}: refused (--strict):", file=sys.stderr)
        for line in exposed:
            print(f"  {line}", file=sys.stderr)
        return 1
    for note in loader.warnings(loaded) + exposed:
        print(f"credproxy: warning: {note}", file=sys.stderr)
    if args.command == "check-config":
        print(f"{path}: valid ({len(loaded.routes)} route(s), {len(loaded.issuers)} issuer(s))")
        return 0
    return _run(loaded, path, workers=args.workers)


def _load(path: Path) -> model.Config | None:
    try:
        return loader.load(path)
    except ConfigError as exc:
        print(f"credproxy: {path}: {len(exc.errors)} error(s):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return None


def _control(loaded: model.Config, method: str, path: str, **kwargs: Any) -> Any:
    """The control plane's answer, or None after saying on stderr why there is none."""
    from .lifecycle import control_client

    try:
        return control_client.request(loaded, method, path, **kwargs)
    except control_client.ControlError as exc:
        print(f"credproxy: {exc}", file=sys.stderr)
        return None


def _inventory(loaded: model.Config, *, as_json: bool) -> int:
    """Live from the running sidecar's control plane when it answers, else from the model."""
    from .governance import inventory

    entries, live, grants = inventory.from_config(loaded), False, []
    if loaded.control.listen:
        answer = _control(loaded, "GET", "/credentials")
        if answer is not None:
            entries, live, grants = answer["credentials"], True, answer["break_glass"]
        else:
            print("credproxy: control plane not answering; listing the config", file=sys.stderr)
    if as_json:
        print(json.dumps({"live": live, "credentials": entries, "break_glass": grants}, indent=2))
        return 0
    print(inventory.markdown(entries, live=live), end="")
    for g in grants:
        print(
            f"\nBREAK-GLASS {g['id']}: route {g['route']} for caller {g['caller']} "
            f"({', '.join(g['methods'] or ['any method'])} {', '.join(g['paths'])}) until "
            f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(g['expires_at']))}, "
            f"{g['uses']} use(s): {g['reason']}"
        )
    return 0


def _revoke(loaded: model.Config, *, issuer: str | None, route: str | None, as_json: bool) -> int:
    query = {k: v for k, v in (("issuer", issuer), ("route", route)) if v is not None}
    answer = _control(loaded, "POST", "/credentials/revoke", query=query)
    if answer is None:
        return 1
    if as_json:
        print(json.dumps(answer, indent=2))
    else:
        for r in answer["revoked"]:
            note = {"joined": " (joined one in flight)", "recent": " (revoked recently)"}
            print(
                f"{r['issuer']} {r['credential']} {r['fingerprint']}: {r['outcome']}"
                + note.get(r["answered"], "")
            )
        if not answer["revoked"]:
            print("nothing cached to revoke")
    return 0


def _break_glass(loaded: model.Config, args: argparse.Namespace) -> int:
    wanted = {
        "route": args.route, "caller": args.caller, "for": args.duration,
        "reason": args.reason, "methods": args.methods, "paths": args.paths,
    }  # fmt: skip
    answer = _control(loaded, "POST", "/break-glass", body=wanted)
    if answer is None:
        return 1
    grant = answer["grant"]
    until = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(grant["expires_at"]))
    print(f"break-glass {grant['id']} granted on route {grant['route']} until {until}")
    return 0


def _evidence(args: argparse.Namespace) -> int:
    from .governance import evidence

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


def _run(loaded: model.Config, path: Path, *, workers: int) -> int:
    if workers > 1:  # before anything imports prometheus_client: workers share their metrics
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="credproxy-metrics-")
    from . import log
    from .audit import fingerprint_key
    from .lifecycle import process
    from .lifecycle import workers as supervisor

    log.configure(fmt=loaded.log.format, level=loaded.log.level, access=loaded.log.access)
    # before any credential is read and before workers fork: one key, every worker, every run
    fingerprint_key.install(loaded.audit.fingerprint_key_file, loaded.audit.file)
    try:
        if workers > 1:
            return supervisor.supervise(loaded, path, workers)
        process.run(loaded, path)
    except CredproxyError as exc:
        log.server_log.error("cannot start: %s", exc)
        return 1
    finally:
        log.ACCESS.close()
        if workers > 1:
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
