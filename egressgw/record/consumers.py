"""Who hears about a flow: a list of consumers, each told when a flow is decided and when it ends.

The gateway calls every consumer in order, on the event loop, for every flow: a consumer does
constant work per call and never blocks (the exporter only queues the event; the metrics only
add). The egress map and other views are added as consumers, not as calls in the proxy.
The DNS proxy's exchanges go to a list of their own (``DnsConsumer``), the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from egressgw.decision.verdict import UNDECIDED
from egressgw.flow import Flow
from egressgw.record.dnsevents import DnsExchange, to_dns_event
from egressgw.record.events import to_common, to_decision_event, to_end_event


class FlowConsumer(Protocol):
    """Told about every flow."""

    def flow_decided(self, flow: Flow) -> None:
        """The flow was decided (allowed, denied, or would be denied)."""
        ...

    def flow_ended(self, flow: Flow) -> None:
        """A relayed flow ended (bytes and duration are final)."""
        ...


class FlowCounter(Protocol):
    """The metrics a FlowMetrics consumer updates."""

    bytes_out: int
    bytes_in: int

    def count_flow(self, action: str, tier: str, seconds: float) -> None:
        """Count one decided flow and how long deciding it took."""
        ...


class FlowMetrics:
    """Counts decisions by action and tier, and bytes each way."""

    def __init__(self, metrics: FlowCounter) -> None:
        self.metrics = metrics

    def flow_decided(self, flow: Flow) -> None:
        """Count the decision and the time it took."""
        verdict = flow.verdict or UNDECIDED
        decision = verdict.decision
        tier = (decision.tier or "default") if decision is not None else "none"
        elapsed = time.monotonic() - flow.started_mono
        self.metrics.count_flow(verdict.action, tier, elapsed)

    def flow_ended(self, flow: Flow) -> None:
        """Add the flow's bytes."""
        self.metrics.bytes_out += flow.bytes_out
        self.metrics.bytes_in += flow.bytes_in


class FlowEvents:
    """Builds each flow's ECS events and hands them to ``submit`` (the exporter's spool)."""

    def __init__(self, submit: Callable[[dict[str, Any]], Any], observer: dict[str, Any]) -> None:
        self.submit = submit
        self.observer = observer

    def flow_decided(self, flow: Flow) -> None:
        """Submit the decision event, keeping its shared part on the flow for the end event."""
        flow.event_common = common = to_common(flow, self.observer)
        self.submit(to_decision_event(flow, self.observer, common))

    def flow_ended(self, flow: Flow) -> None:
        """Submit the end event."""
        self.submit(to_end_event(flow, self.observer, time.time(), flow.event_common))


class DnsConsumer(Protocol):
    """Told about every query the DNS proxy answered or refused."""

    def dns_answered(self, x: DnsExchange) -> None:
        """The client got its answer (or the refusal)."""
        ...


class DnsCounter(Protocol):
    """The metrics a DnsMetrics consumer updates."""

    def count_dns(self, action: str) -> None:
        """Count one DNS exchange by action."""
        ...


class DnsMetrics:
    """Counts DNS exchanges by action."""

    def __init__(self, metrics: DnsCounter) -> None:
        self.metrics = metrics

    def dns_answered(self, x: DnsExchange) -> None:
        """Count the exchange."""
        self.metrics.count_dns(x.verdict.action if x.verdict is not None else "dns_failed")


class DnsEvents:
    """Builds each DNS exchange's ECS event and hands it to ``submit`` (the exporter's spool)."""

    def __init__(self, submit: Callable[[dict[str, Any]], Any], observer: dict[str, Any]) -> None:
        self.submit = submit
        self.observer = observer

    def dns_answered(self, x: DnsExchange) -> None:
        """Submit the exchange's event."""
        self.submit(to_dns_event(x, self.observer))
