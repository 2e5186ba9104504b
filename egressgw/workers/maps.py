"""The egress map with ``proxy.workers`` above 1: every worker's map asked and merged.

Each worker keeps the map of the flows it decides. The supervisor's admin server reads
``MergedMap``, which asks every running worker over its channel (``map_graph``: the window's
share of its map; ``map_flows``: its version, newest sequence number and the refused flows
after the last one taken) and merges the answers with the pure functions of
``record.mapmerge``. Rules:

- One round of questions per kind (the flows, or one window's graph) is in flight at a time;
  a caller arriving meanwhile waits for it, and one accepting an answer ``max_age`` seconds old
  (the live streams) takes the last one. The version is the flows round's: it also takes the
  new refused flows into the supervisor's ring.
- A worker that does not answer within ``timeout`` (or is gone) is left out of that answer,
  logged once until it answers again: the map answers with the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Protocol

import structlog

from egressgw.record.egressmap import check_decision
from egressgw.record.mapmerge import RecentFlows, merge_graphs
from siem.tasks import spawn

log = structlog.get_logger("egressgw.supervisor")


class Asker(Protocol):
    """A worker's channel as the map asks it (the supervisor's ``Link``)."""

    async def request(self, op: str, within: float, **fields: Any) -> dict[str, Any]:
        """The worker's answer to ``op``; TimeoutError, ConnectionError."""
        ...


# A running worker: (its slot, its process, its channel).
Running = tuple[int, object, Asker]


class MergedMap:
    """The workers' egress maps as one ``MapSource`` (see the module docstring)."""

    def __init__(
        self,
        workers: Callable[[], Sequence[Running]],
        *,
        windows: Sequence[float],
        max_edges: int,
        recent: int,
        timeout: float,
    ) -> None:
        self._workers = workers
        self._windows = tuple(sorted(windows))
        self.max_edges = max_edges
        self.recent = recent
        self.timeout = timeout
        self.ring = RecentFlows(recent)
        self._done: dict[Hashable, tuple[float, Any]] = {}  # kind -> (when, answer)
        self._running: dict[Hashable, asyncio.Task[Any]] = {}
        self._silent: set[int] = set()  # slots left out, logged already
        self.rounds = 0  # rounds of questions asked (each to every running worker)

    @property
    def windows(self) -> tuple[float, ...]:
        """The configured windows."""
        return self._windows

    async def version(self, max_age: float = 0.0) -> int:
        """The sum of the workers' versions (the new refused flows taken on the way)."""
        version: int = await self._shared("flows", max_age, self._take_flows)
        return version

    async def graph(
        self,
        window: float,
        *,
        namespace: str | None,
        decision: str | None,
        tier: str | None,
        limit: int,
        max_age: float = 0.0,
    ) -> dict[str, Any]:
        """The workers' graphs of ``window``, merged as one map's."""
        check_decision(decision)
        shares = await self._shared(("graph", window), max_age, lambda: self._shares(window))
        return merge_graphs(
            shares,
            window,
            max_edges=self.max_edges,
            namespace=namespace,
            decision=decision,
            tier=tier,
            limit=limit,
        )

    async def flows(
        self, *, decision: str | None, limit: int, after: int, max_age: float = 0.0
    ) -> list[dict[str, Any]]:
        """The recent refused flows of every worker, numbered by the supervisor."""
        self.ring.recent_flows(decision=decision, limit=0)  # a bad filter before any question
        await self.version(max_age)
        return self.ring.recent_flows(decision=decision, limit=limit, after=after)

    # -- rounds of questions ------------------------------------------------------------------
    async def _shared(
        self, kind: Hashable, max_age: float, ask: Callable[[], Awaitable[Any]]
    ) -> Any:
        done = self._done.get(kind)
        if done is not None and time.monotonic() - done[0] <= max_age:
            return done[1]
        task = self._running.get(kind)
        if task is None:
            task = spawn(self._round(kind, ask), name=f"egress-map-{kind}")
            self._running[kind] = task
        # Shielded: a client that goes away does not cancel the round others wait for.
        return await asyncio.shield(task)

    async def _round(self, kind: Hashable, ask: Callable[[], Awaitable[Any]]) -> Any:
        try:
            self.rounds += 1
            answer = await ask()
            self._done[kind] = (time.monotonic(), answer)
            return answer
        finally:
            del self._running[kind]

    async def _ask(
        self, op: str, fields: Callable[[int, object], dict[str, Any]]
    ) -> list[tuple[int, object, dict[str, Any]]]:
        """Ask every running worker; the answers of those that gave one in time."""
        workers = list(self._workers())
        replies = await asyncio.gather(
            *(link.request(op, self.timeout, **fields(slot, pid)) for slot, pid, link in workers),
            return_exceptions=True,
        )
        answered = []
        for (slot, pid, _), reply in zip(workers, replies, strict=True):
            if isinstance(reply, BaseException) or "error" in reply:
                if slot not in self._silent:
                    self._silent.add(slot)
                    why = reply.get("error") if isinstance(reply, dict) else repr(reply)
                    log.warning("egress map: a worker left out of the answer", worker=slot, why=why)
                continue
            self._silent.discard(slot)
            answered.append((slot, pid, reply))
        return answered

    async def _take_flows(self) -> int:
        ring = self.ring
        answers = await self._ask(
            "map_flows", lambda slot, pid: {"after": ring.after(slot, pid), "limit": self.recent}
        )
        ring.take((slot, pid, int(r["seq"]), r["flows"]) for slot, pid, r in answers)
        return sum(int(r["version"]) for _, _, r in answers)

    async def _shares(self, window: float) -> list[dict[str, Any]]:
        answers = await self._ask("map_graph", lambda slot, pid: {"window": window})
        return [r["share"] for _, _, r in answers]
