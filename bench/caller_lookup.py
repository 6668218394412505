"""Per-connection cost of caller identification, against the cost of the connection itself.

    .venv/bin/python bench/caller_lookup.py [connections]

Measures, over N fresh loopback connections: a TCP connect+accept (the reference), the uid and
inode lookup (NETLINK_SOCK_DIAG, and the /proc/net/tcp fallback), the pid/exe/cgroup resolution
from every process holding the socket, the per-request rescan of those holders (routes whose
rules name exe, exe_sha256, cgroup or gid), and SO_PEERCRED + the peer's inode on a Unix socket. Prints a Markdown table with µs and ratios to connect+accept.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.access import callers, kernel  # noqa: E402


def _timed(fn: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - started) * 1e6


def _resolve_all(caller: callers.Caller) -> object:
    return caller.pid, caller.exe, caller.cgroup


def main(n: int) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    rows: dict[str, list[float]] = {k: [] for k in (
        "connect+accept (reference)", "uid+inode: sock_diag", "uid+inode: /proc/net/tcp",
        "pid+exe+cgroup (lazy, on demand)", "holders rescan (per request, exe rules)",
        "unix: SO_PEERCRED + peer inode",
    )}  # fmt: skip
    for _ in range(n):
        started = time.perf_counter()
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        rows["connect+accept (reference)"].append((time.perf_counter() - started) * 1e6)
        wanted = (
            kernel.address_key(*conn.getpeername()),
            kernel.address_key(*conn.getsockname()),
        )
        rows["uid+inode: sock_diag"].append(_timed(callers.from_socket, conn))
        rows["uid+inode: /proc/net/tcp"].append(_timed(kernel.find_socket, "/proc/net/tcp", wanted))
        caller = callers.from_socket(conn)
        rows["pid+exe+cgroup (lazy, on demand)"].append(_timed(_resolve_all, caller))
        rows["holders rescan (per request, exe rules)"].append(_timed(caller.recheck))
        client.close()
        conn.close()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "s")
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(path)
        unix.listen(128)
        for _ in range(n):
            client = socket.socket(socket.AF_UNIX)
            client.connect(path)
            conn, _ = unix.accept()
            rows["unix: SO_PEERCRED + peer inode"].append(_timed(callers.from_socket, conn))
            client.close()
            conn.close()
    reference = statistics.median(rows["connect+accept (reference)"])
    print(
        f"caller lookup, {n} connections, /proc/net/tcp has "
        f"{sum(1 for _ in open('/proc/net/tcp')) - 1} sockets\n"
    )
    print("| step | p50 µs | p99 µs | × connect+accept |")
    print("|---|---:|---:|---:|")
    for name, samples in rows.items():
        samples.sort()
        p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99) - 1]
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {p50 / reference:.2f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
