"""The workers' egress maps merged: graphs as one map's, the recent-flows ring renumbered."""

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressgw.decision.names import Host
from egressgw.decision.policy import Decision
from egressgw.decision.verdict import Verdict
from egressgw.flow import Flow
from egressgw.identity.workload import Workload
from egressgw.record.egressmap import OTHER_DESTINATIONS, EgressMap
from egressgw.record.mapmerge import RecentFlows, merge_graphs, resume_after

IP = ipaddress.ip_address("198.51.100.7")
WORKLOADS = (
    Workload.make("shop", "cart-1", {"app": "cart"}),
    Workload.make("billing", "inv-1", {"app.kubernetes.io/name": "invoicer"}),
    Workload(),
)
ALLOW = Verdict.allow(IP, "allowed by t/saas", Decision("allow", "t", "saas", "ok"))
DENY = Verdict.deny("denied by sec/no-pastebin", decision=Decision("deny", "sec", "no-paste", "x"))
AUDIT = Verdict.allow(IP, "ok", Decision("allow", "t", "r", "ok", audits=("would deny: t/a",)))
THREATS = [
    {"feed": "urlhaus", "matched": {"atomic": f"evil{i}.test"}, "indicator": {"description": "d"}}
    for i in range(3)
]


def flow(w: Workload, host: str, verdict: Verdict, t: float) -> Flow:
    """A decided flow from workload ``w`` to ``host:443`` at monotonic time ``t``."""
    f = Flow(ipaddress.ip_address("10.0.0.5"), 40000, 1.7e9 + t, t)
    f.source_text = f"10.0.0.{WORKLOADS.index(w) + 5}"
    f.workload, f.host, f.port, f.verdict = w, Host(host, None), 443, verdict
    return f


def feed(m: EgressMap, f: Flow, sent: int) -> None:
    """Decide ``f`` on ``m``; with ``sent`` bytes, end it in the same minute."""
    m.flow_decided(f)
    if sent:
        f.bytes_out, f.bytes_in, f.ended_mono = sent, 2 * sent, f.started_mono
        m.flow_ended(f)


def normal(edge: dict[str, Any]) -> dict[str, Any]:
    """An edge with its threats in a fixed order (the merge may see them in another)."""
    if "threats" in edge:
        edge = {**edge, "threats": sorted(edge["threats"], key=lambda t: t["indicator"])}
    return edge


events_st = st.lists(
    st.tuples(
        st.integers(0, 2),  # workload
        st.integers(0, 6),  # destination
        st.sampled_from([ALLOW, DENY, AUDIT]),
        st.floats(0, 3000, allow_nan=False),  # time
        st.integers(0, 2),  # worker
        st.sampled_from([0, 0, 100]),  # bytes
        st.integers(0, 3),  # a threat (3: none)
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    events_st,
    st.integers(2, 3),
    st.integers(1, 6),
    st.sampled_from([None, "shop", "billing", "-"]),
    st.sampled_from([None, "allowed", "denied", "would_deny"]),
    st.sampled_from([None, "t", "sec", "nope"]),
)
def test_merged_shares_draw_the_graph_of_one_map_fed_every_flow(
    events: list[tuple[int, int, Verdict, float, int, int, int]],
    workers: int,
    limit: int,
    namespace: str | None,
    decision: str | None,
    tier: str | None,
) -> None:
    """Flows split between workers, merged: the same edges, counts, decisions, rules, fold."""
    whole, parts = EgressMap(), [EgressMap() for _ in range(workers)]
    for w, dest, verdict, t, worker, sent, threat in sorted(events, key=lambda e: e[3]):
        for m in (whole, parts[worker % workers]):
            f = flow(WORKLOADS[w], f"h{dest}.test", verdict, t)
            if threat < len(THREATS) and verdict is DENY:
                f.threats = (THREATS[threat],)
            feed(m, f, sent)
    now = max((e[3] for e in events), default=0.0)
    for window in (300.0, 3600.0):
        want = whole.graph(
            now, window, namespace=namespace, decision=decision, tier=tier, limit=limit
        )
        got = merge_graphs(
            [p.share(now, window) for p in parts],
            window,
            max_edges=whole.max_edges,
            namespace=namespace,
            decision=decision,
            tier=tier,
            limit=limit,
        )
        assert [normal(e) for e in got["edges"]] == [normal(e) for e in want["edges"]]
        assert {k: v for k, v in got.items() if k != "edges"} == {
            k: v for k, v in want.items() if k != "edges"
        }


def test_the_merge_folds_past_the_limit_and_unites_threats() -> None:
    """Counts of one edge seen by two workers add up before the top ``limit`` is chosen."""
    a, b = EgressMap(), EgressMap()
    shop = WORKLOADS[0]
    for _ in range(3):
        a.flow_decided(flow(shop, "big.test", ALLOW, 100.0))
    for _ in range(2):
        a.flow_decided(flow(shop, "mid.test", ALLOW, 100.0))
        b.flow_decided(flow(shop, "small.test", ALLOW, 100.0))
    b.flow_decided(flow(shop, "mid.test", ALLOW, 100.0))
    for m, threat in ((a, THREATS[0]), (b, THREATS[1])):
        f = flow(shop, "big.test", DENY, 110.0)
        f.threats = (threat,)
        m.flow_decided(f)
    g = merge_graphs([a.share(110, 300), b.share(110, 300)], 300, max_edges=10, limit=2)
    assert [(e["destination"]["host"], e["flows"]) for e in g["edges"]] == [
        ("big.test", 5),
        ("mid.test", 3),
        (OTHER_DESTINATIONS, 2),
    ]
    big = g["edges"][0]
    assert (big["decision"], big["rule"], big["denied"]) == ("denied", "sec/no-paste", 2)
    assert {t["indicator"] for t in big["threats"]} == {"evil0.test", "evil1.test"}
    assert g["tracked_edges"] == 3 and g["version"] == a.version + b.version
    with pytest.raises(ValueError, match="decision must be one of"):
        merge_graphs([], 300, max_edges=10, decision="maybe")


def take(ring: RecentFlows, slot: int, process: object, m: EgressMap) -> int:
    """One fetch from one worker, as the supervisor asks it and the worker answers."""
    after = resume_after(ring.after(slot, process), m.seq)
    return ring.take([(slot, process, m.seq, m.recent_flows(limit=500, after=after))])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1)), max_size=60))
def test_the_ring_numbers_every_refused_flow_once_in_increasing_order(
    steps: list[tuple[int, int]],
) -> None:
    """Flows of two workers, fetched at random moments, each appear once, seq increasing."""
    maps, ring, refused = [EgressMap(), EgressMap()], RecentFlows(1000), []
    for i, (what, slot) in enumerate(steps):
        if what == 2:
            take(ring, slot, 100 + slot, maps[slot])
            continue
        f = flow(WORKLOADS[0], "x.test", (ALLOW, DENY)[what], float(i))
        maps[slot].flow_decided(f)
        if what:
            refused.append(f.id)
    for slot in (0, 1):
        take(ring, slot, 100 + slot, maps[slot])
    got = ring.recent_flows(limit=1000)
    seqs = [f["seq"] for f in got]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs)
    assert sorted(f["id"] for f in got) == sorted(refused)
    assert ring.recent_flows(after=ring.seq) == []


def test_the_ring_takes_a_restarted_worker_from_the_start() -> None:
    """A worker whose numbers start again, or a new process in the slot, is taken whole."""
    ring = RecentFlows(100)
    first = EgressMap()
    for i in range(5):
        first.flow_decided(flow(WORKLOADS[0], f"old{i}.test", DENY, float(i)))
    assert take(ring, 0, 7, first) == 5
    assert take(ring, 0, 7, first) == 0  # nothing new
    again = EgressMap()  # the same process id (as a test can make it), numbering from 1
    again.flow_decided(flow(WORKLOADS[0], "new0.test", DENY, 10.0))
    assert take(ring, 0, 7, again) == 1
    other = EgressMap()  # a new process that already numbered past the last taken
    for i in range(3):
        other.flow_decided(flow(WORKLOADS[0], f"pid8-{i}.test", DENY, 20.0 + i))
    assert take(ring, 0, 8, other) == 3
    hosts = [f["destination"]["host"] for f in ring.recent_flows(limit=3)]
    assert hosts == ["pid8-2.test", "pid8-1.test", "pid8-0.test"]
    assert [f["seq"] for f in ring.recent_flows(limit=100)] == list(range(9, 0, -1))


def test_the_ring_is_bounded_and_numbers_oldest_first_across_workers() -> None:
    """Flows taken in one round are numbered by time; the ring keeps its size."""
    ring, a, b = RecentFlows(3), EgressMap(), EgressMap()
    a.flow_decided(flow(WORKLOADS[0], "a1.test", DENY, 1.0))
    b.flow_decided(flow(WORKLOADS[0], "b2.test", AUDIT, 2.0))
    a.flow_decided(flow(WORKLOADS[0], "a3.test", DENY, 3.0))
    b.flow_decided(flow(WORKLOADS[0], "b4.test", DENY, 4.0))
    answers = [(i, i, m.seq, m.recent_flows(limit=10)) for i, m in enumerate((a, b))]
    assert ring.take(answers) == 4
    got = ring.recent_flows()
    assert [f["destination"]["host"] for f in got] == ["b4.test", "a3.test", "b2.test"]
    assert [f["seq"] for f in got] == [4, 3, 2]
    assert [f["decision"] for f in ring.recent_flows(decision="would_deny")] == ["would_deny"]
    with pytest.raises(ValueError, match="denied or would_deny"):
        ring.recent_flows(decision="allowed")
