"""Background tasks with a kept reference and logged crashes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_tasks: set[asyncio.Task[Any]] = set()


def _done(task: asyncio.Task[Any]) -> None:
    _tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s crashed", task.get_name(), exc_info=task.exception())


def spawn(coro: Coroutine[Any, Any, _T], *, name: str) -> asyncio.Task[_T]:
    """Start a named task, keep a reference until it ends, and log it if it crashes."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _tasks.add(task)
    task.add_done_callback(_done)
    return task
