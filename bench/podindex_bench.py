"""Pod index at cluster scale: load 50,000 pods, lookup cost, memory.

Prints: the time to read and index a list of N pods (raw JSON, as the watch hands it over), the
index's memory (tracemalloc), the cost of one lookup (hit and miss) beside a bare dict get of
the same key (what "no measurable cost" is measured against), a watch event's cost, and, on a
sample, what the client library's typed models would add to the list.

    .venv/bin/python bench/podindex_bench.py [--pods 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import time
import timeit
import tracemalloc
from types import SimpleNamespace
from typing import Any

import orjson

from egressgw.identity.kubernetes import read_pods
from egressgw.identity.podindex import PodIndex
from egressgw.identity.workload import Peer


def make_pod(i: int) -> dict[str, Any]:
    """A realistic pod object (labels, owner, containers, conditions) with address 10.x.y.z."""
    deployment = f"app-{i // 20}"
    ip = str(ipaddress.IPv4Address(0x0A000000 + i + 1))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{deployment}-7d9c8b-{i:05d}",
            "namespace": f"ns-{i // 500}",
            "uid": f"00000000-0000-0000-0000-{i:012d}",
            "resourceVersion": str(1000 + i),
            "creationTimestamp": "2026-12-04T10:00:00Z",
            "labels": {
                "app": deployment,
                "app.kubernetes.io/name": deployment,
                "pod-template-hash": "7d9c8b",
                "team": f"team-{i % 40}",
            },
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01T00:00:00Z"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{deployment}-7d9c8b",
                    "uid": f"rs-{i // 20}",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "nodeName": f"node-{i % 200}",
            "serviceAccountName": deployment,
            "containers": [
                {
                    "name": "app",
                    "image": f"registry.example/{deployment}:1.2.3",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "env": [{"name": "MODE", "value": "production"}],
                }
            ],
            "restartPolicy": "Always",
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": f"192.168.0.{i % 200}",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-04T10:00:05Z"}
            ],
            "containerStatuses": [
                {"name": "app", "ready": True, "restartCount": 0, "image": "x", "imageID": "y"}
            ],
        },
    }


def per_call(stmt: Any, number: int) -> float:
    """Median of 5 runs, in nanoseconds per call."""
    runs = sorted(timeit.repeat(stmt, number=number, repeat=5))
    return runs[2] / number * 1e9


async def typed_cost(count: int) -> float:
    """Seconds a pod to deserialise into the client library's V1Pod."""
    from kubernetes_asyncio.client import ApiClient

    sample = [json.dumps(make_pod(i)) for i in range(count)]
    async with ApiClient() as client:
        start = time.perf_counter()
        for text in sample:
            client.deserialize(SimpleNamespace(data=text), "V1Pod")
        return (time.perf_counter() - start) / count


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=50_000)
    parser.add_argument("--typed-sample", type=int, default=2_000)
    args = parser.parse_args()
    n = args.pods

    body = orjson.dumps(
        {
            "kind": "PodList",
            "metadata": {"resourceVersion": "1"},
            "items": [make_pod(i) for i in range(n)],
        }
    )
    print(f"list of {n:,} pods: {len(body) / 1e6:.1f} MB of JSON")

    gc.collect()
    start = time.perf_counter()
    items = orjson.loads(body)["items"]
    parsed = time.perf_counter()
    index = PodIndex()
    index.replace(items)
    loaded = time.perf_counter()
    del items, index
    # Memory in a second load, traced (tracing slows allocation several times).
    # As the watch reads a list: pages of 500 decoded and read into pods one at a time.
    pages = [orjson.dumps(json.loads(body)["items"][i : i + 500]) for i in range(0, n, 500)]
    del body
    gc.collect()
    tracemalloc.start()
    pods = []
    for page in pages:
        pods.extend(read_pods(orjson.loads(page)))
    index = PodIndex()
    index.replace_pods(pods)
    del pods
    gc.collect()
    index_bytes, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"load: JSON {parsed - start:.2f} s + index {loaded - parsed:.2f} s "
        f"= {loaded - start:.2f} s ({(loaded - start) / n * 1e6:.1f} µs a pod)"
    )
    print(
        f"memory: index {index_bytes / 1e6:.1f} MB ({index_bytes / n:.0f} B a pod), "
        f"peak while loading {peak / 1e6:.1f} MB (read page by page, as the watch does)"
    )

    hit = Peer(ipaddress.IPv4Address(0x0A000000 + n // 2))
    miss = Peer(ipaddress.IPv4Address(0x0B000001))
    table = {hit.ip: 1}
    lookup = index.lookup
    bare = per_call(lambda: table.get(hit.ip), 1_000_000)
    hit_ns = per_call(lambda: lookup(hit), 1_000_000)
    miss_ns = per_call(lambda: lookup(miss), 1_000_000)
    print(
        f"lookup: hit {hit_ns:.0f} ns, miss {miss_ns:.0f} ns; a bare dict get of the same "
        f"address {bare:.0f} ns (both through a lambda call)"
    )
    assert lookup(hit).known and not lookup(miss).known

    changed = make_pod(7)
    changed["metadata"]["labels"] = {**changed["metadata"]["labels"], "rollout": "2"}
    same = make_pod(8)
    events = 20_000
    start = time.perf_counter()
    for i in range(events):
        index.apply("MODIFIED", changed if i % 2 else same)
    took = time.perf_counter() - start
    print(f"watch event: {took / events * 1e6:.1f} µs each (MODIFIED, half of them a change)")

    typed = asyncio.run(typed_cost(args.typed_sample))
    print(
        f"typed models (kubernetes_asyncio V1Pod), not used: {typed * 1e6:.0f} µs a pod, "
        f"{typed * n:.1f} s for {n:,} pods on top of the above"
    )


if __name__ == "__main__":
    main()
