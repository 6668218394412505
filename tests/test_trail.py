"""audit/trail.py: the writer thread, its bounded queue and its failures (the file's opening,
modes and reopening are in test_audit.py)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from proxy.audit.trail import Audit
from proxy.secret import INSTANCE


class StalledStream:
    """A fault injector standing in for the audit file: the first write holding ``stall_on``
    blocks until ``release`` is set (a disk that stopped answering); ``failing`` makes every
    write raise."""

    def __init__(self, *, stall_on: str = "", failing: bool = False) -> None:
        self.stall_on = stall_on
        self.entered = threading.Event()
        self.failed = threading.Event()
        self.release = threading.Event()
        self.failing = failing
        self.text = ""
        self.closed = False

    def write(self, text: str) -> int:
        if self.failing:
            self.failed.set()
            raise OSError(28, "No space left on device")
        if self.stall_on in text and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10), "hang guard: the test never released the write"
        self.text += text
        return len(text)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def _events(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_events_are_json_lines_in_order_with_instance_and_unique_ids(tmp_path: Path):
    """Each emit becomes one JSON line, in emit order, after ``audit.started``, naming the
    instance; aclose writes everything queued before it returns."""
    path = tmp_path / "audit.jsonl"
    audit = Audit(str(path))
    for n in range(100):
        audit.emit("credential.used", n=n, fingerprint="abc123")
    audit.aclose()
    events = _events(path.read_text())
    assert events[0]["event"] == "audit.started"
    assert [e["n"] for e in events[1:]] == list(range(100))
    assert {e["instance"] for e in events} == {INSTANCE}
    assert len({e["id"] for e in events}) == len(events)


def test_a_full_queue_drops_counts_and_reports_without_blocking_the_caller(tmp_path, caplog):
    """While the disk stalls, events beyond the queue are dropped at once, counted, reported to
    ``on_drop`` and logged; the ones queued are written when the disk comes back."""
    stream = StalledStream(stall_on='"event":"first"')
    audit = Audit(str(tmp_path / "audit.jsonl"), queue_size=2)
    drops: list[None] = []
    audit.on_drop = lambda: drops.append(None)
    real, audit._stream = audit._stream, stream  # type: ignore[assignment]
    audit.emit("first")
    assert stream.entered.wait(10)  # the writer is stuck inside the first write
    for name in ("queued-1", "queued-2", "dropped-1", "dropped-2"):
        audit.emit(name)  # returns at once, stuck disk or not
    assert audit.dropped == 2 and len(drops) == 2
    assert "audit queue full" in caplog.text
    stream.release.set()
    audit.aclose()
    real.close()
    names = [e["event"] for e in _events(stream.text) if e["event"] != "audit.started"]
    assert names == ["first", "queued-1", "queued-2"]


def test_a_failing_write_is_logged_and_the_trail_keeps_going(tmp_path, caplog):
    """A write error (disk full) is logged with the number of events lost; it never reaches
    the code that emitted, and a later write succeeds."""
    stream = StalledStream(stall_on="never", failing=True)
    audit = Audit(str(tmp_path / "audit.jsonl"))
    real, audit._stream = audit._stream, stream  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        audit.emit("lost")
        assert stream.failed.wait(10)
        audit.reopen()  # the next batch reopens the real file: writing resumes there
        audit.emit("kept")
        audit.aclose()
    real.close()
    assert "audit write failed" in caplog.text
    assert "kept" in (tmp_path / "audit.jsonl").read_text()
