"""The audit trail: one JSON line per credential event, carrying fingerprints, never values.

A writer thread does the file I/O, so a slow disk never blocks the request path. Its queue is
bounded: an event beyond it is dropped, counted (``on_drop``, a metric) and logged — never
silently. ``reopen()`` (SIGUSR1) has the writer reopen the file after logrotate moved it.

The file is opened without following a symlink at its path (one planted there would send the
trail elsewhere, or have credproxy append to a file of the attacker's choosing), must be a
regular file, and is created with ``file_mode`` (0600); an existing file is narrowed to it.

Each writer's first event is ``audit.started``, naming the key its fingerprints are made with
(``fingerprint_key``, an id, and its scope: the deployment, or this run only — ``secret``); every
event names its run's ``instance``.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import IO, Any

from ..errors import StartError
from ..log import server_log
from ..secret import INSTANCE, key_id, key_scope

_DROP_LOG_INTERVAL_S = 10.0


class Audit:
    """Appends events to a file, or writes them to stdout (``-``). ``aclose()`` writes what is
    queued, then closes the file."""

    def __init__(self, file: str = "-", *, queue_size: int = 10000, file_mode: int = 0o600) -> None:
        self.file = file
        self.file_mode = file_mode
        self._stream = self._open()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(queue_size)
        self._reopen = threading.Event()
        self.dropped = 0
        self._drops_logged_at = 0.0
        self.on_drop: Callable[[], None] | None = None
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()
        self.emit(
            "audit.started",
            pid=os.getpid(),
            fingerprints="hmac-sha256",
            fingerprint_key=key_id(),  # equal ids: fingerprints compare
            fingerprint_key_scope=key_scope(),  # deployment (across restarts) or run
        )

    def _open(self) -> IO[str]:
        if self.file == "-":
            return sys.stdout
        # O_NONBLOCK: a FIFO planted at the path fails at once instead of blocking the start
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.file, flags | os.O_NONBLOCK, self.file_mode)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StartError(
                    f"audit.file: {self.file} is a symbolic link, which credproxy does not follow "
                    "(a planted link would send the audit trail elsewhere); name the file itself, "
                    "or '-' for stdout"
                ) from None
            raise StartError(
                f"audit.file: cannot append to {self.file}: {exc.strerror}; mount a writable "
                "volume there or use '-' for stdout"
            ) from None
        try:
            self._check(fd)
        except BaseException:
            os.close(fd)
            raise
        return open(fd, "a", encoding="utf-8")  # noqa: SIM115 - closed by aclose

    def _check(self, fd: int) -> None:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StartError(f"audit.file: {self.file} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & ~self.file_mode:
            try:
                os.fchmod(fd, mode & self.file_mode)  # the open file: no path, no symlink
            except OSError as exc:
                server_log.warning(
                    "audit.file: %s has mode %04o, wider than audit.file_mode %04o, and cannot "
                    "be narrowed (%s); chmod %04o it",
                    self.file,
                    mode,
                    self.file_mode,
                    exc.strerror,
                    self.file_mode,
                )

    def emit(self, event: str, **fields: Any) -> None:
        record = {
            "ts": round(time.time(), 3),
            "event": event,
            "id": uuid.uuid4().hex,
            "instance": INSTANCE,  # the run; its audit.started names the fingerprint key
            **fields,
        }
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._dropped(event)

    def _dropped(self, event: str) -> None:
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop()
        now = time.monotonic()
        if now - self._drops_logged_at > _DROP_LOG_INTERVAL_S:
            self._drops_logged_at = now
            server_log.error(
                "audit queue full (disk too slow?): event %s dropped, %d dropped so far",
                event,
                self.dropped,
            )

    def reopen(self) -> None:
        """Reopen the file before the next write (logrotate moved it; SIGUSR1)."""
        self._reopen.set()

    def _write_loop(self) -> None:
        while True:
            record = self._queue.get()
            batch = [record]
            while record is not None and not self._queue.empty():
                record = self._queue.get_nowait()
                batch.append(record)
            if self._reopen.is_set():
                self._reopen.clear()
                self._swap_stream()
            lines = "".join(
                json.dumps(r, separators=(",", ":")) + "\n" for r in batch if r is not None
            )
            try:
                self._stream.write(lines)
                self._stream.flush()
            except (OSError, ValueError) as exc:
                server_log.error("audit write failed (%s); %d event(s) lost", exc, len(batch))
            if record is None:
                return

    def _swap_stream(self) -> None:
        if self.file == "-":
            return
        try:
            stream = self._open()
        except StartError as exc:
            server_log.error("audit file not reopened, still writing the old one: %s", exc)
            return
        old, self._stream = self._stream, stream
        old.close()
        server_log.info("audit file %s reopened", self.file)

    def aclose(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        if self.file != "-" and not self._stream.closed:
            self._stream.close()
