"""Binding a Unix socket so that no other user can reach or replace it by accident of timing;
and ``cannot_listen``, the one wording of a listener that cannot bind (TCP or Unix).

The socket is created with its final mode (the umask is narrowed around ``bind``): a ``chmod``
afterwards would leave a window with the default mode, and would follow a symlink planted at the
path. Its directory is checked first: one that another user may write to (without the sticky
bit) lets that user replace the socket with their own, and the app would talk to them.
"""

from __future__ import annotations

import os
import socket
import stat
import threading

from ..errors import StartError

_umask_lock = threading.Lock()  # the umask is per process: one bind at a time changes it


def cannot_listen(address: object, exc: OSError, *, where: str = "") -> StartError:
    """The ``StartError`` for an OSError binding or listening on ``address`` (``where``: the
    config key): raise it ``from None``."""
    return StartError(f"{where}: " * bool(where) + f"cannot listen on {address}: {os_reason(exc)}")


def os_reason(exc: OSError) -> str:
    """The system's words for ``exc``: asyncio's bind errors repeat the address in their text."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def bind_unix(path: str, mode: int, *, where: str) -> socket.socket:
    """A stream socket bound at ``path`` with permissions ``mode``, not yet listening (the
    caller's server listens). ``where`` names the config key in errors. A socket left at the path
    by a previous run is replaced; anything else there is refused."""
    _check_directory(os.path.dirname(path) or ".", where)
    _remove_stale_socket(path, where)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _umask_lock:
            previous = os.umask(0o777 & ~mode)
            try:
                sock.bind(path)
            finally:
                os.umask(previous)
    except OSError as exc:
        sock.close()
        raise cannot_listen(f"unix:{path}", exc, where=where) from None
    return sock


def _check_directory(directory: str, where: str) -> None:
    try:
        info = os.stat(directory)
    except OSError as exc:
        raise StartError(f"{where}: socket directory {directory}: {exc.strerror}") from None
    uid = os.getuid()
    if info.st_uid not in (0, uid):
        raise StartError(
            f"{where}: socket directory {directory} belongs to uid {info.st_uid}, who could "
            f"replace the socket; use a directory owned by root or by credproxy's uid {uid}"
        )
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        who = "others" if info.st_mode & 0o002 else "its group"
        raise StartError(
            f"{where}: socket directory {directory} is writable by {who} (mode "
            f"{stat.S_IMODE(info.st_mode):04o}) without the sticky bit, so another user could "
            f"replace the socket; chmod go-w {directory} (the app needs only search: 0751/0755)"
        )


def _remove_stale_socket(path: str, where: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartError(f"{where}: {path} exists and is not a socket; remove it or pick a path")
    if _answers(path):
        raise StartError(f"{where}: another process is serving on {path}; stop it or pick a path")
    try:
        os.unlink(path)  # a socket from a previous run (unlink never follows a symlink)
    except OSError as exc:
        raise StartError(f"{where}: cannot remove the old socket {path}: {exc.strerror}") from None


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
