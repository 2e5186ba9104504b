"""The gateway's Prometheus metrics, on a registry of its own (one per Gateway)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)


class Metrics:
    """Flows by decision and tier, tunnels, bytes, decision latency, errors by kind."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.flows = Counter(
            "egressgw_flows",
            "Flows decided, by action and deciding tier",
            ["action", "tier"],
            registry=registry,
        )
        self.active_tunnels = Gauge(
            "egressgw_active_tunnels", "CONNECT tunnels relaying now", registry=registry
        )
        self.active_connections = Gauge(
            "egressgw_active_connections", "Client connections open now", registry=registry
        )
        self.bytes = Counter(
            "egressgw_bytes", "Bytes relayed, by direction", ["direction"], registry=registry
        )
        self.decision_seconds = Histogram(
            "egressgw_decision_seconds",
            "Time from a complete request head to the decision (resolution included)",
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.errors = Counter("egressgw_errors", "Errors by kind", ["kind"], registry=registry)
        self.reloads = Counter(
            "egressgw_reloads", "Configuration reloads, by result", ["result"], registry=registry
        )
        self.bytes_out = self.bytes.labels("egress")
        self.bytes_in = self.bytes.labels("ingress")
        self._flow_children: dict[tuple[str, str], Counter] = {}
        self._error_children: dict[str, Counter] = {}

    def count_flow(self, action: str, tier: str) -> None:
        """Count a decided flow (label children cached: this is on every flow)."""
        key = (action, tier)
        child = self._flow_children.get(key)
        if child is None:
            child = self._flow_children[key] = self.flows.labels(action, tier)
        child.inc()

    def count_error(self, kind: str) -> None:
        """Count an error of a kind."""
        child = self._error_children.get(kind)
        if child is None:
            child = self._error_children[kind] = self.errors.labels(kind)
        child.inc()
