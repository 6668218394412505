"""Named loggers, the access log's writer, and the one function (called only by the CLI) that
installs handlers."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

server_log = logging.getLogger("credproxy.server")
credentials_log = logging.getLogger("credproxy.credentials")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


_GATHER_S = 0.05  # 5 ms: 0.88-0.92x of the tuned config's req/s; 50 ms: 0.93x (bench/run)


class AccessLog:
    """The access log, one line per request, kept off the event loop: the request's side only
    appends a line (already formatted, no ``LogRecord``) to a list; a writer thread takes the
    whole list, adds the time and level as the other log lines have them and writes it in one
    call, so a slow reader of stderr never blocks a request. Bounded: beyond ``max_pending``
    lines waiting, lines are dropped and counted (``dropped``). The writer starts in the
    process that first writes (workers fork after ``configure``); it gathers lines for 50 ms
    before each write, so a busy loop pays one wake-up (a handover of the GIL) per batch, not
    per line, and no lock or queue operation per line."""

    def __init__(self, max_pending: int = 10000) -> None:
        self.enabled = False
        self.dropped = 0
        self._json = False
        self._lock: threading.RLock | None = None  # stderr's handler lock: whole lines
        self._max_pending = max_pending
        # (time, line) waiting: appended at the end by the loop, taken from the front by the
        # writer (a slice and a slice deletion, each atomic under the GIL), never swapped out
        self._lines: list[tuple[float, str]] = []
        self._wake = threading.Event()  # set when lines wait; cleared by the writer
        self._closing = False
        self._writer: threading.Thread | None = None
        self._pid = 0  # the process whose writer thread runs; 0: none started in this one
        self._second = -1  # the text timestamp's second, formatted once per second
        self._stamp = ""
        # A forked worker has no writer thread (threads do not survive a fork): it starts its
        # own on its first line. Told by the fork, not by a getpid() call per line.
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._pid = 0

    def configure(self, *, enabled: bool, json_format: bool, lock: threading.RLock | None) -> None:
        self.enabled, self._json, self._lock = enabled, json_format, lock

    def write(self, line: str) -> None:
        if not self._pid:
            self._start()
        lines = self._lines
        if len(lines) < self._max_pending:
            lines.append((time.time(), line))
            if not self._wake.is_set():
                self._wake.set()
        else:
            self.dropped += 1

    def close(self) -> None:
        """Write what is waiting, then stop the writer (at exit)."""
        if self._writer is not None and self._pid == os.getpid():
            self._closing = True
            self._wake.set()
            self._writer.join(5)
            self._writer = None

    def _start(self) -> None:
        self._pid = os.getpid()
        self._lines, self._wake, self._closing = [], threading.Event(), False  # a fork's own
        self._writer = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        told = 0  # drops already reported
        wake = self._wake
        while True:
            wake.wait()
            if not self._closing:
                time.sleep(_GATHER_S)  # let a burst gather: one write, one wake-up for many
            wake.clear()
            lines = self._lines
            taken = len(lines)
            batch = lines[:taken]
            del lines[:taken]  # what the loop appended meanwhile stays for the next batch
            if batch:
                self._emit("".join([self._format(at, line) for at, line in batch]))
            if self.dropped > told:
                server_log.warning(
                    "access log: %d line(s) dropped, %d in all: stderr is not read fast enough",
                    self.dropped - told,
                    self.dropped,
                )
                told = self.dropped
            if self._closing and not self._lines:
                return

    def _emit(self, text: str) -> None:
        try:
            if self._lock is not None:
                with self._lock:
                    sys.stderr.write(text)
                    sys.stderr.flush()
            else:
                sys.stderr.write(text)
                sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr gone: nothing to tell it with

    def _format(self, at: float, line: str) -> str:
        if self._json:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at))
            entry = {"ts": f"{stamp}.{int(at * 1000) % 1000:03d}Z", "level": "info",
                     "logger": "credproxy.access", "msg": line}  # fmt: skip
            return json.dumps(entry, separators=(",", ":")) + "\n"
        second = int(at)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int(at * 1000) % 1000:03d} INFO credproxy.access {line}\n"


ACCESS = AccessLog()


def configure(*, fmt: str = "text", level: str = "info", access: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("credproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    ACCESS.configure(
        enabled=access and root.isEnabledFor(logging.INFO),
        json_format=fmt == "json",
        lock=handler.lock,
    )
