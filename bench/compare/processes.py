"""Starting the bench's processes and stopping each by its PID; loopback HTTP probes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


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
        """Start ``argv`` in its own session, output to ``<logdir>/<name>.log``, pinned to
        ``cpus`` when given."""
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
                start_new_session=True,  # a Ctrl-C reaches the bench only; it stops the rest
                preexec_fn=pin,  # noqa: PLW1509 - no threads here
            )
        finally:
            log.close()
        self.running.append((name, process))
        return process

    def log(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` of a process's output."""
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
    poll_s: float = 0.1,
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
        time.sleep(poll_s)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s ({last})")
