"""``tasks.spawn``: named, referenced background tasks whose crashes are logged in full."""

from __future__ import annotations

import asyncio
import logging

from proxy.tasks import spawn


async def _crash() -> None:
    raise LookupError("the detail an operator needs")


async def test_a_crashed_task_is_logged_with_its_traceback(caplog):
    """A task that raises is logged with its name and the traceback, not just the exception's repr."""
    caplog.set_level(logging.ERROR, logger="credproxy.tasks")
    task = spawn(_crash(), name="doomed")
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)  # done callbacks run on the next loop pass
    [record] = [r for r in caplog.records if r.name == "credproxy.tasks"]
    assert "doomed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is LookupError
    assert "in _crash" in caplog.text  # the frame that raised
