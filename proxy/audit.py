"""The audit trail: one JSON line per credential event, carrying fingerprints, never values."""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import IO, Any

from .errors import StartError
from .log import server_log


class Audit:
    """Writes events to a file (appended) or stdout. ``aclose()`` closes the file."""

    def __init__(self, file: str = "-") -> None:
        try:
            self._stream: IO[str] = (
                sys.stdout if file == "-" else open(file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            )
        except OSError as exc:
            raise StartError(
                f"audit.file: cannot append to {file}: {exc.strerror}; mount a writable volume "
                "there or use '-' for stdout"
            ) from None
        self._owned = file != "-"

    def emit(self, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event, "id": uuid.uuid4().hex, **fields}
        try:
            self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._stream.flush()
        except OSError as exc:
            server_log.error("audit write failed (%s); event %s lost", exc.strerror, event)

    def aclose(self) -> None:
        if self._owned and not self._stream.closed:
            self._stream.close()
