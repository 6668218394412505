"""The audit trail: one JSON line per credential event, carrying fingerprints, never values.

A writer thread does the file I/O, so a slow disk never blocks the request path. Its queue is
bounded: an event beyond it is dropped, counted (``on_drop``, a metric) and logged — never
silently. ``reopen()`` (SIGUSR1) has the writer reopen the file after logrotate moved it.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import IO, Any

from .errors import StartError
from .log import server_log

_DROP_LOG_INTERVAL_S = 10.0


class Audit:
    """Appends events to a file, or writes them to stdout (``-``). ``aclose()`` writes what is
    queued, then closes the file."""

    def __init__(self, file: str = "-", *, queue_size: int = 10000) -> None:
        self.file = file
        self._stream = self._open()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(queue_size)
        self._reopen = threading.Event()
        self.dropped = 0
        self._drops_logged_at = 0.0
        self.on_drop: Callable[[], None] | None = None
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()

    def _open(self) -> IO[str]:
        if self.file == "-":
            return sys.stdout
        try:
            return open(self.file, "a", encoding="utf-8")  # noqa: SIM115 - closed by aclose
        except OSError as exc:
            raise StartError(
                f"audit.file: cannot append to {self.file}: {exc.strerror}; mount a writable "
                "volume there or use '-' for stdout"
            ) from None

    def emit(self, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event, "id": uuid.uuid4().hex, **fields}
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
