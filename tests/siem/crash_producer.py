"""Child process for the crash test: produces events into a spooled exporter with an
Elasticsearch sink and prints the last event number that `flush()` acknowledged.

Usage: python -m tests.siem.crash_producer SPOOL_DIR ES_URL START COUNT
COUNT 0 means: only start, deliver what is spooled, print "drained", exit.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from siem.config import ElasticsearchSinkSpec, SpoolSpec
from siem.exporter import Exporter

CHUNK = 25


def event(n: int) -> dict[str, object]:
    """The n-th event (deterministic, so a resubmission is the same document)."""
    return {"@timestamp": "2026-11-24T10:00:00Z", "event": {"id": f"e-{n}", "action": "connect"}}


async def main(spool_dir: str, url: str, start: int, count: int) -> None:
    """Produce events and report acknowledgements on stdout."""
    spool = SpoolSpec(dir=Path(spool_dir), segment_bytes="64KiB", batch_interval=0.005)
    sink = ElasticsearchSinkSpec(
        type="elasticsearch", hosts=[url], batch_events=40, backoff_initial=0.01, backoff_max=0.1
    )
    exp = Exporter.from_config(spool, [sink], spool_dir, registry=CollectorRegistry())
    await exp.start()
    print("started", flush=True)
    if count == 0:
        ok = await exp.wait_delivered(within=30)
        await exp.aclose()
        print("drained" if ok else "timeout", flush=True)
        return
    n = start
    while n < start + count:
        for i in range(n, n + CHUNK):
            exp.submit(event(i))
        n += CHUNK
        await exp.flush()
        print(f"acked {n - 1}", flush=True)
        await asyncio.sleep(0.002)
    await exp.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
