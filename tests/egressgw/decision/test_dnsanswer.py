"""Tests of the DNS proxy's decisions: questions and answers through policy, feeds and guard."""

from pathlib import Path
from typing import Any, cast

import pytest

from egressgw.config.model import load_policy
from egressgw.decision.dnsanswer import is_internal, judge_answer, judge_question
from egressgw.decision.guard import Guard
from egressgw.decision.path import Runtime
from egressgw.identity.static import StaticInventory
from egressgw.identity.workload import Workload
from egressgw.resolver import Resolver
from egressgw.wire.dnsmsg import Record

POLICY = """\
default: deny
tiers:
  - name: security
    rules:
      - name: block-feeds
        action: deny
        to: {feeds: ["*"]}
      - name: audit-partner
        action: deny
        audit: true
        to: {domains: ["*.partner.test"]}
      - name: no-gambling
        action: deny
        from: {namespace: payments}
        to: {domains: ["casino.test"]}
      - name: not-that-net
        action: deny
        to: {cidrs: ["203.0.113.0/24"]}
  - name: apps
    rules:
      - name: psp-on-8443
        action: allow
        to: {domains: ["psp.test"], ports: [8443]}
      - name: tls-only
        action: deny
        to: {domains: ["web.test"], protocols: [tcp]}
"""
PAYMENTS = Workload.make("payments", "api-1", {"app": "api"})
BATCH = Workload.make("batch")


class Threats:
    """evil.test and below, and 192.0.2.66, are listed by feed 'intel'."""

    generation = 0

    def _hit(self, atomic: str) -> tuple[dict[str, Any], ...]:
        return ({"feed": "intel", "indicator": {}, "matched": {"atomic": atomic}},)

    def match_name(self, name: str) -> tuple[dict[str, Any], ...]:
        """Suffix match on evil.test."""
        return self._hit(name) if name == "evil.test" or name.endswith(".evil.test") else ()

    def match_ip(self, ip: Any) -> tuple[dict[str, Any], ...]:
        """One listed address."""
        return self._hit(str(ip)) if str(ip) == "192.0.2.66" else ()

    def match_url(self, url: str) -> tuple[dict[str, Any], ...]:
        """No URLs."""
        return ()


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    """The policy above, the guard on, the stand-in feeds."""
    (tmp_path / "p.yaml").write_text(POLICY)
    return Runtime(
        policy=load_policy((tmp_path / "p.yaml",), {"intel"}),
        guard=Guard(),
        inventory=StaticInventory([]),
        resolver=cast(Resolver, None),
        threats=Threats(),
    )


def a(name: str, ip: str, ttl: int = 60) -> Record:
    """An A or AAAA record."""
    return Record(name, "AAAA" if ":" in ip else "A", ttl, ip)


def test_listed_name_is_refused_with_feed_and_rule(rt: Runtime) -> None:
    """A name a feed lists is refused by the feed rule; the reason names rule, feed and who."""
    v = judge_question(rt, PAYMENTS, "payments/api", "sub.evil.test")
    assert not v.allowed and v.action == "dns_denied"
    assert v.reason == (
        "denied by security/block-feeds: sub.evil.test listed by feed intel "
        "(payments/api -> sub.evil.test)"
    )
    assert v.threats[0]["feed"] == "intel"


def test_rule_denying_the_name_refuses_for_its_source_only(rt: Runtime) -> None:
    """A deny rule by name applies to the namespace it selects."""
    assert not judge_question(rt, PAYMENTS, "payments/api", "casino.test").allowed
    assert judge_question(rt, BATCH, "batch", "casino.test").allowed


def test_port_rules_and_the_default_leave_the_name_to_the_connection(rt: Runtime) -> None:
    """A name only a port rule allows resolves (the default does not refuse at DNS time)."""
    v = judge_question(rt, PAYMENTS, "payments/api", "psp.test")
    assert v.allowed and v.action == "dns_allowed"
    assert "no rule denies the name" in v.reason


def test_protocol_rules_do_not_apply_to_names(rt: Runtime) -> None:
    """A deny for raw TCP to a name does not refuse resolving it."""
    assert judge_question(rt, PAYMENTS, "payments/api", "web.test").allowed


def test_audit_rule_answers_and_says_would_deny(rt: Runtime) -> None:
    """An audit-mode deny answers, with action would_deny and the audit in the reason."""
    v = judge_question(rt, BATCH, "batch", "files.partner.test")
    assert v.allowed and v.action == "would_deny"
    assert v.reason.startswith("would deny by security/audit-partner")


def test_cname_to_a_listed_name_is_refused(rt: Runtime) -> None:
    """CNAME cloaking: an unlisted name whose answer goes through a listed one is refused."""
    asked = judge_question(rt, PAYMENTS, "payments/api", "shop.test")
    records = [Record("shop.test", "CNAME", 300, "cdn.evil.test"), a("cdn.evil.test", "192.0.2.7")]
    v = judge_answer(rt, PAYMENTS, "payments/api", "shop.test", records, asked)
    assert not v.allowed
    assert "cdn.evil.test listed by feed intel" in v.reason


def test_listed_address_in_an_answer_is_refused(rt: Runtime) -> None:
    """An answer with an address a feed lists is refused."""
    asked = judge_question(rt, PAYMENTS, "p", "fine.test")
    records = [a("fine.test", "192.0.2.1"), a("fine.test", "192.0.2.66")]
    v = judge_answer(rt, PAYMENTS, "p", "fine.test", records, asked)
    assert not v.allowed and "192.0.2.66 listed by feed intel" in v.reason


def test_guarded_address_is_refused_unless_the_name_is_internal(rt: Runtime) -> None:
    """DNS rebinding: a private or metadata address is refused; internal names are exempt."""
    asked = judge_question(rt, PAYMENTS, "p", "rebind.test")
    v = judge_answer(rt, PAYMENTS, "p", "rebind.test", [a("rebind.test", "169.254.169.254")], asked)
    assert not v.allowed and v.reason.startswith("guard: 169.254.169.254 is cloud-metadata")
    name = "db.payments.svc.cluster.local"
    ok = judge_answer(rt, PAYMENTS, "p", name, [a(name, "10.96.0.12")], asked, internal=True)
    assert ok.allowed


def test_cidr_rule_refuses_an_answer_address(rt: Runtime) -> None:
    """A deny rule with cidrs refuses an answer holding an address inside them."""
    asked = judge_question(rt, PAYMENTS, "p", "ok.test")
    v = judge_answer(rt, PAYMENTS, "p", "ok.test", [a("ok.test", "203.0.113.9")], asked)
    assert not v.allowed and v.reason.startswith("denied by security/not-that-net")


def test_clean_answer_keeps_the_question_verdict(rt: Runtime) -> None:
    """An answer with nothing listed or guarded is allowed."""
    asked = judge_question(rt, PAYMENTS, "p", "ok.test")
    v = judge_answer(rt, PAYMENTS, "p", "ok.test", [a("ok.test", "192.0.2.8")], asked)
    assert v.allowed and v.action == "dns_allowed"


def test_is_internal_matches_the_domain_and_below() -> None:
    """cluster.local and names under it; not a name that merely ends the same way."""
    assert is_internal("cluster.local", ["cluster.local"])
    assert is_internal("a.b.svc.cluster.local", ["cluster.local"])
    assert not is_internal("evilcluster.local", ["cluster.local"])
