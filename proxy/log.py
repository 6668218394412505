"""Named loggers, the access log's writer, and the one function (called only by the CLI) that
installs handlers."""

from __future__ import annotations

import json
import logging
import os
import queue
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


_GATHER_S = 0.005


class AccessLog:
    """The access log, one line per request, kept off the event loop: the request's side only
    hands a line (already formatted, no ``LogRecord``) to a queue; a writer thread adds the
    time and level as the other log lines have them and writes what has gathered in one call,
    so a slow reader of stderr never blocks a request. Bounded: beyond ``max_pending`` lines
    waiting, lines are dropped and counted (``dropped``). The writer starts in the process
    that first writes (workers fork after ``configure``); it gathers lines for a few
    milliseconds before each write, so a busy loop pays one wake-up per batch, not per line."""

    def __init__(self, max_pending: int = 10000) -> None:
        self.enabled = False
        self.dropped = 0
        self._json = False
        self._lock: threading.RLock | None = None  # stderr's handler lock: whole lines
        self._max_pending = max_pending
        self._queue: queue.SimpleQueue[tuple[float, str] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._pid = 0

    def configure(self, *, enabled: bool, json_format: bool, lock: threading.RLock | None) -> None:
        self.enabled, self._json, self._lock = enabled, json_format, lock

    def write(self, line: str) -> None:
        if self._pid != os.getpid():
            self._start()
        if self._queue.qsize() < self._max_pending:
            self._queue.put((time.time(), line))
        else:
            self.dropped += 1

    def close(self) -> None:
        """Write what is queued, then stop the writer (at exit)."""
        if self._writer is not None and self._pid == os.getpid():
            self._queue.put(None)
            self._writer.join(5)
            self._writer = None

    def _start(self) -> None:
        self._pid = os.getpid()
        self._queue = queue.SimpleQueue()  # a forked child's own
        self._writer = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        pending = self._queue
        told = 0  # drops already reported
        while True:
            item = pending.get()
            time.sleep(_GATHER_S)  # let a burst gather: one write and one wake-up for many lines
            batch = [item]
            while item is not None and not pending.empty():
                item = pending.get_nowait()
                batch.append(item)
            text = "".join(self._format(*entry) for entry in batch if entry is not None)
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
            if self.dropped > told:
                server_log.warning(
                    "access log: %d line(s) dropped, %d in all: stderr is not read fast enough",
                    self.dropped - told,
                    self.dropped,
                )
                told = self.dropped
            if item is None:
                return

    def _format(self, at: float, line: str) -> str:
        if self._json:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at))
            entry = {"ts": f"{stamp}.{int(at * 1000) % 1000:03d}Z", "level": "info",
                     "logger": "credproxy.access", "msg": line}  # fmt: skip
            return json.dumps(entry, separators=(",", ":")) + "\n"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
        return f"{stamp},{int(at * 1000) % 1000:03d} INFO credproxy.access {line}\n"


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
