"""What a path under test is: a ``Subject`` (a row of the table in ``subjects/__init__``) whose
``start`` returns a ``Started`` proxy ready to measure."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..workspace import Bench


@dataclass
class Started:
    """A path ready to measure: where wrk sends requests, and which processes are the proxy."""

    base_url: str
    watch: list[subprocess.Popen[bytes]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    admin_url: str = ""


@dataclass(frozen=True)
class Subject:
    """One path under test, and what the bench does with it beyond the wrk points."""

    key: str  # the ``--only`` key
    label: str
    start: Callable[[Bench], Started]
    credproxy: bool = False
    idp: bool = False  # gets its tokens from the bench IdP: count them
    upload: bool = False  # also stream a 1 GiB upload through it, watching its RSS
    instructions: bool = False  # also count its instructions per request under callgrind
    startup: Callable[[Bench], tuple[float, float]] | None = None  # run and check-config, s
    needs_workers: bool = False  # only where `credproxy run --workers` exists
    tool: Path | None = None  # an executable bench/run installs; the path fails without it
    note: str = ""

    def missing_tool(self) -> str | None:
        """Why this path cannot run here (bench/run installs everything), or None."""
        if self.tool is not None and not self.tool.exists():
            return f"{self.tool} missing (bench/run installs it)"
        return None
