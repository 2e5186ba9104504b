"""The egress map of several worker processes merged into one process's answers (pure).

With ``proxy.workers`` above 1 each worker keeps its own ``EgressMap`` of the flows it decides;
the supervisor asks every worker and merges what they say with these functions, so that the
admin API answers as one process that saw every flow would.

- **Graph**: each worker shares every edge it tracks, unfiltered and unfolded, with the
  window's counters (``EgressMap.share``). Edges are merged by key (source namespace, app,
  destination host, port): counters summed, and an edge with none in the window left out;
  ``decision`` worked out again from the sums; ``tier``, ``rule`` and ``reason`` from the
  worker's edge of that decision seen last among those that counted in the window;
  ``threats`` united (at most ``MAX_THREATS_PER_EDGE``); ``last_seen`` and ``source.ip`` from
  the edge seen last. Then the filters (namespace, decision on the summed counters, tier on
  any worker's verdicts) and the same sort and fold as one map (``fold_edges``).
  ``tracked_edges`` counts distinct edges across workers, ``version`` is the sum of theirs.
  Each worker keeps at most ``max_edges`` edges of its own, so the merged map can hold up to
  that many per worker.
- **Recent flows**: ``RecentFlows`` is a ring of its own (``admin.map.recent_flows``) with its
  own increasing ``seq``. Each take adds, per worker slot, the flows newer than the last worker
  sequence number taken from that slot, oldest first; a slot whose process changed, or whose
  newest number is below the last taken (its numbers started again), is taken from the start.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from egressgw.record.egressmap import (
    DECISIONS,
    DEFAULT_GRAPH_LIMIT,
    MAX_THREATS_PER_EDGE,
    OTHER_KEY,
    EdgeKey,
    check_decision,
    decision_of,
    fold_edges,
    graph_json,
)

COUNTERS = ("flows", "allowed", "denied", "would_deny", "bytes_out", "bytes_in")  # by position


def edge_key(edge: Mapping[str, Any]) -> EdgeKey:
    """An edge answer's key: (source namespace, app, destination host, port)."""
    source, dest = edge["source"], edge["destination"]
    return (source["namespace"], source["app"], dest["host"], dest["port"])


def merge_graphs(
    shares: Sequence[Mapping[str, Any]],
    window: float,
    *,
    max_edges: int,
    namespace: str | None = None,
    decision: str | None = None,
    tier: str | None = None,
    limit: int = DEFAULT_GRAPH_LIMIT,
) -> dict[str, Any]:
    """One graph answer from the workers' shares of ``window``, as ``EgressMap.graph`` draws it."""
    check_decision(decision)
    parts: dict[EdgeKey, list[Mapping[str, Any]]] = {}
    for share in shares:
        for edge in share["edges"]:
            parts.setdefault(edge_key(edge), []).append(edge)
    tracked = len(parts) - (OTHER_KEY in parts)
    wanted = None if decision is None else COUNTERS[1 + DECISIONS.index(decision)]
    rows: list[tuple[EdgeKey, Sequence[int], list[Mapping[str, Any]]]] = []
    for key, edges in parts.items():
        if namespace is not None and key[0] != namespace:
            continue
        counts = [sum(int(e[name]) for e in edges) for name in COUNTERS]
        if not any(counts):
            continue  # idle in the window everywhere
        if wanted is not None and not counts[COUNTERS.index(wanted)]:
            continue
        if tier is not None and not any(tier in e["tiers"] for e in edges):
            continue
        rows.append((key, counts, edges))
    version = sum(int(s["version"]) for s in shares)
    return graph_json(window, fold_edges(rows, limit, _merged_edge), tracked, max_edges, version)


def _merged_edge(edges: list[Mapping[str, Any]], counts: Sequence[int]) -> dict[str, Any]:
    decision = decision_of(counts)
    by_time = sorted(edges, key=lambda e: float(e["seen"]))
    latest = by_time[-1]
    counted = [e for e in by_time if any(e[name] for name in COUNTERS)]
    ruling = next((e for e in reversed(counted) if e["decision"] == decision), counted[-1])
    threats: dict[tuple[Any, Any], Mapping[str, Any]] = {}
    for e in by_time:
        for t in e["threats"]:
            if len(threats) < MAX_THREATS_PER_EDGE:
                threats.setdefault((t["feed"], t["indicator"]), t)
    return {
        "source": dict(latest["source"]),
        "destination": dict(latest["destination"]),
        "decision": decision,
        "tier": ruling["tier"],
        "rule": ruling["rule"],
        "reason": ruling["reason"],
        "threats": [dict(t) for t in threats.values()],
        "last_seen": latest["last_seen"],
        **dict(zip(COUNTERS, counts, strict=True)),
    }


def resume_after(after: int, newest: int) -> int:
    """What a worker answers flows after: ``after``, or 0 when its own numbers are below it."""
    return after if after <= newest else 0


def _time_key(flow: Mapping[str, Any]) -> float:
    text = flow.get("time")
    return datetime.fromisoformat(text).timestamp() if text else 0.0


class RecentFlows:
    """The recent refused flows of every worker in one ring, numbered anew (module docstring)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be positive")
        self._ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.seq = 0  # the ring's own sequence number of its newest flow
        self._taken: dict[int, tuple[object, int]] = {}  # slot -> (its process, last seq taken)

    def after(self, slot: int, process: object) -> int:
        """The worker sequence number to ask ``slot``'s flows after (0: all it holds)."""
        taken = self._taken.get(slot)
        return taken[1] if taken is not None and taken[0] == process else 0

    def take(self, answers: Iterable[tuple[int, object, int, Sequence[Mapping[str, Any]]]]) -> int:
        """Add what each worker answered; return how many flows were new.

        An answer is (slot, its process, the worker's newest sequence number, its flows with
        a ``seq`` above ``after(slot, process)``, in any order).
        """
        fresh: list[tuple[float, int, int, Mapping[str, Any]]] = []
        for slot, process, newest, flows in answers:
            last = self.after(slot, process)
            if newest < last:
                last = 0  # a process numbering from 1 again
            fresh.extend((_time_key(f), slot, int(f["seq"]), f) for f in flows if f["seq"] > last)
            self._taken[slot] = (process, newest)
        fresh.sort(key=lambda r: r[:3])
        for *_, flow in fresh:
            self.seq += 1
            self._ring.append({**flow, "seq": self.seq})
        return len(fresh)

    def recent_flows(
        self, *, decision: str | None = None, limit: int = 100, after: int = 0
    ) -> list[dict[str, Any]]:
        """Newest first, as ``EgressMap.recent_flows`` answers (``after``: only newer ``seq``)."""
        if decision is not None and decision not in ("denied", "would_deny"):
            raise ValueError("decision must be denied or would_deny")
        out: list[dict[str, Any]] = []
        for flow in reversed(self._ring):
            if flow["seq"] <= after or len(out) >= limit:
                break
            if decision is None or flow["decision"] == decision:
                out.append(flow)
        return out
