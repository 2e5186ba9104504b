"""The egress map: edges, windows, bounds, the recent-flows ring."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressgw.decision.names import Host
from egressgw.decision.policy import Decision
from egressgw.decision.verdict import Verdict
from egressgw.flow import Flow
from egressgw.identity.workload import Workload
from egressgw.record.egressmap import OTHER_DESTINATIONS, EgressMap

IP = ipaddress.ip_address("198.51.100.7")
SHOP = Workload.make("shop", "cart-1", {"app": "cart"})
BILLING = Workload.make("billing", "inv-1", {"app.kubernetes.io/name": "invoicer"})
ALLOW = Verdict.allow(IP, "allowed by t/saas", Decision("allow", "t", "saas", "ok"))
DENY = Verdict.deny("denied by sec/no-pastebin", decision=Decision("deny", "sec", "no-paste", "x"))
AUDIT = Verdict.allow(IP, "ok", Decision("allow", "t", "r", "ok", audits=("would deny: t/a",)))
THREAT = {"feed": "urlhaus", "matched": {"atomic": "evil.test"}, "indicator": {"description": "d"}}


def flow(w: Workload, host: str, verdict: Verdict, t: float = 1000.0, port: int = 443) -> Flow:
    """A decided flow from workload ``w`` to ``host:port`` at monotonic time ``t``."""
    f = Flow(ipaddress.ip_address("10.0.0.5"), 40000, 1.7e9 + t, t)
    f.source_text = "10.0.0.5"
    f.workload, f.host, f.port, f.verdict = w, Host(host, None), port, verdict
    return f


def test_edges_count_flows_by_decision_and_remember_rule_and_threats() -> None:
    """Flows of one app to one destination add up on one edge with the denying rule shown."""
    m = EgressMap()
    m.flow_decided(flow(SHOP, "api.stripe.test", ALLOW))
    m.flow_decided(flow(SHOP, "api.stripe.test", ALLOW))
    f = flow(SHOP, "evil.test", DENY)
    f.threats = (THREAT,)
    m.flow_decided(f)
    m.flow_decided(flow(BILLING, "api.stripe.test", AUDIT))
    edges = {(e["source"]["app"], e["destination"]["host"]): e for e in m.graph(1000, 300)["edges"]}
    assert edges["cart", "api.stripe.test"]["flows"] == 2
    assert edges["cart", "api.stripe.test"]["rule"] == "t/saas"
    evil = edges["cart", "evil.test"]
    assert (evil["decision"], evil["denied"], evil["rule"]) == ("denied", 1, "sec/no-paste")
    assert evil["threats"] == [{"feed": "urlhaus", "indicator": "evil.test", "description": "d"}]
    assert edges["invoicer", "api.stripe.test"]["decision"] == "would_deny"


def test_bytes_are_added_when_the_flow_ends() -> None:
    """An ended flow adds its bytes each way to its edge."""
    m = EgressMap()
    f = flow(SHOP, "api.stripe.test", ALLOW)
    m.flow_decided(f)
    f.bytes_out, f.bytes_in, f.ended_mono = 100, 5000, 1030.0
    m.flow_ended(f)
    (edge,) = m.graph(1030, 300)["edges"]
    assert (edge["bytes_out"], edge["bytes_in"]) == (100, 5000)


def test_window_excludes_old_buckets() -> None:
    """A flow older than the window is not in it but is in the longer window."""
    m = EgressMap()
    m.flow_decided(flow(SHOP, "old.test", ALLOW, t=60.0))
    m.flow_decided(flow(SHOP, "new.test", ALLOW, t=1000.0))
    hosts_5m = {e["destination"]["host"] for e in m.graph(1000, 300)["edges"]}
    hosts_1h = {e["destination"]["host"] for e in m.graph(1000, 3600)["edges"]}
    assert hosts_5m == {"new.test"} and hosts_1h == {"old.test", "new.test"}


def test_edges_beyond_the_cap_count_as_other_and_sweep_frees_them() -> None:
    """Past max_edges new edges fold into 'other'; idle edges are swept after the span."""
    m = EgressMap(max_edges=2, windows=(120,))
    for host in ("a.test", "b.test", "c.test", "d.test"):
        m.flow_decided(flow(SHOP, host, ALLOW))
    assert m.edge_count == 2
    hosts = {e["source"]["namespace"] for e in m.graph(1000, 120)["edges"]}
    assert hosts == {"shop", "other"}
    assert m.sweep(1000.0) == 0
    assert m.sweep(1000.0 + 180) == 2 and m.edge_count == 0
    assert m.sweep(1000.0 + 181) == 0  # at most one walk per bucket
    m.flow_decided(flow(SHOP, "d.test", ALLOW, t=1200.0))
    assert [e["destination"]["host"] for e in m.graph(1200, 120)["edges"]] == ["d.test"]


def test_graph_folds_edges_past_the_limit_and_filters() -> None:
    """Edges past ``limit`` fold per source; filters select namespace, decision and tier."""
    m = EgressMap()
    for i in range(5):
        for _ in range(i + 1):
            m.flow_decided(flow(SHOP, f"h{i}.test", ALLOW))
    m.flow_decided(flow(BILLING, "evil.test", DENY))
    g = m.graph(1000, 300, namespace="shop", limit=2)
    assert [e["destination"]["host"] for e in g["edges"]] == [
        "h4.test",
        "h3.test",
        OTHER_DESTINATIONS,
    ]
    assert g["edges"][-1]["flows"] == 1 + 2 + 3
    assert [e["source"]["app"] for e in m.graph(1000, 300, decision="denied")["edges"]] == [
        "invoicer"
    ]
    assert len(m.graph(1000, 300, tier="sec")["edges"]) == 1
    with pytest.raises(ValueError, match="decision must be one of"):
        m.graph(1000, 300, decision="maybe")


def test_recent_flows_ring_keeps_denied_and_would_deny_newest_first() -> None:
    """Only refused and audited flows enter the bounded ring, with reason and rule."""
    m = EgressMap(recent=2)
    m.flow_decided(flow(SHOP, "a.test", DENY))
    m.flow_decided(flow(SHOP, "b.test", ALLOW))
    m.flow_decided(flow(SHOP, "c.test", AUDIT))
    m.flow_decided(flow(SHOP, "d.test", DENY))
    recent = m.recent_flows()
    assert [r["destination"]["host"] for r in recent] == ["d.test", "c.test"]
    assert (
        recent[0]["reason"] == "denied by sec/no-pastebin" and recent[0]["rule"] == "sec/no-paste"
    )
    assert [r["decision"] for r in m.recent_flows(decision="would_deny")] == ["would_deny"]
    assert m.recent_flows(after=recent[0]["seq"]) == []


def test_unknown_sources_and_windows_not_whole_buckets() -> None:
    """An unattributed source is namespace '-', app 'unknown'; a 90 s window is refused."""
    m = EgressMap()
    m.flow_decided(flow(Workload(), "x.test", DENY))
    (e,) = m.graph(1000, 300)["edges"]
    assert (e["source"]["namespace"], e["source"]["app"]) == ("-", "unknown")
    with pytest.raises(ValueError, match="whole number"):
        EgressMap(windows=(90,))


flows_st = st.lists(
    st.tuples(
        st.integers(0, 5),  # destination
        st.sampled_from([ALLOW, DENY, AUDIT]),
        st.floats(0, 7200, allow_nan=False),  # time offset
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(flows_st, st.integers(1, 4))
def test_window_totals_match_a_brute_force_count(
    events: list[tuple[int, Verdict, float]], max_edges: int
) -> None:
    """Summed over edges (and 'other'), a window counts exactly the flows of its buckets."""
    m = EgressMap(max_edges=max_edges)
    now_id = -1
    counted: list[tuple[int, str]] = []
    for dest, verdict, t in sorted(events, key=lambda e: e[2]):
        m.flow_decided(flow(SHOP, f"h{dest}.test", verdict, t=t))
        now_id = max(now_id, int(t // 60))
        counted.append((now_id, verdict.action))
    assert m.edge_count <= max_edges
    if not counted:
        return
    for window in (300, 3600):
        got = m.window_counts(now_id * 60, window)
        want = [a for b, a in counted if b > now_id - window // 60]
        assert sum(c[0] for c in got.values()) == len(want)
        assert sum(c[2] for c in got.values()) == want.count("connection_denied")


def test_a_new_workload_at_the_same_address_gets_its_own_edge() -> None:
    """The key cache is checked against the flow's workload: a replaced pod is not misattributed."""
    m = EgressMap()
    m.flow_decided(flow(SHOP, "api.stripe.test", ALLOW))
    m.flow_decided(flow(BILLING, "api.stripe.test", ALLOW))  # same source address, new owner
    apps = sorted(e["source"]["app"] for e in m.graph(1000, 300)["edges"])
    assert apps == ["cart", "invoicer"]


def test_bytes_of_a_long_flow_count_in_the_bucket_it_ended() -> None:
    """A flow ending minutes after its decision adds its bytes to the later bucket."""
    m = EgressMap()
    f = flow(SHOP, "api.stripe.test", ALLOW, t=1000.0)
    m.flow_decided(f)
    f.bytes_out, f.bytes_in, f.ended_mono = 7, 9, 1000.0 + 600
    m.flow_ended(f)
    (late,) = m.graph(1600, 300)["edges"]
    assert (late["flows"], late["bytes_out"], late["bytes_in"]) == (0, 7, 9)
    (both,) = m.graph(1600, 3600)["edges"]
    assert (both["flows"], both["bytes_in"]) == (1, 9)
