"""The deployment's fingerprint key: 32 random bytes in a file only credproxy's user may read,
made once (the first run) and read by every later run, so the audit log names a credential alike
across restarts while a guessed secret still cannot be checked against it without the key.

The file is created without following a symlink, atomically (written aside, then linked into
place: a concurrent start reads the whole key or makes none), mode 0600. An existing one is used
only if it is a regular file of this user, not readable or writable by group or others, and
exactly 32 bytes; otherwise, or when it cannot be read or made, the run keeps the key drawn at
start and says loudly that its fingerprints compare within this run only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from ..log import server_log
from ..secret import KEY_BYTES, use_key

DEFAULT_NAME = ".credproxy-fingerprint.key"  # dot: a log shipper's `*` glob does not pick it up


class KeyFileError(OSError):
    """The key file is unusable; the message says why and what to do."""


def default_path(audit_file: str) -> Path | None:
    """Beside the audit file (the volume that outlives restarts); none when auditing to stdout."""
    if audit_file == "-":
        return None
    return Path(audit_file).parent / DEFAULT_NAME


def install(key_file: str | None, audit_file: str) -> bool:
    """Fingerprint under the deployment's key from ``key_file`` (default: beside the audit
    file), making it when absent. False, after a warning, when the run keeps a per-run key."""
    path = Path(key_file) if key_file else default_path(audit_file)
    if path is None:
        server_log.warning(
            "fingerprints are per run: the audit goes to stdout and audit.fingerprint_key_file "
            "is not set, so the same credential gets another fingerprint after a restart; set "
            "it to a file on a volume that outlives restarts"
        )
        return False
    try:
        key = load_or_create(path)
    except KeyFileError as exc:
        server_log.warning(
            "fingerprints are per run (a new key each start, so the same credential gets another "
            "fingerprint after a restart): %s",
            exc,
        )
        return False
    use_key(key)
    return True


def load_or_create(path: Path) -> bytes:
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    try:
        return _create(path)
    except FileExistsError:  # another process made it meanwhile: use theirs
        return _read(path)


def _read(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(
                f"{path} is a symbolic link, which credproxy does not follow"
            ) from None
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise KeyFileError(
                f"{path} belongs to uid {info.st_uid}, not to credproxy's uid {os.geteuid()}: "
                "whoever made it may know the key"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"{path} has mode {mode:04o}: others may read the key and confirm guessed secrets "
                f"from the audit log; refused. Delete it (a new one is made) or chmod 0600 it "
                "if it never left this user"
            )
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key")
    return key


def _create(path: Path) -> bytes:
    key = secrets.token_bytes(KEY_BYTES)
    aside = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(aside, flags, 0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(aside, path)  # atomic, and fails if the path exists (a planted symlink too)
    except FileExistsError:
        raise
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(aside)
    server_log.info("fingerprint key created: %s (0600; keep it with the audit log)", path)
    return key
