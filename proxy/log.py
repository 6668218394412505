"""Named loggers, and the one function (called only by the CLI) that installs handlers."""

from __future__ import annotations

import json
import logging
import sys
import time

access_log = logging.getLogger("credproxy.access")
server_log = logging.getLogger("credproxy.server")
credentials_log = logging.getLogger("credproxy.credentials")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure(*, fmt: str = "text", level: str = "info", access: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("credproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    access_log.disabled = not access
