"""Loaded into a credproxy under test (put first on its PYTHONPATH): a Python audit hook that
records every file the process opens for writing or creates, and every rename, link or copy, as
one line ``event<TAB>path`` in the file named by ``CREDPROXY_WRITE_WITNESS``. A file written
and deleted again leaves no trace a scan of the disk can find; it leaves one here."""

from __future__ import annotations

import os
import sys

_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
_PATH_EVENTS = {  # event → the index of the path written to
    "os.rename": 1,
    "os.link": 1,
    "os.symlink": 1,
    "shutil.copyfile": 1,
    "os.truncate": 0,
    "os.mkfifo": 0,
    "os.mknod": 0,
}


def _install(witness: str) -> None:
    out = os.open(witness, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def hook(event: str, args: tuple[object, ...]) -> None:
        if event == "open":
            path, _, flags = args
            if not isinstance(flags, int) or not flags & _WRITES:
                return
        elif event in _PATH_EVENTS:
            path = args[_PATH_EVENTS[event]]
        else:
            return
        # an open by descriptor (os.fdopen) writes where an audited open already pointed
        shown = f"fd:{path}" if isinstance(path, int) else os.fsdecode(path)  # type: ignore[arg-type]
        os.write(out, f"{event}\t{shown}\n".encode(errors="replace"))

    sys.addaudithook(hook)


if os.environ.get("CREDPROXY_WRITE_WITNESS"):
    _install(os.environ["CREDPROXY_WRITE_WITNESS"])
