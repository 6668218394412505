"""What a process may have left on disk: the regular files written since a moment under some
roots, and whether one holds any of a set of byte strings (a key, a token)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path


def written_since(moment: float, roots: list[Path]) -> Iterator[Path]:
    """Regular files under ``roots`` modified since ``moment`` (not following symlinks)."""
    for root in roots:
        for directory, subdirs, files in os.walk(root, onerror=lambda _: None):
            subdirs[:] = [d for d in subdirs if d not in (".git", ".venv", "node_modules", "go")]
            for name in files:
                path = Path(directory, name)
                try:
                    info = path.lstat()
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode) and info.st_mtime >= moment:
                    yield path


def read_head(path: Path) -> bytes:
    """A file's first 64 MiB (b"" when it cannot be read)."""
    try:
        with path.open("rb") as file:
            return file.read(64 * 1024 * 1024)
    except OSError:
        return b""


def holds(path: Path, needles: list[bytes]) -> bool:
    data = read_head(path)
    return any(needle in data for needle in needles)


def open_regular_files(pid: int) -> set[str]:
    """The regular files process ``pid`` has open (an anonymous memory file is none)."""
    links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    return {f for f in links if f.startswith("/") and Path(f).is_file()}
