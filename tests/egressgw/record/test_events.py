"""Tests of the ECS event builder (pure core)."""

import ipaddress
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from egressgw.decision.names import Host
from egressgw.decision.policy import Decision
from egressgw.decision.verdict import Verdict
from egressgw.flow import Flow
from egressgw.identity.workload import UNKNOWN, Workload
from egressgw.record.events import _timestamp, to_common, to_decision_event, to_end_event

OBSERVER = {"vendor": "egressgw", "product": "egressgw", "type": "proxy"}


def make_flow(**kw: object) -> Flow:
    """A flow from payments to allowed.test:8443 decided by platform/payments-to-psp."""
    flow = Flow(ipaddress.ip_address("127.0.0.5"), 40000, 1_700_000_000.0, 100.0)
    flow.workload = Workload.make("payments", "api-1", {"app": "api"}, "api")
    flow.host = Host("allowed.test", None)
    flow.port = 8443
    flow.protocol = "tls"
    flow.sni = "allowed.test"
    flow.ip = ipaddress.ip_address("127.0.0.30")
    flow.verdict = Verdict.allow(
        flow.ip,
        "allowed by platform/payments-to-psp (payments/api -> allowed.test:8443)",
        Decision("allow", "platform", "payments-to-psp", "allow by platform/payments-to-psp"),
    )
    for k, v in kw.items():
        setattr(flow, k, v)
    return flow


def test_decision_event_fields() -> None:
    """The decision event carries who, where, the rule and the outcome in ECS fields."""
    doc = to_decision_event(make_flow(), OBSERVER)
    assert doc["@timestamp"] == "2023-11-14T22:13:20.000000Z"
    assert doc["event"]["action"] == "connection_allowed"
    assert doc["event"]["category"] == ["network"]
    assert doc["event"]["outcome"] == "success"
    assert doc["kubernetes"] == {
        "namespace": "payments",
        "pod": {"name": "api-1"},
        "labels": {"app": "api"},
        "serviceaccount": {"name": "api"},
    }
    assert doc["destination"] == {"domain": "allowed.test", "ip": "127.0.0.30", "port": 8443}
    assert doc["tls"]["client"]["server_name"] == "allowed.test"
    assert doc["rule"] == {"name": "payments-to-psp", "ruleset": "platform"}
    assert doc["source"] == {"ip": "127.0.0.5", "port": 40000}
    assert doc["observer"] == OBSERVER


def test_ids_pair_the_two_events() -> None:
    """Both events share flow.id and have distinct, stable event ids."""
    flow = make_flow(bytes_out=10, bytes_in=2000, ended_mono=100.25)
    start = to_decision_event(flow, OBSERVER)
    end = to_end_event(flow, OBSERVER, 1_700_000_000.25)
    assert start["flow"]["id"] == end["flow"]["id"] == flow.id
    assert start["event"]["id"] != end["event"]["id"]
    assert to_decision_event(flow, OBSERVER)["event"]["id"] == start["event"]["id"]
    assert end["event"]["duration"] == 250_000_000
    assert (end["source"]["bytes"], end["destination"]["bytes"], end["network"]["bytes"]) == (
        10,
        2000,
        2010,
    )


def test_denied_unknown_source_with_threat() -> None:
    """A feed denial of an unknown source is an alert with threat fields and no kubernetes."""
    threat = {
        "feed": "local-domains",
        "indicator": {"type": "domain-name", "url": {"domain": "evil.test"}},
        "matched": {
            "atomic": "sub.evil.test",
            "field": "destination.domain",
            "type": "indicator_match_rule",
        },
        "why": "parent domain",
    }
    flow = make_flow(
        workload=UNKNOWN,
        verdict=Verdict.deny(
            "denied by security/block-threat-feeds: sub.evil.test listed by feed local-domains"
        ),
        threats=(threat,),
    )
    doc = to_decision_event(flow, OBSERVER)
    assert "kubernetes" not in doc
    assert doc["event"]["kind"] == "alert" and doc["event"]["outcome"] == "failure"
    assert doc["event"]["type"] == ["connection", "denied"]
    assert doc["threat"]["feed"]["name"] == "local-domains"
    assert doc["threat"]["enrichments"][0]["matched"]["atomic"] == "sub.evil.test"


def test_http_fields() -> None:
    """Absolute-form flows carry url.* and http.request.method."""
    flow = make_flow(
        protocol="http",
        sni=None,
        method="POST",
        url="http://allowed.test:8080/x",
        port=8080,
        status=201,
    )
    doc = to_decision_event(flow, OBSERVER)
    assert doc["url"]["full"] == "http://allowed.test:8080/x"
    assert doc["http"] == {"request": {"method": "POST"}, "response": {"status_code": 201}}
    assert doc["network"]["protocol"] == "http"
    assert "tls" not in doc


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_timestamp_matches_datetime(epoch: float) -> None:
    """The cached-prefix timestamp equals datetime's ISO 8601 rendering to the microsecond."""
    expected = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")
    assert _timestamp(epoch) == expected.replace("+00:00", "Z")


def test_end_event_after_the_decision_equals_one_built_alone() -> None:
    """The end event reuses the decision's fields and leaves the decision event untouched."""
    decided = make_flow(bytes_out=10, bytes_in=20, ended_mono=101.5)
    common = to_common(decided, OBSERVER)
    decision = to_decision_event(decided, OBSERVER, common)
    before = repr(decision)
    reused = to_end_event(decided, OBSERVER, 1_700_000_001.5, common)
    alone = to_end_event(
        make_flow(bytes_out=10, bytes_in=20, ended_mono=101.5, id=decided.id),
        OBSERVER,
        1_700_000_001.5,
    )
    assert reused == alone
    assert reused["source"]["bytes"] == 10 and reused["network"]["bytes"] == 30
    assert repr(decision) == before and "bytes" not in decision["source"]


def test_a_requests_end_event_from_its_decision_has_the_status_that_came_after() -> None:
    """A request decided with no status yet: its end event, built on the decision's fields,
    equals one built alone with the status, and the decision event keeps none.
    """
    http = {"protocol": "http", "sni": None, "method": "GET", "url": "http://allowed.test/"}
    decided = make_flow(**http)
    common = to_common(decided, OBSERVER)
    decision = to_decision_event(decided, OBSERVER, common)
    decided.status, decided.bytes_out, decided.bytes_in, decided.ended_mono = 200, 5, 7, 100.2
    reused = to_end_event(decided, OBSERVER, 1_700_000_000.2, common)
    alone = make_flow(**http, status=200, bytes_out=5, bytes_in=7, ended_mono=100.2, id=decided.id)
    assert reused == to_end_event(alone, OBSERVER, 1_700_000_000.2)
    assert reused["http"]["response"] == {"status_code": 200}
    assert decision["http"] == {"request": {"method": "GET"}}


def test_the_builder_writes_nothing_into_the_flow() -> None:
    """Building both events leaves every field of the flow as it was (the builder is pure)."""
    flow = make_flow(bytes_out=10, bytes_in=20, ended_mono=101.5)
    before = dict(vars(flow))
    to_decision_event(flow, OBSERVER)
    to_end_event(flow, OBSERVER, 1_700_000_001.5, to_common(flow, OBSERVER))
    assert vars(flow) == before


def test_an_unreachable_audited_flow_keeps_its_audit() -> None:
    """An allowed flow whose destination fails is refused, unless audited (still would_deny)."""
    flow = make_flow()
    assert flow.verdict is not None
    refused = flow.verdict.unreachable(502)
    assert (refused.allowed, refused.action, refused.status) == (False, "connection_denied", 502)
    audited = Verdict.allow(
        ipaddress.ip_address("127.0.0.30"),
        "allowed by apps/x (ns -> a:1)",
        Decision("allow", "apps", "x", "r", audits=("would deny by security/y",)),
    )
    assert audited.action == "would_deny"
    assert audited.unreachable(504).action == "would_deny"


def test_pod_attribution_fields() -> None:
    """A pod's uid, owner, service name and how it was attributed are in both events."""
    w = Workload.make(
        "payments",
        "api-7d-x",
        {"app.kubernetes.io/name": "api"},
        uid="u1",
        owners=(("ReplicaSet", "api-7d"), ("Deployment", "api")),
        attribution="kubernetes-pod-ip",
    )
    audit = Decision("allow", "apps", "psp", "allow by apps/psp", audits=("would deny by x/y",))
    flow = make_flow(workload=w)
    flow.verdict = Verdict.allow(flow.ip, "allowed", audit)
    for doc in (to_decision_event(flow, OBSERVER), to_end_event(flow, OBSERVER, 1.0)):
        assert doc["kubernetes"]["pod"] == {"name": "api-7d-x", "uid": "u1"}
        assert doc["kubernetes"]["deployment"] == {"name": "api"}
        assert doc["kubernetes"]["replicaset"] == {"name": "api-7d"}
        assert doc["service"] == {"name": "api"}
        assert doc["egressgw"]["attribution"] == "kubernetes-pod-ip"
    assert to_decision_event(flow, OBSERVER)["egressgw"]["audit"] == ["would deny by x/y"]
