"""When a running gateway (or supervisor) reloads: SIGHUP, the admin endpoint, changed files.

Requests are coalesced: one reload runs at a time, and whatever is asked while it runs makes one
more after it, not one each. The file watcher compares the watched files (modification time and
size) with what the last reload read, not with its own last look: an edit a SIGHUP already
applied is not reloaded a second time, and a broken edit counts one failed reload, not two.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import structlog

from siem.tasks import spawn

log = structlog.get_logger("egressgw.reload")

Stamps = dict[Path, tuple[int, int]]


def file_stamps(paths: Iterable[Path]) -> Stamps:
    """Each file's (modification time in ns, size); (-1, -1) for one that cannot be read."""
    out: Stamps = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out[p] = (-1, -1)
        else:
            out[p] = (st.st_mtime_ns, st.st_size)
    return out


class Reloads:
    """Reload requests of one process, coalesced, and the watcher of its files."""

    def __init__(
        self,
        paths: Callable[[], list[Path]],
        reload: Callable[[], Awaitable[bool]],
        interval: Callable[[], float],
    ) -> None:
        self._paths = paths
        self._reload = reload
        self._interval = interval
        self.watched = file_stamps(paths())  # what the last reload (or the start) read
        self.requests: set[str] = set()
        self.task: asyncio.Task[None] | None = None

    def request(self, by: str) -> None:
        """Ask for a reload (``by``: ``SIGHUP``, ``watch``, ``admin``), logged."""
        log.info("reload requested", by=by)
        self.requests.add(by)
        if self.task is None or self.task.done():
            self.task = spawn(self._run(), name="reload")

    async def _run(self) -> None:
        while self.requests:
            by, self.requests = self.requests, set()
            # What this reload reads: the watcher compares the files with it.
            current = await asyncio.to_thread(file_stamps, self._paths())
            if by == {"watch"} and current == self.watched:
                continue
            self.watched = current
            await self._reload()

    async def watch(self) -> None:
        """Look at the files every ``reload.interval`` until cancelled."""
        while True:
            await asyncio.sleep(self._interval())
            await self.check()

    async def check(self) -> None:
        """Ask for a reload when the files differ from what the last reload read."""
        current = await asyncio.to_thread(file_stamps, self._paths())
        if current != self.watched and "watch" not in self.requests:
            log.info("configuration files changed")
            self.request("watch")

    def cancel(self) -> None:
        """Stop a reload under way (shutdown)."""
        if self.task is not None:
            self.task.cancel()
