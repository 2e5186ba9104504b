"""The DNS proxy's decisions: a question, then the upstream's answer -> DnsVerdict. Pure.

The same pieces as a connection's decision path (``Runtime``: policy and its cache, the threat
source, the guard); only what is known differs. At DNS time there is a name, later addresses,
but no port and no protocol: policy is asked with port 0 and protocol ``dns``, which no rule's
``ports`` or ``protocols`` select, so only rules that name neither apply.

Order (the first refusal is the reason):

1. The question: its name is matched against the feeds, then policy decides for the name alone.
2. The answer: every CNAME target is matched against the feeds (CNAME cloaking); every A and
   AAAA address is checked by the guard (unless the name is under an internal domain, where
   cluster services answer with private addresses) and matched against the feeds; policy
   decides again for each address with every feed that matched so far.

A name is refused only when a rule denies it. A policy or tier ``default`` does not: it is meant
for connections, whose port and protocol rules have not been asked yet (a pod allowed to
``api.example:443`` by a port rule must still resolve the name); the connection is decided when
it is made. The guard refuses whatever it guards (DNS rebinding: a public name answering with
a private address). An ``audit`` rule that would deny makes the verdict ``would_deny``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from egressgw.decision.guard import Guard, effective_ip
from egressgw.decision.policy import Decision, Destination
from egressgw.identity.workload import Workload
from egressgw.wire.dnsmsg import Record

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DnsAction = Literal["dns_allowed", "dns_denied", "would_deny"]
DNS_PORT = 0  # no rule's ports select it (ports are 1-65535)


class Threats(Protocol):
    """Feed matching (``decision.path.ThreatSource``): each match an ECS-ready dict."""

    def match_name(self, name: str) -> tuple[dict[str, Any], ...]:
        """Matches for a domain name."""
        ...

    def match_ip(self, ip: IPAddress) -> tuple[dict[str, Any], ...]:
        """Matches for an address."""
        ...


class Deciding(Protocol):
    """What is asked (``decision.path.Runtime``): policy with its cache, guard, feeds."""

    @property
    def guard(self) -> Guard:
        """The destination guard."""
        ...

    @property
    def threats(self) -> Threats:
        """The threat source."""
        ...

    def decide(self, w: Workload, d: Destination) -> Decision:
        """Policy's decision (cached)."""
        ...


@dataclass(frozen=True, slots=True)
class DnsVerdict:
    """Answer the client (``allowed``) or refuse the name, and why."""

    allowed: bool
    action: DnsAction
    reason: str
    decision: Decision | None = None
    threats: tuple[dict[str, Any], ...] = ()


def who(w: Workload, client: str) -> str:
    """The source as a reason names it: ``namespace/app`` (or pod), or the unknown address."""
    if not w.known:
        return f"unknown {client}"
    labels = w.label_map
    app = labels.get("app.kubernetes.io/name") or labels.get("app") or w.pod
    return f"{w.namespace}/{app}" if app else str(w.namespace)


def is_internal(name: str, domains: Iterable[str]) -> bool:
    """True when ``name`` is one of ``domains`` or below one."""
    return any(name == d or name.endswith(f".{d}") for d in domains)


def _feeds(threats: Sequence[dict[str, Any]]) -> frozenset[str]:
    return frozenset(t["feed"] for t in threats)


def _judged(d: Decision, threats: tuple[dict[str, Any], ...], source: str, name: str) -> DnsVerdict:
    path = f"({source} -> {name})"
    if d.action == "deny" and d.rule != "default":
        reason = f"denied by {d.rule_ref}"
        if threats:
            t = threats[0]
            reason += f": {t['matched']['atomic']} listed by feed {t['feed']}"
        return DnsVerdict(False, "dns_denied", f"{reason} {path}", d, threats)
    if d.action == "allow":
        by = "policy default" if d.tier is None else d.rule_ref
        reason = f"allowed by {by} {path}"
    else:
        reason = f"answered: no rule denies the name; connections are decided on their own {path}"
    if d.audits:
        return DnsVerdict(True, "would_deny", f"{'; '.join(d.audits)}; {reason}", d, threats)
    return DnsVerdict(True, "dns_allowed", reason, d, threats)


def judge_question(rt: Deciding, w: Workload, source: str, name: str) -> DnsVerdict:
    """Step 1: may ``w`` (``source`` names it in reasons) learn the addresses of ``name``?"""
    threats = rt.threats.match_name(name)
    d = rt.decide(w, Destination(name, None, DNS_PORT, "dns", _feeds(threats)))
    return _judged(d, threats, source, name)


def judge_answer(
    rt: Deciding,
    w: Workload,
    source: str,
    name: str,
    records: Sequence[Record],
    asked: DnsVerdict,
    internal: bool = False,
) -> DnsVerdict:
    """Step 2: may the upstream's ``records`` for ``name`` go to the client? (``asked``: step 1)."""
    threats = list(asked.threats)
    ips: list[IPAddress] = []
    for r in records:
        if r.type == "CNAME":
            threats.extend(rt.threats.match_name(r.data))
            continue
        ip = r.ip
        assert ip is not None
        if not internal:
            refused = rt.guard.check(ip)
            if refused is not None:
                return DnsVerdict(
                    False, "dns_denied", f"{refused} ({source} -> {name})", None, tuple(threats)
                )
        ips.append(ip)
        threats.extend(rt.threats.match_ip(effective_ip(ip)))
    found = tuple(threats)
    if not ips and len(found) == len(asked.threats):
        return asked  # no address and no new match: the question's verdict stands
    feeds = _feeds(found)
    first: DnsVerdict | None = None
    # Each address in turn (decisions are cached per workload and destination): a rule with
    # ``cidrs`` can deny one address of an answer.
    targets: list[IPAddress | None] = [effective_ip(ip) for ip in ips] or [None]
    for target in targets:
        d = rt.decide(w, Destination(name, target, DNS_PORT, "dns", feeds))
        verdict = _judged(d, found, source, name)
        if not verdict.allowed:
            return verdict
        first = first or verdict
    assert first is not None
    return first
