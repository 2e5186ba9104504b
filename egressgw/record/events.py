"""ECS 8.x events of a flow. Pure: a Flow and the observer in, a plain dict out; nothing written.

Two documents per flow share ``flow.id``: one when the flow is decided (``event.type``
``["connection", "start"]`` for allowed flows, ``["connection", "denied"]`` for refused ones)
and, for flows that were relayed, one when it ends (``["connection", "end"]``) with bytes and
duration. ``event.id`` is ``<flow.id>.1`` / ``<flow.id>.2``: unique, and stable across retries so a
sink that deduplicates (Elasticsearch ``_id``) stores each event once.
"""

from __future__ import annotations

import time
from typing import Any

from egressgw.decision.verdict import UNDECIDED
from egressgw.flow import Flow, ip_text

ECS_VERSION = "8.11.0"

# Parts that are the same in many events are shared, never copied: an event is serialised when
# it is submitted and nobody changes it (the end event copies what it adds bytes to).
_ECS = {"version": ECS_VERSION}
_NETWORK = {
    p: {"transport": "tcp", "protocol": p, "direction": "egress"} for p in ("tcp", "tls", "http")
}
_CATEGORY = ["network"]
_TYPE_START = ["connection", "start"]
_TYPE_DENIED = ["connection", "denied"]
_TYPE_END = ["connection", "end"]


_second_cache: list[tuple[int, str]] = [(-1, "")]


def _timestamp(epoch: float) -> str:
    """ISO 8601 UTC with microseconds; the date part is formatted once per second."""
    seconds = int(epoch)
    micros = round((epoch - seconds) * 1_000_000)
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    cached_second, prefix = _second_cache[0]
    if cached_second != seconds:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second_cache[0] = (seconds, prefix)
    return f"{prefix}.{micros:06d}Z"


# The DNS proxy's events (record.dnsevents) stamp their times the same way.
to_timestamp = _timestamp


def to_common(flow: Flow, observer: dict[str, Any]) -> dict[str, Any]:
    """The fields both events of a flow share (who, where, the rule); build once, pass to both."""
    network = _NETWORK.get(flow.protocol)
    if network is None:
        network = {"transport": "tcp", "protocol": flow.protocol, "direction": "egress"}
    doc: dict[str, Any] = {
        "@timestamp": _timestamp(flow.started),  # the decision event's; the end event's is later
        "ecs": _ECS,
        "flow": {"id": flow.id},
        "source": {"ip": flow.source_text or ip_text(flow.source_ip), "port": flow.source_port},
        "network": network,
        "observer": observer,
    }
    w = flow.workload
    if w.namespace is not None:  # w.known, without the property call
        doc["kubernetes"] = w.ecs  # built once per workload
        if w.extra:
            doc.update(w.extra)  # service.name, egressgw.attribution: built once too
    dest: dict[str, Any] = {"port": flow.port}
    host = flow.host
    # Written so a flow to a name (most tunnels) runs no more instructions than before the
    # transparent listener's bound name (bench/tunnel_cost.py counts them).
    if host is None or host.name is None:
        if flow.bound_name is not None:
            dest["domain"] = flow.bound_name
    else:
        dest["domain"] = host.name
    ip = flow.ip if flow.ip is not None else (host.ip if host is not None else None)
    if flow.ip_str and flow.ip is not None:
        dest["ip"] = flow.ip_str
    elif ip is not None:
        dest["ip"] = ip_text(ip)
    elif flow.resolved:
        dest["ip"] = ip_text(flow.resolved[0])
    doc["destination"] = dest
    if flow.sni is not None:
        doc["tls"] = {"client": {"server_name": flow.sni}}
    if flow.method is not None:
        doc["http"] = {"request": {"method": flow.method}}
        if flow.status is not None:
            doc["http"]["response"] = {"status_code": flow.status}
    if flow.url is not None:
        doc["url"] = {
            "full": flow.url,
            "domain": dest.get("domain", dest.get("ip")),
            "port": flow.port,
        }
    verdict = flow.verdict
    decision = verdict.decision if verdict is not None else None
    if decision is not None:
        doc["rule"] = {"name": decision.rule, "ruleset": decision.tier or "default"}
    return doc


def to_decision_event(
    flow: Flow, observer: dict[str, Any], common: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The event written when a flow is decided (allowed, denied, or would be denied).

    ``common`` is ``to_common(flow, observer)`` when the caller keeps it for the end event.
    """
    if common is None:
        common = to_common(flow, observer)
    doc = dict(common)
    verdict = flow.verdict or UNDECIDED
    denied = verdict.action == "connection_denied"
    start = common["@timestamp"]
    reason = verdict.reason
    event: dict[str, Any] = {
        "id": f"{flow.id}.1",
        "kind": "alert" if flow.threats and denied else "event",
        "category": _CATEGORY,
        "type": _TYPE_DENIED if denied else _TYPE_START,
        "action": verdict.action,
        "outcome": "failure" if denied else "success",
        "reason": f"{reason}: {flow.error}" if flow.error else reason,
        "start": start,
    }
    decision = verdict.decision
    if decision is not None and decision.audits:
        doc["egressgw"] = {**common.get("egressgw", {}), "audit": list(decision.audits)}
    doc["event"] = event
    if flow.threats:
        doc["threat"] = to_threat(flow.threats)
    if flow.cnames:
        doc["dns"] = {
            "resolved_ip": [str(i) for i in flow.resolved],
            "answers": [{"type": "CNAME", "data": c} for c in flow.cnames],
        }
    return doc


def to_end_event(
    flow: Flow, observer: dict[str, Any], ended: float, common: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The event written when a relayed flow ends: bytes each way and duration.

    ``common`` is the decision event's shared part: a flow's fields do not change after its
    decision, so they are reused, except a request's status, which came after it.
    """
    if common is None:
        common = to_common(flow, observer)
    # The objects that get bytes are copied (the decision event may not be serialised yet).
    doc = dict(common)
    if flow.method is not None:
        http: dict[str, Any] = {"request": {"method": flow.method}}
        if flow.status is not None:
            http["response"] = {"status_code": flow.status}
        doc["http"] = http
    doc["source"] = {**common["source"], "bytes": flow.bytes_out}
    doc["destination"] = {**common["destination"], "bytes": flow.bytes_in}
    doc["network"] = {**common["network"], "bytes": flow.bytes_out + flow.bytes_in}
    duration = (flow.ended_mono or flow.started_mono) - flow.started_mono
    ended_text = doc["@timestamp"] = _timestamp(ended)
    doc["event"] = {
        "id": f"{flow.id}.2",
        "kind": "event",
        "category": _CATEGORY,
        "type": _TYPE_END,
        "action": "connection_ended",
        "outcome": "failure" if flow.error else "success",
        "reason": flow.error or "closed",
        "start": common["@timestamp"],
        "end": ended_text,
        "duration": int(duration * 1e9),
    }
    return doc


def to_threat(threats: tuple[Any, ...]) -> dict[str, Any]:
    """ECS ``threat.*`` from feed matches (plain dicts made by egressgw.threats)."""
    first = threats[0]
    return {
        "framework": "egressgw",
        "feed": {"name": first["feed"]},
        "indicator": first["indicator"],
        "enrichments": [
            {"indicator": t["indicator"], "feed": {"name": t["feed"]}, "matched": t["matched"]}
            for t in threats
        ],
    }
