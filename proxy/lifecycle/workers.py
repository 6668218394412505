"""``credproxy run --workers N``: a pre-fork supervisor. The parent binds what must be shared,
forks N workers, forwards signals and restarts a worker that dies; it serves nothing itself.

- TCP listeners: every worker binds the same port with ``SO_REUSEPORT`` and the kernel spreads
  connections across them (a port 0 is resolved once, by the parent, first).
- Unix socket listeners: the parent binds and listens once; the workers inherit the socket and
  accept from it in turn (``SO_REUSEPORT`` does not apply to Unix sockets).
- One DPoP key, made in memory by the parent before forking, so every worker's tokens are bound
  to the same key. Worker 0 is the leader: only it asks the IdP; the others take its tokens over
  a Unix socket in a private directory (``token_share``), so the IdP sees one token request per
  credential and refresh window.
- The admin (telemetry) listener and the control plane run in worker 0; /metrics aggregates all workers' values
  (``PROMETHEUS_MULTIPROC_DIR``, set by the CLI before anything imports prometheus_client).
- A worker that dies is restarted after a jittered, exponentially growing delay (a worker that
  crashes at once would otherwise be forked in a tight loop); the delay starts over once a
  worker has lived ``_HEALTHY_AFTER_S``. Every restart is logged with its delay.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from ..config.model import Address, Config, loopback_twin, parse_address
from ..credentials.dpop import DPoPKey
from ..errors import StartError
from ..log import ACCESS, server_log
from ..secret import INSTANCE  # drawn here, before forking: every worker fingerprints alike
from .unix_socket import bind_unix, cannot_listen

_RESTART_BASE_S = 0.5
_RESTART_MAX_S = 30.0
_HEALTHY_AFTER_S = 60.0
_POLL_S = 0.05


class RestartBackoff:
    """The delay before restarting a worker: jittered, doubling with each crash in a row of that
    worker, capped; a worker that lived ``healthy_after_s`` starts the count over."""

    def __init__(
        self,
        base_s: float = _RESTART_BASE_S,
        max_s: float = _RESTART_MAX_S,
        healthy_after_s: float = _HEALTHY_AFTER_S,
    ) -> None:
        self._base_s, self._max_s, self._healthy_after_s = base_s, max_s, healthy_after_s
        self._crashes: dict[int, int] = {}  # worker index → crashes in a row

    def next(self, index: int, lived_s: float) -> tuple[int, float]:
        """(crashes in a row, delay in seconds) for worker ``index`` that just died."""
        crashes = 1 if lived_s >= self._healthy_after_s else self._crashes.get(index, 0) + 1
        self._crashes[index] = crashes
        ceiling_s = min(self._max_s, self._base_s * 2 ** (crashes - 1))
        return crashes, random.uniform(ceiling_s / 2, ceiling_s)  # noqa: S311 - jitter


def _shared_sockets(
    config: Config,
) -> tuple[list[str], dict[str, socket.socket], list[socket.socket]]:
    """(listen values with TCP ports resolved, inherited Unix sockets, reservations to keep)."""
    listen: list[str] = []
    inherited: dict[str, socket.socket] = {}
    reserved: list[socket.socket] = []
    for value in config.listen:
        address = parse_address(value)
        if address.path:
            inherited[value] = _unix_listener(address, config.unix_socket_mode)
            listen.append(value)
            continue
        twin = loopback_twin(address.host) if config.bind_both_loopbacks else None
        for _ in range(8):  # port 0 with a twin: a port free in both families
            reservation = _reserve(address.host, address.port, twin=False)
            port = reservation.getsockname()[1]
            try:
                # The workers bind the other family too: keep it from others meanwhile.
                reserved += [reservation, *([_reserve(twin, port, twin=True)] if twin else [])]
                break
            except StartError:
                reservation.close()
                if address.port != 0:
                    raise
        else:
            raise StartError(f"cannot find a port free on both {address.host} and {twin}")
        listen.append(str(Address(host=address.host, port=port)))
    return listen, inherited, reserved


def _reserve(host: str, port: int, *, twin: bool) -> socket.socket:
    """A port bound with SO_REUSEPORT, never listening (it takes no connection): the workers
    bind it again. A ``twin`` family this host lacks is nothing to reserve (left unbound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reservation = socket.socket(family, socket.SOCK_STREAM)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((host, port))
    except OSError as exc:
        if not (twin and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)):
            reservation.close()
            raise cannot_listen(Address(host=host, port=port), exc) from None
    return reservation


def _unix_listener(address: Address, mode: str) -> socket.socket:
    sock = bind_unix(address.path, int(mode, 8), where="listen")
    sock.listen(1024)
    return sock


def supervise(config: Config, path: Path, count: int) -> int:
    """Fork ``count`` workers and keep them running until SIGTERM/SIGINT; returns the exit code."""
    from . import process  # the workers import the server; the parent only forks them

    listen, inherited, reserved = _shared_sockets(config)
    dpop_key = DPoPKey(config.identity.dpop_alg)
    private = tempfile.mkdtemp(prefix="credproxy-leader-")  # mode 0700: the sidecar's user only
    leader_socket = os.path.join(private, "tokens.sock")
    workers: dict[int, int] = {}  # pid → index
    started: dict[int, float] = {}  # pid → when it was forked (monotonic)
    stopping = False

    def start(index: int) -> None:
        pid = os.fork()
        if pid:
            workers[pid] = index
            started[pid] = time.monotonic()
            return
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        worker_config = config.model_copy(
            update={"listen": tuple(listen)}
            if index == 0
            else {
                "listen": tuple(listen),
                "admin": None,
                "control": config.control.model_copy(update={"listen": None}),
            }
        )
        code = 0
        try:
            process.run(
                worker_config,
                path,
                dpop_key=dpop_key,
                inherited=inherited,
                reuse_port=True,
                leader_socket=leader_socket,
                is_leader=index == 0,
                workers=count,
            )
        except Exception:
            server_log.exception("worker %d failed", index)
            code = 1
        finally:
            ACCESS.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(workers):
            os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, forward)
    for index in range(count):
        start(index)
    server_log.info("supervising %d workers: %s; instance %s", count, sorted(workers), INSTANCE)
    failed = False
    backoff = RestartBackoff()
    restart_at: dict[int, float] = {}  # worker index → when to start it again (monotonic)
    while workers or (restart_at and not stopping):
        due = None if stopping or not restart_at else min(restart_at.values())
        if due is not None and due <= time.monotonic():
            index = min(restart_at, key=restart_at.__getitem__)
            del restart_at[index]
            start(index)
            continue
        reaped = _wait_child(None if due is None else due - time.monotonic())
        if reaped is None:
            if due is None:
                break  # no child left to wait for
            continue
        pid, status = reaped
        index = workers.pop(pid)
        lived_s = time.monotonic() - started.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        _mark_dead(pid)
        if stopping:
            failed |= code != 0
            continue
        crashes, delay_s = backoff.next(index, lived_s)
        server_log.error(
            "worker %d (pid %d) exited with %d; restarting it in %.2fs (crash %d in a row)",
            index,
            pid,
            code,
            delay_s,
            crashes,
        )
        restart_at[index] = time.monotonic() + delay_s
    for sock in [*reserved, *inherited.values()]:
        sock.close()
    for value in inherited:
        Path(parse_address(value).path or "").unlink(missing_ok=True)
    shutil.rmtree(private, ignore_errors=True)
    return 1 if failed else 0


def _wait_child(timeout_s: float | None) -> tuple[int, int] | None:
    """(pid, status) of a worker that ended; None when ``timeout_s`` passed first or none is
    left. ``None`` waits as long as it takes."""
    if timeout_s is None:
        try:
            return os.wait()
        except ChildProcessError:
            return None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0
        if pid:
            return pid, status
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return None
        time.sleep(min(_POLL_S, remaining_s))


def _mark_dead(pid: int) -> None:
    """Drop a dead worker's live gauges from the aggregate (its counters stay counted)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
