"""The one place that starts background tasks: every task is named and referenced until done."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_running: set[asyncio.Task[Any]] = set()
_log = logging.getLogger("credproxy.tasks")


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start ``coro`` as a named task; a crash is logged instead of vanishing with the task."""
    task = asyncio.create_task(coro, name=name)  # noqa: TID251 - this is the helper
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        _log.error("task %s crashed: %r", task.get_name(), exc, exc_info=exc)
