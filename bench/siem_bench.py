"""SIEM export benchmark: events/s into the spool, and out to a file sink and to syslog/TCP.

Runs on one core (sched_setaffinity), with fsync per batch. Usage:

    .venv/bin/python bench/siem_bench.py [--events 200000] [--json]

Figures: submit() cost, events/s made durable in the spool, events/s delivered end to end
to a file sink and to a syslog receiver over TCP (a separate process on loopback that reads
and discards; the sink waits for TCP acknowledgement of each batch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from siem.config import FileSinkSpec, SinkSpec, SpoolSpec, SyslogSinkSpec
from siem.exporter import Exporter

TARGET_SPOOL_EPS = 50_000
YIELD_EVERY = 500  # the gateway's loop runs other work between events
RECEIVER = """
import socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    while conn.recv(1 << 20):
        pass
"""


def make_event(n: int) -> dict[str, Any]:
    """A connection event shaped like the gateway's (about 700 bytes of JSON)."""
    return {
        "@timestamp": "2026-11-24T10:00:00.123Z",
        "ecs": {"version": "8.11.0"},
        "event": {
            "id": f"0192f3e4-7b1c-7000-8000-{n:012d}",
            "kind": "event",
            "category": ["network"],
            "type": ["connection", "allowed"],
            "action": "connect",
            "outcome": "success",
            "duration": 1234567,
        },
        "source": {"ip": "10.244.1.17", "port": 40000 + n % 20000, "bytes": 1532},
        "destination": {
            "domain": "api.example.com",
            "ip": "93.184.216.34",
            "port": 443,
            "bytes": 48211,
        },
        "network": {"transport": "tcp", "protocol": "tls"},
        "tls": {"client": {"server_name": "api.example.com"}},
        "orchestrator": {"namespace": "payments", "type": "kubernetes"},
        "kubernetes": {"pod": {"name": "api-5d8f7c-x2k4q"}, "labels": {"app": "api"}},
        "service": {"name": "api"},
        "rule": {"name": "allow-payments-apis", "ruleset": "platform"},
        "observer": {"hostname": "node-1", "product": "egressgw"},
    }


@contextlib.contextmanager
def receiver() -> Iterator[int]:
    """A discarding TCP receiver in another process; yields its port."""
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


async def run(
    events: list[dict[str, Any]], spool: SpoolSpec, sinks: list[SinkSpec], base: Path
) -> dict[str, float]:
    """Submit all events, then measure until durable and until delivered."""
    exp = Exporter.from_config(spool, sinks, base, registry=CollectorRegistry())
    await exp.start()
    t0 = time.perf_counter()
    submit_time = 0.0
    for i in range(0, len(events), YIELD_EVERY):
        s = time.perf_counter()
        for e in events[i : i + YIELD_EVERY]:
            exp.submit(e)
        submit_time += time.perf_counter() - s
        await asyncio.sleep(0)
    await exp.flush()
    t_durable = time.perf_counter() - t0
    ok = await exp.wait_delivered(within=300)
    t_delivered = time.perf_counter() - t0
    dropped = sum(exp.spool.dropped.values()) if exp.spool is not None else 0
    await exp.aclose()
    if not ok:
        raise RuntimeError("delivery did not finish")
    if dropped:
        raise RuntimeError(f"{dropped} events dropped: the figures would be meaningless")
    n = len(events)
    return {
        "submit_ns": submit_time / n * 1e9,
        "spool_eps": n / t_durable,
        "delivered_eps": n / t_delivered if sinks else n / t_durable,
    }


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    events = [make_event(i) for i in range(args.events)]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, receiver() as port:
        base = Path(tmp)

        def spool(name: str) -> SpoolSpec:
            return SpoolSpec(
                dir=base / name, fsync="batch", max_bytes="2GiB", segment_bytes="64MiB"
            )

        results["spool"] = asyncio.run(run(events, spool("s1"), [], base))
        file_sink = FileSinkSpec(
            type="file", path=base / "events.jsonl", batch_events=2000, rotate_bytes="4GiB"
        )
        results["file"] = asyncio.run(run(events, spool("s2"), [file_sink], base))
        syslog = SyslogSinkSpec(
            type="syslog", address=f"127.0.0.1:{port}", transport="tcp", batch_events=2000
        )
        results["syslog_tcp"] = asyncio.run(run(events, spool("s3"), [syslog], base))
    cpu = socket.gethostname()
    if args.json:
        print(json.dumps({"events": args.events, "host": cpu, "results": results}, indent=2))
        return
    print(f"siem export benchmark: {args.events} events (~700 B JSON), fsync per batch, one core")
    print(f"{'path':<12} {'submit ns/ev':>13} {'into spool ev/s':>16} {'delivered ev/s':>15}")
    for name, r in results.items():
        submit, into, out = r["submit_ns"], r["spool_eps"], r["delivered_eps"]
        print(f"{name:<12} {submit:>13.0f} {into:>16,.0f} {out:>15,.0f}")
    spool_eps = results["spool"]["spool_eps"]
    verdict = "meets" if spool_eps >= TARGET_SPOOL_EPS else "MISSES"
    print(f"target >= {TARGET_SPOOL_EPS:,} ev/s into the spool: {verdict} ({spool_eps:,.0f} ev/s)")
    print(
        "the gateway emits ~2 events per proxied connection: "
        f"spool capacity ~ {spool_eps / 2:,.0f} connections/s"
    )


if __name__ == "__main__":
    main()
