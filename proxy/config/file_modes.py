"""Who else can read the sidecar's secrets or rewrite its config: key, secret and token files
readable or writable by their group or others (or owned by another user), and a config file
others may write. ``run`` and ``check-config`` warn; with ``--strict`` they refuse.

A group-writable config is accepted only when the group is the owner's alone: root's group for
a root-owned file (its members administer the host anyway), or the owner's primary group with
no other member (a user-private group, as ``umask 002`` systems make). Any other group's
members could rewrite the policy.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from .model import Config

_SECRET_FIELDS = (
    "client_key_file",
    "client_secret_file",
    "subject_token_file",
    "token_file",
    "static_credentials_file",
    "secret_file",
    "key_file",
)


def secret_files(config: Config) -> list[tuple[str, Path]]:
    """(config path, file) for every file the config names that holds a key, secret or token."""
    files: list[tuple[str, Path]] = []
    if config.identity.token_file is not None:
        files.append(("identity.token_file", config.identity.token_file))
    for name, issuer in config.issuers.items():
        for field in _SECRET_FIELDS:
            path = getattr(issuer, field, None)
            if path is not None:
                files.append((f"issuers.{name}.{field}", path))
        auth = getattr(issuer, "auth", None)  # openbao: the workload token it logs in with
        if auth is not None and auth.token_file is not None:
            files.append((f"issuers.{name}.auth.token_file", auth.token_file))
    for i, route in enumerate(config.routes):
        if route.client_key_file is not None:
            files.append((f"routes[{i}].client_key_file", route.client_key_file))
    return files


def exposed(config: Config, config_path: Path) -> list[str]:
    """One line per file others may read (secrets) or write (secrets, the config)."""
    notes = [_secret_note(where, path) for where, path in secret_files(config)]
    notes.append(_config_note(config_path))
    return [note for note in notes if note]


def _secret_note(where: str, path: Path) -> str:
    try:
        info = os.stat(path)  # follows links: Kubernetes mounts secrets as symlinks
    except OSError:
        return ""  # config_file.warnings() reports a missing file
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o066:
        access = " and ".join(
            word for bits, word in ((0o044, "readable"), (0o022, "writable")) if mode & bits
        )
        who = "others" if mode & 0o006 else "its group"
        return f"{where}: {path} is {access} by {who} (mode {mode:04o}); chmod 600 {path}"
    if info.st_uid not in (0, os.getuid()):
        return (
            f"{where}: {path} belongs to uid {info.st_uid}, who can read it; chown it to "
            f"credproxy's uid {os.getuid()}"
        )
    return ""


def _config_note(path: Path) -> str:
    try:
        info = os.stat(path)
    except OSError:
        return ""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o002:
        return f"{path}: the config is writable by others (mode {mode:04o}); chmod o-w {path}"
    if mode & 0o020 and not _owners_group(info):
        return (
            f"{path}: the config is writable by group {info.st_gid}, whose members could rewrite "
            f"the policy (mode {mode:04o}); chmod g-w {path}"
        )
    return ""


def _owners_group(info: os.stat_result) -> bool:
    """The file's group holds no one but its owner (see the module docstring)."""
    if info.st_gid == 0:
        return info.st_uid == 0
    try:
        owner = pwd.getpwuid(info.st_uid)
        members = set(grp.getgrgid(info.st_gid).gr_mem)
    except KeyError:
        return False  # unknown here: cannot tell who is in it
    others_primary = any(
        user.pw_gid == info.st_gid and user.pw_uid != info.st_uid for user in pwd.getpwall()
    )
    return owner.pw_gid == info.st_gid and members <= {owner.pw_name} and not others_primary
