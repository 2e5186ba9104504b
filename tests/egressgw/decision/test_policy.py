"""Tests of the policy engine (pure core), on the contract policy and on properties."""

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressgw.config.model import load_policy
from egressgw.decision.policy import (
    Destination,
    DestinationSelector,
    Expression,
    Policy,
    Rule,
    SourceSelector,
    Tier,
)
from egressgw.identity.workload import UNKNOWN, Workload

CONTRACT = Path(__file__).resolve().parents[2] / "integration" / "contract"
POLICY_YAML = """\
default: deny
tiers:
  - name: security
    rules:
      - name: block-threat-feeds
        action: deny
        to: {feeds: ["*"]}
      - name: batch-audit-partner
        action: deny
        audit: true
        from: {namespace: batch}
        to: {domains: ["*.partner.test"]}
  - name: platform
    rules:
      - name: payments-to-psp
        action: allow
        from: {namespace: payments, labels: {app: api}}
        to: {domains: ["allowed.test", "*.allowed.test"], ports: [8443, 8080]}
      - name: partner-for-all
        action: allow
        to: {domains: ["*.partner.test"], ports: [8443]}
      - name: batch-to-reports
        action: pass
        from: {namespace: batch}
  - name: apps
    rules:
      - name: batch-to-storage
        action: allow
        from: {namespace: batch, labels: {app: report}}
        to: {cidrs: ["127.0.0.20/32"], ports: [9000]}
"""

PAYMENTS = Workload.make("payments", "api-1", {"app": "api", "team": "payments"}, "api")
BATCH = Workload.make("batch", "report-1", {"app": "report"})


@pytest.fixture(scope="module")
def contract_policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    """The contract's policy.yaml (the copy in shared/ when present, else the same text)."""
    path = CONTRACT / "policy.yaml"
    if not path.exists():
        path = tmp_path_factory.mktemp("policy") / "policy.yaml"
        path.write_text(POLICY_YAML)
    return load_policy((path,), {"local-ips", "local-domains"})


def dest(
    name: str | None, ip: str | None, port: int, feeds: frozenset[str] = frozenset()
) -> Destination:
    """A TLS destination."""
    return Destination(name, ipaddress.ip_address(ip) if ip else None, port, "tls", feeds)


@pytest.mark.parametrize(
    ("workload", "destination", "action", "rule", "audits"),
    [
        (
            PAYMENTS,
            dest("allowed.test", "127.0.0.30", 8443),
            "allow",
            "platform/payments-to-psp",
            (),
        ),
        (
            PAYMENTS,
            dest("www.allowed.test", "127.0.0.30", 8080),
            "allow",
            "platform/payments-to-psp",
            (),
        ),
        (PAYMENTS, dest("allowed.test", "127.0.0.30", 9999), "deny", "default", ()),
        (UNKNOWN, dest("allowed.test", "127.0.0.30", 8443), "deny", "default", ()),
        (
            UNKNOWN,
            dest("api.partner.test", "127.0.0.31", 8443),
            "allow",
            "platform/partner-for-all",
            (),
        ),
        (
            BATCH,
            dest("api.partner.test", "127.0.0.31", 8443),
            "allow",
            "platform/partner-for-all",
            ("would deny by security/batch-audit-partner",),
        ),
        (BATCH, dest(None, "127.0.0.20", 9000), "allow", "apps/batch-to-storage", ()),
        (BATCH, dest("allowed.test", "127.0.0.30", 8080), "deny", "default", ()),
        (
            PAYMENTS,
            dest("allowed.test", "127.0.0.30", 8443, frozenset({"local-domains"})),
            "deny",
            "security/block-threat-feeds",
            (),
        ),
    ],
)
def test_contract_policy(
    contract_policy: Policy,
    workload: Workload,
    destination: Destination,
    action: str,
    rule: str,
    audits: tuple[str, ...],
) -> None:
    """The contract policy decides each case with the expected rule and audit records."""
    decision = contract_policy.decide(workload, destination)
    assert (decision.action, decision.rule_ref, decision.audits) == (action, rule, audits)
    assert rule in decision.reason or decision.rule == "default"


def test_wildcard_is_subdomains_only(contract_policy: Policy) -> None:
    """``*.partner.test`` covers any depth below, but not partner.test itself."""
    assert contract_policy.decide(UNKNOWN, dest("a.b.partner.test", None, 8443)).action == "allow"
    assert contract_policy.decide(UNKNOWN, dest("partner.test", None, 8443)).action == "deny"
    assert contract_policy.decide(UNKNOWN, dest("evilpartner.test", None, 8443)).action == "deny"


def test_trace_lists_every_step(contract_policy: Policy) -> None:
    """A traced decision names each rule it looked at and why it went on."""
    decision = contract_policy.decide(BATCH, dest(None, "127.0.0.20", 9000), trace=True)
    assert decision.steps == (
        "security/block-threat-feeds: destination not selected",
        "security/batch-audit-partner: destination not selected",
        "security: no rule decided, tier default pass",
        "platform/payments-to-psp: source not selected",
        "platform/partner-for-all: destination not selected",
        "platform/batch-to-reports: matches: pass to the next tier",
        "apps/batch-to-storage: matches: allow",
    )


@pytest.mark.parametrize(
    ("expr", "labels", "expected"),
    [
        (Expression("app", "In", frozenset({"api", "web"})), {"app": "web"}, True),
        (Expression("app", "In", frozenset({"api"})), {}, False),
        (Expression("app", "NotIn", frozenset({"api"})), {}, True),
        (Expression("app", "NotIn", frozenset({"api"})), {"app": "api"}, False),
        (Expression("tier", "Exists"), {"tier": ""}, True),
        (Expression("tier", "DoesNotExist"), {"tier": "x"}, False),
    ],
)
def test_match_expressions(expr: Expression, labels: dict[str, str], expected: bool) -> None:
    """matchExpressions follow Kubernetes label selector semantics."""
    assert expr.matches(labels) is expected


def test_unknown_selector() -> None:
    """``from: {unknown: true}`` selects unattributed sources only."""
    rule = Rule("unknown-out", "deny", source=SourceSelector(unknown=True))
    pol = Policy((Tier("t", (rule,)),), default="allow")
    assert pol.decide(UNKNOWN, dest("x.test", None, 443)).action == "deny"
    assert pol.decide(PAYMENTS, dest("x.test", None, 443)).action == "allow"


def test_tier_default_deny() -> None:
    """A tier with ``default: deny`` refuses what none of its rules decided."""
    tier = Tier(
        "strict",
        (Rule("nothing", "allow", destination=DestinationSelector(exact=frozenset({"a.test"}))),),
        "deny",
    )
    decision = Policy((tier,), default="allow").decide(UNKNOWN, dest("b.test", None, 443))
    assert (decision.action, decision.rule_ref) == ("deny", "strict/default")


names = st.sampled_from(["allowed.test", "www.allowed.test", "api.partner.test", "x.test", None])
ips = st.sampled_from(["127.0.0.20", "127.0.0.30", "10.0.0.1", None])
ports = st.sampled_from([8080, 8443, 9000, 443])
workloads = st.sampled_from([PAYMENTS, BATCH, UNKNOWN])
feedsets = st.sampled_from([frozenset(), frozenset({"local-ips"})])


@given(workloads, names, ips, ports, feedsets)
def test_audit_rules_never_change_the_action(
    w: Workload, name: str | None, ip: str | None, port: int, feeds: frozenset[str]
) -> None:
    """Removing every audit rule leaves every decision's action and rule unchanged."""
    pol = load_policy_text(POLICY_YAML)
    stripped = Policy(
        tuple(Tier(t.name, tuple(r for r in t.rules if not r.audit), t.default) for t in pol.tiers),
        pol.default,
    )
    d = dest(name, ip, port, feeds)
    a, b = pol.decide(w, d), stripped.decide(w, d)
    assert (a.action, a.rule_ref) == (b.action, b.rule_ref)
    assert b.audits == ()


_CACHE: dict[str, Policy] = {}


def load_policy_text(text: str) -> Policy:
    """Compile policy YAML text once per test session."""
    if text not in _CACHE:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "policy.yaml"
            path.write_text(text)
            _CACHE[text] = load_policy((path,), {"local-ips", "local-domains"})
    return _CACHE[text]
