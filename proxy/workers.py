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
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from .config import Address, Config, loopback_twin, parse_address
from .dpop import DPoPKey
from .errors import StartError
from .log import server_log

_RESTART_DELAY_S = 1.0


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
            raise StartError(
                f"cannot listen on {Address(host=host, port=port)}: {exc.strerror}"
            ) from None
    return reservation


def _unix_listener(address: Address, mode: str) -> socket.socket:
    assert address.path is not None
    path = Path(address.path)
    if path.is_socket():
        path.unlink()  # a stale socket from a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address.path)
    except OSError as exc:
        raise StartError(f"cannot listen on {address}: {exc.strerror}") from None
    os.chmod(address.path, int(mode, 8))
    sock.listen(1024)
    return sock


def supervise(config: Config, path: Path, count: int) -> int:
    """Fork ``count`` workers and keep them running until SIGTERM/SIGINT; returns the exit code."""
    from . import server  # the workers import the server; the parent only forks them

    listen, inherited, reserved = _shared_sockets(config)
    dpop_key = DPoPKey(config.identity.dpop_alg)
    private = tempfile.mkdtemp(prefix="credproxy-leader-")  # mode 0700: the sidecar's user only
    leader_socket = os.path.join(private, "tokens.sock")
    workers: dict[int, int] = {}  # pid → index
    stopping = False

    def start(index: int) -> None:
        pid = os.fork()
        if pid:
            workers[pid] = index
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
            server.run(
                worker_config,
                path,
                dpop_key=dpop_key,
                inherited=inherited,
                reuse_port=True,
                leader_socket=leader_socket,
                is_leader=index == 0,
            )
        except Exception:
            server_log.exception("worker %d failed", index)
            code = 1
        finally:
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
    server_log.info("supervising %d workers: %s", count, sorted(workers))
    failed = False
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = workers.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        _mark_dead(pid)
        if stopping:
            failed |= code != 0
            continue
        server_log.error("worker %d (pid %d) exited with %d; restarting it", index, pid, code)
        time.sleep(_RESTART_DELAY_S)
        start(index)
    for sock in [*reserved, *inherited.values()]:
        sock.close()
    for value in inherited:
        Path(parse_address(value).path or "").unlink(missing_ok=True)
    shutil.rmtree(private, ignore_errors=True)
    return 1 if failed else 0


def _mark_dead(pid: int) -> None:
    """Drop a dead worker's live gauges from the aggregate (its counters stay counted)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
