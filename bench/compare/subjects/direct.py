"""No proxy: wrk sends the key itself, straight to the upstream (the floor for latency)."""

from __future__ import annotations

from ..constants import KEY_HEADER
from ..workspace import Bench
from .subject import Started


def start(bench: Bench) -> Started:
    return Started(bench.upstream, headers={KEY_HEADER: bench.key})
