"""The egress map: a bounded, windowed aggregate of who talks to what, and what was refused.

Rules (the admin page and API read it; the proxy only ever adds to it):

- An **edge** is (source namespace, source app, destination host, port). The app is the
  workload's ``app.kubernetes.io/name`` or ``app`` label, else its pod; a source no workload
  claims is namespace ``-``, app ``unknown``. Each edge remembers its last verdict per action
  (so its tier, rule and reason), the feed matches seen on it, its last source address and
  when it was last seen.
- Time is cut into buckets of ``bucket`` seconds (a minute); the map keeps the last ``span``
  buckets, enough for the longest window. A bucket holds, per edge seen in it, one list of
  counters: flows, allowed, denied, would-deny, bytes out, bytes in.
- **Hot path** (``flow_decided``, ``flow_ended``, called for every flow): one dict lookup of the
  flow's (source address, host, port) to its workload and edge (the edge is worked out once per
  key and workload), one lookup of the edge's counters in the current bucket, integer
  additions; the end reuses the decision's counters while the bucket is the same. A new bucket
  clears the slot it reuses (``dict.clear``). Time comes from the flow (``started_mono``,
  ``ended_mono``): a flow older than the current bucket counts in the current bucket.
- **Bounded**: at most ``max_edges`` edges; flows of new edges beyond that count on one edge,
  ``other``. The key cache holds at most ``max_keys`` keys and is emptied whole when full.
  ``sweep()`` (off the hot path) drops edges idle for the whole span. Denied and would-deny
  flows are kept in a ring of ``recent`` entries, each with a sequence number.
- **Queries** (``graph``, ``recent_flows``) sum a window's buckets; they run off the hot path.
  The graph shows the top ``limit`` edges by flows and folds the rest into one edge per source
  to ``(other destinations)``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from egressgw.decision.verdict import UNDECIDED, Verdict
from egressgw.flow import Flow, ip_text
from egressgw.identity.workload import SERVICE_LABELS, Workload

DEFAULT_BUCKET = 60.0  # seconds per bucket: windows are whole numbers of these
DEFAULT_WINDOWS = (300.0, 3600.0)  # 5 minutes and an hour
DEFAULT_MAX_EDGES = 5_000  # ~1 KiB each with an hour of minute buckets: a few MiB at most
DEFAULT_RECENT = 500  # denied and would-deny flows kept for the table
DEFAULT_GRAPH_LIMIT = 300  # edges a graph answer shows before folding into "other"
MAX_THREATS_PER_EDGE = 8  # distinct (feed, indicator) pairs remembered per edge

ACTIONS = ("connection_allowed", "connection_denied", "would_deny")
DECISIONS = ("allowed", "denied", "would_deny")  # the API's names, in the same order
# Counter positions in a bucket's list.
FLOWS, ALLOWED, DENIED, WOULD_DENY, BYTES_OUT, BYTES_IN = range(6)
_ACTION_INDEX = {
    "connection_allowed": ALLOWED,
    "connection_denied": DENIED,
    "would_deny": WOULD_DENY,
}
OTHER_DESTINATIONS = "(other destinations)"
EdgeKey = tuple[str, str, str, int]  # (source namespace, app, destination host, port)
OTHER_KEY: EdgeKey = ("other", "other", "other", 0)  # where flows of edges past the cap count
T = TypeVar("T")


class Edge:
    """One source app -> destination, and what is remembered of it beyond the counters."""

    __slots__ = (
        "app",
        "bucket_id",
        "dest",
        "key",
        "last_seen",
        "namespace",
        "port",
        "source",
        "threats",
        "verdicts",
    )

    def __init__(self, namespace: str, app: str, dest: str, port: int) -> None:
        self.namespace = namespace
        self.app = app
        self.dest = dest
        self.port = port
        self.key = (namespace, app, dest, port)
        self.verdicts: list[Verdict | None] = [None, None, None, None]  # by counter position
        self.threats: dict[tuple[str, str], str] = {}  # (feed, indicator) -> description
        self.last_seen = 0.0  # wall clock
        self.source = ""  # the last source address (what explain is asked with)
        self.bucket_id = -1  # the last bucket a flow of this edge counted in

    def add_threats(self, threats: Iterable[dict[str, Any]]) -> None:
        """Remember the feed matches of one flow (at most MAX_THREATS_PER_EDGE)."""
        for t in threats:
            if len(self.threats) >= MAX_THREATS_PER_EDGE:
                return
            atomic = str(t.get("matched", {}).get("atomic", ""))
            description = str(t.get("indicator", {}).get("description", atomic))
            self.threats.setdefault((str(t.get("feed", "")), atomic), description)


def source_of(w: Workload) -> tuple[str, str]:
    """A workload's (namespace, app) as the map names it."""
    if w.namespace is None:
        return "-", "unknown"
    labels = w.label_map
    app = next((labels[k] for k in SERVICE_LABELS if k in labels), None)
    return w.namespace, app or w.pod or "-"


def _iso(t: float) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat() if t else None


def check_decision(decision: str | None) -> None:
    """ValueError unless ``decision`` is None or one a graph can be filtered by."""
    if decision is not None and decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}")


def decision_of(counts: Sequence[int]) -> str:
    """The colour of an edge: denied if any flow was, else would_deny if any, else allowed."""
    if counts[DENIED]:
        return "denied"
    if counts[WOULD_DENY]:
        return "would_deny"
    return "allowed"


class EgressMap:
    """A FlowConsumer keeping the egress map (see the module docstring for the rules)."""

    def __init__(
        self,
        *,
        bucket: float = DEFAULT_BUCKET,
        windows: Sequence[float] = DEFAULT_WINDOWS,
        max_edges: int = DEFAULT_MAX_EDGES,
        recent: int = DEFAULT_RECENT,
        max_keys: int | None = None,
    ) -> None:
        if bucket <= 0 or not windows or max_edges < 1 or recent < 1:
            raise ValueError("bucket, windows, max_edges and recent must be positive")
        for w in windows:
            if w < bucket or w % bucket:
                raise ValueError(f"window {w:g}s is not a whole number of {bucket:g}s buckets")
        self.bucket = bucket
        self.windows = tuple(sorted(windows))
        self.span = int(self.windows[-1] // bucket)
        self.max_edges = max_edges
        self.max_keys = max_keys if max_keys is not None else 4 * max_edges
        self._buckets: list[dict[Edge, list[int]]] = [{} for _ in range(self.span)]
        self._ids = [-1] * self.span  # which bucket each slot holds
        self._cur_id = -1
        self._cur: dict[Edge, list[int]] = self._buckets[0]
        self._keys: dict[tuple[str, Any, int], tuple[Workload, Edge]] = {}
        self._edges: dict[tuple[str, str, str, int], Edge] = {}
        self.other = Edge(*OTHER_KEY)
        self._recent: collections.deque[tuple[int, float, str, Edge, str, Verdict, Any]] = (
            collections.deque(maxlen=recent)
        )
        self.seq = 0  # sequence number of the last recent flow
        self.version = 0  # bumped on every change: the live stream polls it
        self._closed: dict[float, tuple[tuple[float, int, int], dict[Edge, list[int]]]] = {}
        self._next_sweep = 0.0

    # -- hot path ---------------------------------------------------------------------------
    # The key cache is keyed by (source address, host name, port): strings hash once and keep
    # their hash, where Workload and Host are dataclasses hashed field by field in Python. The
    # cached workload is compared by identity: the inventories hand out one object per workload.
    def flow_decided(self, flow: Flow) -> None:
        """Count the flow on its edge in the current bucket."""
        host = flow.host
        name = host.name if host is not None else None
        cached = self._keys.get((flow.source_text, name if name is not None else host, flow.port))
        if cached is None or cached[0] is not flow.workload:
            edge = self._edge_for(flow)
        else:
            edge = cached[1]
        bucket_id = int(flow.started_mono // self.bucket)
        if bucket_id > self._cur_id:
            self._advance(bucket_id)
        counters = self._cur.get(edge)
        if counters is None:
            counters = self._cur[edge] = [0, 0, 0, 0, 0, 0]
        flow.map_counters = counters
        flow.map_bucket = edge.bucket_id = self._cur_id
        verdict = flow.verdict or UNDECIDED
        i = _ACTION_INDEX[verdict.action]
        counters[FLOWS] += 1
        counters[i] += 1
        edge.verdicts[i] = verdict
        edge.last_seen = flow.started
        edge.source = flow.source_text
        if flow.threats:
            edge.add_threats(flow.threats)
        if i != ALLOWED:
            self.seq += 1
            self._recent.append(
                (self.seq, flow.started, flow.id, edge, flow.source_text, verdict, flow.threats)
            )
        self.version += 1

    def flow_ended(self, flow: Flow) -> None:
        """Add the flow's bytes to its edge in the current bucket."""
        if not (flow.bytes_out or flow.bytes_in):
            return
        counters = flow.map_counters
        bucket_id = int((flow.ended_mono or flow.started_mono) // self.bucket)
        if counters is None or bucket_id != flow.map_bucket or bucket_id != self._cur_id:
            # A later bucket than the decision's (a long flow): find the edge's counters there.
            host = flow.host
            name = host.name if host is not None else None
            cached = self._keys.get(
                (flow.source_text, name if name is not None else host, flow.port)
            )
            if cached is None or cached[0] is not flow.workload:
                edge = self._edge_for(flow)
            else:
                edge = cached[1]
            if bucket_id > self._cur_id:
                self._advance(bucket_id)
            counters = self._cur.get(edge)
            if counters is None:
                counters = self._cur[edge] = [0, 0, 0, 0, 0, 0]
            edge.bucket_id = self._cur_id
        counters[BYTES_OUT] += flow.bytes_out
        counters[BYTES_IN] += flow.bytes_in
        self.version += 1

    def _advance(self, bucket_id: int) -> None:
        # Once per bucket: clear the slots the new bucket and any skipped ones reuse.
        first = max(self._cur_id + 1, bucket_id - self.span + 1)
        for b in range(first, bucket_id + 1):
            slot = b % self.span
            self._buckets[slot].clear()
            self._ids[slot] = b
        self._cur_id = bucket_id
        self._cur = self._buckets[bucket_id % self.span]

    def _edge_for(self, flow: Flow) -> Edge:
        # Once per (workload, host, port) key while it stays cached.
        namespace, app = source_of(flow.workload)
        host = flow.host
        dest = "-" if host is None else host.name or ip_text(host.ip)  # type: ignore[arg-type]
        key = (namespace, app, dest, flow.port)
        edge = self._edges.get(key)
        if edge is None:
            if len(self._edges) >= self.max_edges:
                edge = self.other
            else:
                edge = self._edges[key] = Edge(*key)
        if len(self._keys) >= self.max_keys:
            self._keys.clear()
        name = host.name if host is not None else None
        key2 = (flow.source_text, name if name is not None else host, flow.port)
        self._keys[key2] = (flow.workload, edge)
        return edge

    # -- off the hot path -------------------------------------------------------------------
    def sweep(self, now: float) -> int:
        """Drop edges with no flow in the whole span before ``now``; return how many.

        Does the walk over every edge at most once per bucket: call it as often as you like.
        """
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + self.bucket
        oldest = int(now // self.bucket) - self.span + 1
        idle = [k for k, e in self._edges.items() if e.bucket_id < oldest]
        for k in idle:
            del self._edges[k]
        if idle:
            self._keys.clear()  # cached keys may point at dropped edges (or at "other")
        return len(idle)

    @property
    def edge_count(self) -> int:
        """How many edges are tracked (not counting ``other``)."""
        return len(self._edges)

    def window_counts(self, now: float, window: float) -> dict[Edge, list[int]]:
        """Each edge's counters summed over the ``window`` seconds before ``now``.

        The buckets before the current one no longer change: their sum is kept per window
        until the next bucket starts, so a query adds only the current bucket to it.
        """
        newest = int(now // self.bucket)
        oldest = newest - max(1, int(window // self.bucket)) + 1
        key = (window, newest, self._cur_id)
        cached = self._closed.get(window)
        if cached is None or cached[0] != key:
            closed = _sum(
                self._buckets[slot]
                for slot, bucket_id in enumerate(self._ids)
                if oldest <= bucket_id <= newest and bucket_id != self._cur_id
            )
            self._closed[window] = cached = (key, closed)
        totals = {edge: list(counters) for edge, counters in cached[1].items()}
        if oldest <= self._cur_id <= newest:
            _add(totals, self._cur)
        return totals

    def graph(
        self,
        now: float,
        window: float,
        *,
        namespace: str | None = None,
        decision: str | None = None,
        tier: str | None = None,
        limit: int = DEFAULT_GRAPH_LIMIT,
    ) -> dict[str, Any]:
        """The edges of ``window`` (filtered), top ``limit`` by flows, the rest folded."""
        check_decision(decision)
        rows: list[tuple[EdgeKey, Sequence[int], Edge]] = []
        for edge, counts in self.window_counts(now, window).items():
            if namespace is not None and edge.namespace != namespace:
                continue
            if decision is not None and not counts[1 + DECISIONS.index(decision)]:
                continue
            if tier is not None and not any(
                v is not None and v.decision is not None and (v.decision.tier or "") == tier
                for v in edge.verdicts
            ):
                continue
            rows.append((edge.key, counts, edge))
        return graph_json(
            window,
            fold_edges(rows, limit, _edge_json),
            self.edge_count,
            self.max_edges,
            self.version,
        )

    def share(self, now: float, window: float) -> dict[str, Any]:
        """This map's part of a graph merged with other processes' (``mapmerge.merge_graphs``).

        Every tracked edge (and ``other``, when it counted in the window) as ``graph`` draws
        it, unfiltered and unfolded, with the window's counters (zeros for an edge idle in it:
        its threats, verdicts and last flow still count, as they do here), plus ``tiers`` (every
        tier among the edge's verdicts: the tier filter's question) and ``seen`` (``last_seen``
        in seconds).
        """
        counts = self.window_counts(now, window)
        idle = [0] * 6
        edges = []
        for edge in [*self._edges.values(), self.other]:
            c = counts.get(edge)
            if c is None:
                if edge is self.other:
                    continue
                c = idle
            e = _edge_json(edge, c)
            tiers = {v.decision.tier for v in edge.verdicts if v is not None and v.decision}
            e["tiers"] = sorted(t or "" for t in tiers)
            e["seen"] = edge.last_seen
            edges.append(e)
        return {"edges": edges, "version": self.version}

    def recent_flows(
        self, *, decision: str | None = None, limit: int = 100, after: int = 0
    ) -> list[dict[str, Any]]:
        """Recent denied and would-deny flows, newest first (``after``: only newer sequences)."""
        if decision is not None and decision not in ("denied", "would_deny"):
            raise ValueError("decision must be denied or would_deny")
        out: list[dict[str, Any]] = []
        for seq, started, flow_id, edge, source, verdict, threats in reversed(self._recent):
            if seq <= after or len(out) >= limit:
                break
            name = DECISIONS[_ACTION_INDEX[verdict.action] - 1]
            if decision is not None and name != decision:
                continue
            d = verdict.decision
            out.append(
                {
                    "seq": seq,
                    "id": flow_id,
                    "time": _iso(started),
                    "source": {"namespace": edge.namespace, "app": edge.app, "ip": source},
                    "destination": {"host": edge.dest, "port": edge.port},
                    "decision": name,
                    "status": verdict.status,
                    "reason": verdict.reason,
                    "tier": d.tier if d is not None else None,
                    "rule": d.rule_ref if d is not None else None,
                    "threats": [
                        {"feed": t.get("feed"), "indicator": t.get("matched", {}).get("atomic")}
                        for t in threats
                    ],
                }
            )
        return out


def fold_edges(
    rows: list[tuple[EdgeKey, Sequence[int], T]],
    limit: int,
    render: Callable[[T, Sequence[int]], dict[str, Any]],
) -> list[dict[str, Any]]:
    """The top ``limit`` rows by flows (then key) rendered, the rest folded: one per source.

    ``rows`` are (edge key, counters, what ``render`` draws the edge from); sorted in place.
    """
    rows.sort(key=lambda r: (-r[1][FLOWS], r[0]))
    shown, rest = rows[:limit], rows[limit:]
    folded: dict[tuple[str, str], list[int]] = {}
    for key, counts, _ in rest:
        total = folded.setdefault((key[0], key[1]), [0] * 6)
        for i, v in enumerate(counts):
            total[i] += v
    edges = [render(item, counts) for _, counts, item in shown]
    edges += [
        {
            "source": {"namespace": ns, "app": app},
            "destination": {"host": OTHER_DESTINATIONS, "port": 0},
            "decision": decision_of(c),
            "folded": True,
            **_counts_json(c),
        }
        for (ns, app), c in sorted(folded.items())
    ]
    return edges


def graph_json(
    window: float, edges: list[dict[str, Any]], tracked: int, max_edges: int, version: int
) -> dict[str, Any]:
    """A graph answer: the window's (folded) edges and what the map holds."""
    return {
        "window": window,
        "edges": edges,
        "namespaces": sorted({e["source"]["namespace"] for e in edges}),
        "tracked_edges": tracked,
        "max_edges": max_edges,
        "version": version,
    }


def _add(totals: dict[Edge, list[int]], bucket: dict[Edge, list[int]]) -> None:
    for edge, counters in bucket.items():
        total = totals.get(edge)
        if total is None:
            totals[edge] = list(counters)
        else:
            for i, v in enumerate(counters):
                total[i] += v


def _sum(buckets: Iterable[dict[Edge, list[int]]]) -> dict[Edge, list[int]]:
    totals: dict[Edge, list[int]] = {}
    for bucket in buckets:
        _add(totals, bucket)
    return totals


def _counts_json(c: Sequence[int]) -> dict[str, int]:
    return {
        "flows": c[FLOWS],
        "allowed": c[ALLOWED],
        "denied": c[DENIED],
        "would_deny": c[WOULD_DENY],
        "bytes_out": c[BYTES_OUT],
        "bytes_in": c[BYTES_IN],
    }


def _edge_json(edge: Edge, counts: Sequence[int]) -> dict[str, Any]:
    # The rule shown is the one of the edge's colour: the denying rule of a red edge.
    decision = decision_of(counts)
    verdict = edge.verdicts[1 + DECISIONS.index(decision)] or next(
        (v for v in edge.verdicts if v is not None), None
    )
    d = verdict.decision if verdict is not None else None
    return {
        "source": {"namespace": edge.namespace, "app": edge.app, "ip": edge.source},
        "destination": {"host": edge.dest, "port": edge.port},
        "decision": decision,
        "tier": d.tier if d is not None else None,
        "rule": d.rule_ref if d is not None else None,
        "reason": verdict.reason if verdict is not None else None,
        "threats": [
            {"feed": feed, "indicator": atomic, "description": desc}
            for (feed, atomic), desc in edge.threats.items()
        ],
        "last_seen": _iso(edge.last_seen),
        **_counts_json(counts),
    }
