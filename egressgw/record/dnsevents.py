"""ECS events of the DNS proxy: one per query answered or refused. Pure: an exchange in, a dict out.

``event.action`` is ``dns_allowed``, ``dns_denied`` (the name was answered NXDOMAIN or with the
sinkhole) or ``would_deny`` (answered; an audit rule would have refused it). ``dns.*`` follows
ECS: ``question.name``/``type``/``class``, ``response_code`` (what the client got), ``answers``
(what the client got: name, type, class, ttl, data), ``resolved_ip``; ``kubernetes.*`` names the
workload that asked, ``destination`` the upstream that answered, ``rule.*`` and ``threat.*`` as in
flow events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from egressgw.decision.dnsanswer import DnsVerdict
from egressgw.flow import new_id
from egressgw.identity.workload import UNKNOWN, Workload
from egressgw.record.events import ECS_VERSION, to_threat
from egressgw.record.events import to_timestamp as timestamp
from egressgw.wire.dnsmsg import Record


def new_exchange_id() -> str:
    """A process-unique id for one DNS exchange (``d`` marks it apart from flow ids)."""
    return new_id("d")


@dataclass(slots=True)
class DnsExchange:
    """One query and what the proxy did with it, filled in as it is handled."""

    source_ip: str
    source_port: int
    transport: Literal["udp", "tcp"]
    started: float  # wall clock
    name: str
    qtype: str
    dns_id: int
    workload: Workload = UNKNOWN
    verdict: DnsVerdict | None = None
    response_code: str = ""
    answers: list[Record] = field(default_factory=list)
    upstream: tuple[str, int] | None = None
    error: str | None = None
    duration: float = 0.0
    id: str = field(default_factory=new_exchange_id)


def to_dns_event(x: DnsExchange, observer: dict[str, Any]) -> dict[str, Any]:
    """The ECS event of one DNS exchange."""
    verdict = x.verdict
    denied = verdict is not None and not verdict.allowed
    reason = verdict.reason if verdict is not None else (x.error or "not decided")
    if verdict is not None and x.error:
        reason = f"{reason}: {x.error}"
    threats = verdict.threats if verdict is not None else ()
    started = timestamp(x.started)
    doc: dict[str, Any] = {
        "@timestamp": started,
        "ecs": {"version": ECS_VERSION},
        "event": {
            "id": f"{x.id}.1",
            "kind": "alert" if denied and threats else "event",
            "category": ["network"],
            "type": ["protocol", "denied" if denied else "allowed"],
            "action": verdict.action if verdict is not None else "dns_failed",
            "outcome": "failure" if denied or x.error else "success",
            "reason": reason,
            "start": started,
            "duration": int(x.duration * 1e9),
        },
        "source": {"ip": x.source_ip, "port": x.source_port},
        "network": {"transport": x.transport, "protocol": "dns", "direction": "egress"},
        "observer": observer,
        "dns": {
            "type": "answer",
            "id": x.dns_id,
            "op_code": "QUERY",
            "question": {"name": x.name, "type": x.qtype, "class": "IN"},
            "response_code": x.response_code,
        },
    }
    if x.workload.namespace is not None:
        doc["kubernetes"] = x.workload.ecs
    if x.answers:
        doc["dns"]["answers"] = [
            {"name": r.name, "type": r.type, "class": "IN", "ttl": r.ttl, "data": r.data}
            for r in x.answers
        ]
        resolved = [r.data for r in x.answers if r.type != "CNAME"]
        if resolved:
            doc["dns"]["resolved_ip"] = resolved
    if x.upstream is not None:
        doc["destination"] = {"ip": x.upstream[0], "port": x.upstream[1]}
    decision = verdict.decision if verdict is not None else None
    if decision is not None:
        doc["rule"] = {"name": decision.rule, "ruleset": decision.tier or "default"}
        if decision.audits:
            doc["egressgw"] = {"audit": list(decision.audits)}
    if threats:
        doc["threat"] = to_threat(threats)
    return doc
