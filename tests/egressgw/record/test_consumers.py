"""Tests of the flow consumers: metrics and events hear about every flow, in order."""

from typing import Any

from prometheus_client import CollectorRegistry

from egressgw.metrics import Metrics
from egressgw.record.consumers import FlowEvents, FlowMetrics

from .test_events import OBSERVER, make_flow


def test_events_consumer_submits_both_events_of_a_flow() -> None:
    """A decided then ended flow gives its decision event (.1) and its end event (.2)."""
    submitted: list[dict[str, Any]] = []
    events = FlowEvents(submitted.append, OBSERVER)
    flow = make_flow(bytes_out=10, bytes_in=20)
    events.flow_decided(flow)
    events.flow_ended(flow)
    assert [d["event"]["id"] for d in submitted] == [f"{flow.id}.1", f"{flow.id}.2"]
    assert submitted[1]["network"]["bytes"] == 30


def test_metrics_consumer_counts_decisions_by_tier_and_bytes() -> None:
    """The metrics consumer counts the flow under its action and tier, and adds its bytes."""
    metrics = Metrics(CollectorRegistry(), lambda: 0)
    consumer = FlowMetrics(metrics)
    flow = make_flow(bytes_out=7, bytes_in=9)
    consumer.flow_decided(flow)
    consumer.flow_ended(flow)
    assert (metrics.bytes_out, metrics.bytes_in) == (7, 9)
    value = metrics.registry.get_sample_value(
        "egressgw_flows_total", {"action": "connection_allowed", "tier": "platform"}
    )
    assert value == 1
