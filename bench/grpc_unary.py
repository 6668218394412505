"""gRPC unary calls/s through credproxy and through Envoy, against the same calls straight to the
server, in one run. Prints a Markdown table.

    PYTHONPATH=. python bench/grpc_unary.py [--calls 40000] [--concurrency 32] [--rounds 2]

The harness is compiled, so that a proxy and not the harness bounds each row: ``h2load``
(nghttp2, Debian ``nghttp2-client``) sends gRPC unary calls (``POST``, ``application/grpc``,
``te: trailers``, a 64-byte message behind its 5-byte prefix), ``--concurrency`` streams in
flight on one connection; the server is ``bench/grpc_harness`` (grpc-go, built here with ``go``),
which echoes each call and counts those carrying the static key: after each run the bench
checks that the server accepted every call h2load counted and refused none. Both proxies get
the key from a route, h2c in and out: Envoy (bench/run installs it, ``--concurrency 1``) with
``request_headers_to_add``, credproxy (one process) with a ``static`` issuer and ``inject:
header``. Before measuring, 200 calls through each path from the harness's grpc-go client and
one from grpcio check the answers byte for byte.

With two or more CPUs the proxy runs on the last one and the harness (h2load and the server) on
the others, so a proxy's calls/s is what one core of it serves. Per path, from /proc: the
proxy's CPU time per call (its process tree), "per core" = 10⁶ / that; how busy the proxy's
core and the harness's cores were; and the machine's other load (busy time not spent by the
bench's processes, in cores). A row is harness-bound when its proxy core was not busy while the
harness's was: the table says so. Each path runs ``--rounds`` times, paths taking turns; the
best round is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from bench.compare.constants import DISTURBED_CORES, ENVOY
from bench.compare.processes import Processes, free_port, wait_ready
from bench.compare.sampling import cpu_seconds, process_tree, system_busy_seconds
from bench.compare.templates import render_template

HERE = Path(__file__).resolve().parent
HARNESS_SOURCE = HERE / "grpc_harness"
HARNESS = HERE / ".bin" / "grpc-harness"
SERVICE = "bench.Echo"
HEADER, KEY = "x-api-key", "bench-static-key-0123456789"
MESSAGE = b"x" * 64
BUSY = 0.9  # a core at least this busy bounded its side


@dataclass
class Row:
    name: str
    calls_per_s: float
    proxy_us: float | None  # proxy CPU µs per call
    proxy_busy: float | None  # of its core
    harness_busy: float  # of the harness's cores
    other_cores: float  # other load on the machine meanwhile

    @property
    def per_core(self) -> float | None:
        return 1e6 / self.proxy_us if self.proxy_us else None

    @property
    def harness_bound(self) -> bool:
        return self.proxy_busy is not None and self.proxy_busy < BUSY <= self.harness_busy


def build_harness() -> Path:
    """``go build`` of bench/grpc_harness when the binary is missing or older than its source."""
    sources = [*HARNESS_SOURCE.glob("*.go"), HARNESS_SOURCE / "go.mod", HARNESS_SOURCE / "go.sum"]
    newest = max(path.stat().st_mtime for path in sources)
    if not HARNESS.exists() or HARNESS.stat().st_mtime < newest:
        go = shutil.which("go") or "go"
        HARNESS.parent.mkdir(exist_ok=True)
        subprocess.run([go, "build", "-o", str(HARNESS), "."], cwd=HARNESS_SOURCE, check=True)
    return HARNESS


def _wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):  # 30 s
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before port {port} opened")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


def _server_counts(server_port: int) -> tuple[int, int]:
    out = subprocess.run(
        [str(HARNESS), "stats", "-target", f"127.0.0.1:{server_port}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    accepted, refused = out.split()
    return int(accepted), int(refused)


def _check_answers(target: str, direct: bool) -> None:
    """200 calls from grpc-go and one from grpcio, answers compared byte for byte."""
    key = ["-header", HEADER, "-value", KEY] if direct else []
    out = subprocess.run(
        [str(HARNESS), "load", "-target", target, "-calls", "200", "-concurrency", "8", *key],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out)
    if result["failed"]:
        raise RuntimeError(
            f"{target}: {result['failed']} calls failed: {result.get('first_error')}"
        )
    with grpc.insecure_channel(target) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary", lambda b: b, lambda b: b)
        metadata = ((HEADER, KEY),) if direct else None
        if unary(MESSAGE, metadata=metadata, timeout=10) != MESSAGE:
            raise RuntimeError(f"{target}: grpcio got another answer")


def _h2load(
    target: str, calls: int, concurrency: int, cpus: set[int] | None, body: Path, key: bool
) -> tuple[float, int]:
    """h2load's calls/s and its count of 2xx answers; ``key``: the call carries the key itself
    (the direct path)."""
    h2load = shutil.which("h2load") or "h2load"
    argv = [h2load, "-n", str(calls), "-c", "1", "-m", str(concurrency), "-d", str(body)]
    argv += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    if key:
        argv += ["-H", f"{HEADER}: {KEY}"]
    argv.append(f"http://{target}/{SERVICE}/Unary")
    run = subprocess.run(
        argv,
        capture_output=True,
        check=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,  # noqa: PLW1509
    )
    out = run.stdout.decode()
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    ok = re.search(r"status codes: (\d+) 2xx", out)
    if rate is None or ok is None:
        raise RuntimeError(f"h2load said: {out[-500:]}")
    return float(rate[1]), int(ok[1])


def measure(
    name: str,
    target: str,
    proxy: list[int],
    server: subprocess.Popen[bytes],
    server_port: int,
    args: argparse.Namespace,
    layout: tuple[set[int] | None, set[int] | None],
    body: Path,
) -> Row:
    proxy_cpus, harness_cpus = layout
    proxy_tree = [pid for pid in proxy for pid in process_tree(pid)]
    accepted, refused = _server_counts(server_port)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = (cpu_seconds(proxy_tree), cpu_seconds([server.pid]), system_busy_seconds())
    started = time.perf_counter()
    rate, ok = _h2load(target, args.calls, args.concurrency, harness_cpus, body, not proxy)
    wall = time.perf_counter() - started
    after = (cpu_seconds(proxy_tree), cpu_seconds([server.pid]), system_busy_seconds())
    spent = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = (spent.ru_utime - children.ru_utime) + (spent.ru_stime - children.ru_stime)
    now_accepted, now_refused = _server_counts(server_port)
    if ok != args.calls or now_accepted - accepted != ok or now_refused != refused:
        raise RuntimeError(
            f"{name}: h2load counted {ok} of {args.calls}; the server accepted "
            f"{now_accepted - accepted} and refused {now_refused - refused}"
        )
    proxy_s, server_s = after[0] - before[0], after[1] - before[1]
    harness_cores = len(harness_cpus) if harness_cpus else os.cpu_count() or 1
    other = (after[2] - before[2]) - proxy_s - server_s - client
    return Row(
        name,
        rate,
        proxy_s / ok * 1e6 if proxy else None,
        proxy_s / wall if proxy else None,
        (server_s + client) / wall / harness_cores,
        max(other, 0.0) / wall,
    )


def _credproxy_config(tmp: Path, port: int, admin: int, server_port: int) -> str:
    key_file = tmp / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{admin}",
        "callers": {"bench": {"uid": os.getuid()}},
        "issuers": {"key": {"type": "static", "secret_file": str(key_file)}},
        "routes": [
            {
                "name": "grpc",
                "path_prefix": f"/{SERVICE}/",
                "strip_prefix": False,
                "upstream": f"http://127.0.0.1:{server_port}",
                "upstream_protocol": "h2c",
                "credential": {"issuer": "key", "inject": "header", "header": HEADER},
                "allow": [{"callers": ["bench"]}],
            }
        ],
        "audit": {"file": str(tmp / "audit.jsonl")},
        "log": {"format": "text", "level": "warning", "access": False},
    }
    return yaml.safe_dump(config, sort_keys=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-pin", action="store_true", help="let the processes share the CPUs")
    args = parser.parse_args()
    missing = [
        what
        for what, found in (
            ("h2load (apt-get install nghttp2-client)", shutil.which("h2load")),
            ("Envoy (bench/run installs it)", ENVOY.exists()),
            ("go, to build bench/grpc_harness", shutil.which("go") or HARNESS.exists()),
        )
        if not found
    ]
    if missing:
        print(f"bench/grpc_unary.py: needs {', '.join(missing)}", file=sys.stderr)
        return 1
    cpus = os.sched_getaffinity(0)
    layout: tuple[set[int] | None, set[int] | None] = (None, None)
    if not args.no_pin and len(cpus) >= 2:
        layout = ({max(cpus)}, cpus - {max(cpus)})
    harness = build_harness()
    rows: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="credproxy-grpc-bench-") as tmp_name:
        tmp = Path(tmp_name)
        processes = Processes(tmp)
        try:
            server_port = free_port()
            server = processes.start(
                "server",
                [str(harness), "serve", "-listen", f"127.0.0.1:{server_port}"]
                + ["-header", HEADER, "-value", KEY],
                cpus=layout[1],
            )
            _wait_port(server_port, server)
            envoy_port = free_port()
            (tmp / "envoy.yaml").write_text(
                render_template(
                    HERE / "grpc_envoy.yaml",
                    port=envoy_port,
                    upstream_port=server_port,
                    service=SERVICE,
                    header=HEADER,
                    key=KEY,
                )
            )
            envoy = processes.start(
                "envoy",
                [str(ENVOY), "-c", str(tmp / "envoy.yaml"), "--concurrency", "1"]
                + ["--disable-hot-restart", "--log-level", "warn"],
                cpus=layout[0],
            )
            _wait_port(envoy_port, envoy)
            port, admin = free_port(), free_port()
            (tmp / "credproxy.yaml").write_text(_credproxy_config(tmp, port, admin, server_port))
            credproxy = processes.start(
                "credproxy",
                [sys.executable, "-m", "proxy", "run", "-c", str(tmp / "credproxy.yaml")],
                cpus=layout[0],
            )
            wait_ready(f"http://127.0.0.1:{admin}/readyz", [credproxy])
            paths = {
                "grpc-go server direct (harness ceiling)": (f"127.0.0.1:{server_port}", []),
                "through Envoy": (f"127.0.0.1:{envoy_port}", [envoy.pid]),
                "through credproxy": (f"127.0.0.1:{port}", [credproxy.pid]),
            }
            for target, proxy in paths.values():
                _check_answers(target, direct=not proxy)
            body = tmp / "call.bin"  # the message behind gRPC's 5-byte prefix
            body.write_bytes(b"\0" + len(MESSAGE).to_bytes(4, "big") + MESSAGE)
            for _ in range(args.rounds):
                for name, (target, proxy) in paths.items():
                    row = measure(name, target, proxy, server, server_port, args, layout, body)
                    if name not in rows or row.calls_per_s > rows[name].calls_per_s:
                        rows[name] = row
        finally:
            processes.stop_all()
    print(report(rows, args, layout))
    return 0


def report(
    rows: dict[str, Row], args: argparse.Namespace, layout: tuple[set[int] | None, ...]
) -> str:
    direct = next(iter(rows.values()))
    envoy = rows["through Envoy"]
    pinned = (
        f"proxy on CPU {sorted(layout[0])}, harness on {sorted(layout[1] or ())}"
        if layout[0]
        else "unpinned"
    )
    lines = [
        f"# gRPC unary calls/s ({args.calls} calls, {args.concurrency} in flight on one "
        f"connection, {len(MESSAGE)} B; {pinned}; best of {args.rounds})",
        "",
        "| path | calls/s | × direct | × Envoy | proxy CPU µs/call | per core calls/s "
        "| per core × Envoy | proxy core busy | harness busy | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        proxied = row.proxy_us is not None
        per_core = row.per_core or 0.0
        envoy_core = envoy.per_core or 1.0
        lines.append(
            f"| {row.name}{' (harness-bound)' if row.harness_bound else ''} "
            f"| {row.calls_per_s:,.0f} | {row.calls_per_s / direct.calls_per_s:.2f}× "
            f"| {row.calls_per_s / envoy.calls_per_s:.2f}× "
            f"| {f'{row.proxy_us:.0f}' if proxied else '—'} "
            f"| {f'{per_core:,.0f}' if proxied else '—'} "
            f"| {f'{per_core / envoy_core:.2f}×' if proxied else '—'} "
            f"| {f'{row.proxy_busy:.0%}' if row.proxy_busy is not None else '—'} "
            f"| {row.harness_busy:.0%} | {row.other_cores:.2f} |"
        )
    if any(row.other_cores > DISTURBED_CORES for row in rows.values()):
        lines += [
            "",
            f"Other processes used more than {DISTURBED_CORES} cores during the run: the "
            "cores were shared, so calls/s moves with them; CPU µs per call and per core much "
            "less.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
