"""The workers' metrics summed: every sample of equal name and labels adds up, nothing else."""

from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from egressgw.metrics import DECISION_BUCKETS, Metrics
from egressgw.workers.aggregate import aggregate

label_values = st.sampled_from(["a", "b", 'q"uote', "back\\slash", "new\nline", ""])
worker_st = st.tuples(
    st.dictionaries(label_values, st.integers(min_value=0, max_value=10**9), max_size=4),
    st.integers(min_value=0, max_value=10_000),
)


class _Fixed:
    def __init__(self, counts: dict[str, int], gauge: int) -> None:
        self.counts, self.gauge = counts, gauge

    def collect(self) -> Iterator[Metric]:
        flows = CounterMetricFamily("t_flows", "Flows", labels=["action"])
        for action, n in self.counts.items():
            flows.add_metric([action], n)
        yield flows
        yield GaugeMetricFamily("t_open", "Open now", value=self.gauge)


def exposition(counts: dict[str, int], gauge: int) -> str:
    registry = CollectorRegistry()
    registry.register(_Fixed(counts, gauge))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@given(st.lists(worker_st, max_size=5))
def test_samples_with_equal_name_and_labels_add_up(
    workers: list[tuple[dict[str, int], int]],
) -> None:
    """Counters by label and gauges are the sums over the workers; labels survive escaping."""
    got = samples(aggregate(exposition(c, g) for c, g in workers))
    expected: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for counts, gauge in workers:
        for action, n in counts.items():
            key = ("t_flows_total", (("action", action),))
            expected[key] = expected.get(key, 0) + n
        expected[("t_open", ())] = expected.get(("t_open", ()), 0) + gauge
    assert got == expected


@given(st.lists(st.lists(st.floats(0, 2), max_size=20), min_size=1, max_size=4))
def test_histograms_add_bucket_by_bucket(observations: list[list[float]]) -> None:
    """Buckets, count and sum of a histogram add up; the sum of ``_created`` is left out."""
    texts, everything = [], []
    for values in observations:
        registry = CollectorRegistry()
        h = Histogram("t_seconds", "Time", registry=registry, buckets=DECISION_BUCKETS)
        for v in values:
            h.observe(v)
        everything += values
        texts.append(generate_latest(registry).decode())
    got = samples(aggregate(texts))
    assert got[("t_seconds_count", ())] == len(everything)
    assert abs(got[("t_seconds_sum", ())] - sum(everything)) < 1e-6 * (1 + sum(everything))
    for bound in DECISION_BUCKETS:
        le = (("le", repr(bound)),)
        assert got[("t_seconds_bucket", le)] == sum(v <= bound for v in everything)
    assert not any(name.endswith("_created") for name, _ in got)


def test_the_gateways_own_metrics_sum_and_skipped_families_are_dropped() -> None:
    """Two workers' real Metrics: flows add up; a family named in skip is not in the answer."""
    texts = []
    for n in (3, 4):
        m = Metrics(CollectorRegistry(), lambda: 1)
        for _ in range(n):
            m.count_flow("connection_allowed", "apps", 0.0002)
        m.count_reload("ok")
        texts.append(generate_latest(m.registry).decode())
    text = aggregate(texts, skip={"egressgw_reloads"})
    got = samples(text)
    assert got[("egressgw_flows_total", (("action", "connection_allowed"), ("tier", "apps")))] == 7
    assert got[("egressgw_active_connections", ())] == 2
    assert got[("egressgw_decision_seconds_count", ())] == 7
    assert "egressgw_reloads" not in text
