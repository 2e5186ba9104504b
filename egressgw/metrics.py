"""The gateway's Prometheus metrics: plain integers on the hot path, read at scrape time.

Every flow touches these counters, so they are plain ``int``s and lists in one object
(the event loop is single-threaded: no locks needed) and a collector turns them into metric
families when ``/metrics`` is scraped. Gauges of open connections and tunnels are read from the
gateway's own state at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)


class Metrics:
    """Flows by decision and tier, tunnels, bytes, decision latency, errors by kind."""

    def __init__(
        self,
        registry: CollectorRegistry,
        connections: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = registry
        self.connections = connections
        self.flows: dict[tuple[str, str], int] = {}
        self.errors: dict[str, int] = {}
        self.reloads: dict[str, int] = {}
        self.dns: dict[str, int] = {}
        self.tunnels = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.decision_counts = [0] * (len(DECISION_BUCKETS) + 1)
        self.decision_sum = 0.0
        registry.register(_Collector(self))

    def count_flow(self, action: str, tier: str, seconds: float) -> None:
        """Count a decided flow and how long its decision took."""
        flows, key = self.flows, (action, tier)
        flows[key] = flows.get(key, 0) + 1
        self.decision_counts[bisect_left(DECISION_BUCKETS, seconds)] += 1
        self.decision_sum += seconds

    def count_error(self, kind: str) -> None:
        """Count an error of a kind."""
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def count_dns(self, action: str) -> None:
        """Count a DNS exchange by action (dns_allowed, dns_denied, would_deny, dns_failed)."""
        self.dns[action] = self.dns.get(action, 0) + 1

    def count_reload(self, result: str) -> None:
        """Count a reload by result (ok, failed)."""
        self.reloads[result] = self.reloads.get(result, 0) + 1


class _Collector:
    def __init__(self, m: Metrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        flows = CounterMetricFamily(
            "egressgw_flows",
            "Flows decided, by action and deciding tier",
            labels=["action", "tier"],
        )
        for (action, tier), n in sorted(m.flows.items()):
            flows.add_metric([action, tier], n)
        yield flows
        errors = CounterMetricFamily("egressgw_errors", "Errors by kind", labels=["kind"])
        for kind, n in sorted(m.errors.items()):
            errors.add_metric([kind], n)
        yield errors
        reloads = CounterMetricFamily(
            "egressgw_reloads", "Configuration reloads, by result", labels=["result"]
        )
        for result, n in sorted(m.reloads.items()):
            reloads.add_metric([result], n)
        yield reloads
        queries = CounterMetricFamily(
            "egressgw_dns_queries", "DNS proxy exchanges, by action", labels=["action"]
        )
        for action, n in sorted(m.dns.items()):
            queries.add_metric([action], n)
        yield queries
        relayed = CounterMetricFamily(
            "egressgw_bytes", "Bytes relayed, by direction", labels=["direction"]
        )
        relayed.add_metric(["egress"], m.bytes_out)
        relayed.add_metric(["ingress"], m.bytes_in)
        yield relayed
        yield GaugeMetricFamily(
            "egressgw_active_tunnels", "CONNECT tunnels relaying now", value=m.tunnels
        )
        yield GaugeMetricFamily(
            "egressgw_active_connections", "Client connections open now", value=m.connections()
        )
        cumulative, buckets = 0, []
        for bound, n in zip((*DECISION_BUCKETS, float("inf")), m.decision_counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "egressgw_decision_seconds",
            "Time from a complete request head to the decision (resolution included)",
            buckets=buckets,
            sum_value=m.decision_sum,
        )
