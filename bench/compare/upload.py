"""The streamed-upload measure: 1 GiB PUT through a fresh proxy to nginx, the proxy's RSS sampled
every 50 ms meanwhile."""

from __future__ import annotations

import http.client
import sys
import threading
import time
import urllib.parse

from .constants import UPLOAD_BYTES
from .processes import wait_ready
from .results import Upload
from .sampling import process_tree, rss_bytes
from .subjects import Started, Subject
from .workspace import Bench


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
