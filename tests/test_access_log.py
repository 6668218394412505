"""The access log's writer: lines leave the event loop through a bounded list, reach stderr
whole, in order and in the log's format, are written by a forked worker too, and are dropped
and counted, never waited for, when stderr does not keep up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _stderr(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_lines_reach_stderr_whole_in_order_and_in_the_logs_format():
    text = _stderr(
        """
        from proxy import log
        log.configure(fmt="text")
        log.server_log.info("server line")
        for i in range(2000):
            log.ACCESS.write(f"GET /api/{i} route=api status=200")
        log.ACCESS.close()
        """
    )
    access = [line for line in text.splitlines() if " credproxy.access " in line]
    assert [line.split(" GET ")[1] for line in access] == [
        f"/api/{i} route=api status=200" for i in range(2000)
    ]
    assert all(" INFO credproxy.access GET /api/" in line for line in access)
    assert "INFO credproxy.server server line" in text

    lines = _stderr(
        """
        from proxy import log
        log.configure(fmt="json")
        log.ACCESS.write('GET /x "quoted" route=api')
        log.ACCESS.close()
        """
    ).splitlines()
    (entry,) = [json.loads(line) for line in lines]
    assert entry["logger"] == "credproxy.access" and entry["level"] == "info"
    assert entry["msg"] == 'GET /x "quoted" route=api' and entry["ts"].endswith("Z")


def test_no_line_is_lost_while_the_writer_takes_batches_as_they_are_written():
    """The loop appends while the writer thread takes batches from the same list: 50 bursts of
    150 lines, each burst yielding to the writer in between, all 7,500 reach stderr once, in
    order (a line appended while a batch is taken goes in the next one)."""
    text = _stderr(
        """
        import time
        from proxy import log
        log.configure(fmt="text")
        n = 0
        for burst in range(50):
            for _ in range(150):
                log.ACCESS.write(f"GET /b/{n} route=api")
                n += 1
            time.sleep(0.002)  # the writer wakes mid-stream, between and during bursts
        log.ACCESS.close()
        """
    )
    sent = [line.split(" GET ")[1] for line in text.splitlines() if " credproxy.access " in line]
    assert sent == [f"/b/{i} route=api" for i in range(7500)]


def test_access_off_or_level_above_info_writes_nothing():
    for settings in ('fmt="text", access=False', 'fmt="text", level="warning"'):
        text = _stderr(
            f"""
            from proxy import log
            log.configure({settings})
            assert not log.ACCESS.enabled
            """
        )
        assert text == ""


def test_a_forked_worker_writes_its_own_lines():
    text = _stderr(
        """
        import os
        from proxy import log
        log.configure(fmt="text")
        log.ACCESS.write("parent before fork")
        pid = os.fork()
        if pid == 0:
            log.ACCESS.write("child line")
            log.ACCESS.close()
            os._exit(0)
        os.waitpid(pid, 0)
        log.ACCESS.close()
        """
    )
    assert "credproxy.access child line" in text and "credproxy.access parent before fork" in text


def test_a_stalled_stderr_drops_and_counts_lines_instead_of_blocking():
    """The writer is held (its stderr lock taken) while 5,000 lines arrive for a queue of 100:
    write() never blocks, the excess is counted, and what was queued is written once freed."""
    text = _stderr(
        """
        import logging
        from proxy import log
        log.ACCESS = access = log.AccessLog(max_pending=100)
        log.configure(fmt="text")
        handler = logging.getLogger("credproxy").handlers[0]
        with handler.lock:
            for i in range(5000):
                access.write(f"line {i}")
            assert 4800 <= access.dropped <= 4900, access.dropped
        access.close()
        log.server_log.warning("dropped %d", access.dropped)
        """
    )
    written = [line for line in text.splitlines() if " credproxy.access line " in line]
    dropped = int(text.rsplit("dropped ", 1)[1])
    assert len(written) + dropped == 5000 and 100 <= len(written) <= 200
    assert f"access log: {dropped} line(s) dropped, {dropped} in all" in text  # the operator knows
