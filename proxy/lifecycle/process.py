"""The process around a ``Server``: uvloop, signals and the collector's threshold. SIGTERM and
SIGINT drain and stop, SIGHUP reloads the config file, SIGUSR1 reopens the audit file."""

from __future__ import annotations

import asyncio
import gc
import signal
from pathlib import Path
from typing import Any

import uvloop

from ..config.model import Config
from ..log import server_log
from ..tasks import spawn
from .server import Server


async def serve(config: Config, path: Path, **worker: Any) -> None:
    """Run until SIGTERM or SIGINT, then drain and exit. SIGHUP reloads ``path``; SIGUSR1
    reopens the audit file (logrotate). ``worker``: what a worker shares (see ``Server``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Server(config, **worker) as server:
        # Requests in flight make few reference cycles, yet at the default threshold (700
        # allocations) the collector walks their live objects every few requests: +2 % req/s.
        gc.set_threshold(10_000, 10, 10)
        loop.add_signal_handler(signal.SIGHUP, lambda: spawn(server.reload(path), name="reload"))
        loop.add_signal_handler(signal.SIGUSR1, server.audit.reopen)
        await stop.wait()
        server.draining = True
        server_log.info(
            "shutting down: draining in-flight requests (up to %gs)", config.shutdown_timeout_s
        )
    server_log.info("stopped")


def run(config: Config, path: Path, **worker: Any) -> None:
    uvloop.run(serve(config, path, **worker))
