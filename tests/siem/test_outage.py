"""Both receivers configured: taking one down delays only that sink, and nothing is lost or
duplicated once it returns."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from siem.config import ElasticsearchSinkSpec, SpoolSpec, SyslogSinkSpec
from siem.exporter import Exporter
from tests.siem.es_standin import EsStandin
from tests.siem.rsyslog_server import Rsyslogd, free_port, missing_imrelp, missing_rsyslogd
from tests.siem.test_syslog import json_ids

FAST = {"batch_events": 50, "backoff_initial": 0.02, "backoff_max": 0.2}


def event(n: int) -> dict[str, Any]:
    return {"@timestamp": "2026-11-24T10:00:00Z", "event": {"id": f"e-{n}", "action": "connect"}}


async def produce(exp: Exporter, start: int, count: int) -> None:
    for i in range(start, start + count):
        exp.submit(event(i))
        if i % 20 == 19:
            await asyncio.sleep(0.005)


OUTAGE_STEP = 5.0  # during a long outage, 100 events arrive every OUTAGE_STEP seconds


async def produce_during(exp: Exporter, start: int, outage: float) -> int:
    """Events while a receiver is down: 200 at once, or a stream for ``outage`` seconds.

    Returns the next event number.
    """
    if not outage:
        await produce(exp, start, 200)
        return start + 200
    n = start
    for _ in range(int(outage / OUTAGE_STEP)):
        await produce(exp, n, 100)
        n += 100
        await asyncio.sleep(OUTAGE_STEP)
    return n


async def wait_lag(exp: Exporter, sink: str, within: float = 20.0) -> None:
    """Wait until a sink has delivered everything spooled."""
    for _ in range(int(within / 0.02)):
        if exp.lag()[sink] == 0:
            return
        await asyncio.sleep(0.02)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("transport", "outage"),
    [
        pytest.param(
            "tcp",
            0.0,
            marks=pytest.mark.skipif(
                missing_rsyslogd() is not None, reason=str(missing_rsyslogd())
            ),
            id="tcp-brief",
        ),
        # The promise: either receiver down for a minute, events arriving all along.
        pytest.param(
            "relp",
            60.0,
            marks=pytest.mark.skipif(missing_imrelp() is not None, reason=str(missing_imrelp())),
            id="relp-one-minute",
        ),
    ],
)
async def test_each_receiver_down_in_turn(tmp_path: Path, transport: str, outage: float) -> None:
    """ES down: syslog keeps up; rsyslogd down: ES keeps up; in the end both have all, once."""
    es = EsStandin()
    await es.start()
    port = free_port()
    rsyslogd = Rsyslogd(tmp_path / "rsyslog", port, relp=transport == "relp")
    await asyncio.to_thread(rsyslogd.start)
    sinks = [
        ElasticsearchSinkSpec(type="elasticsearch", hosts=[es.url], **FAST),
        SyslogSinkSpec(type="syslog", address=f"127.0.0.1:{port}", transport=transport, **FAST),
    ]
    spool = SpoolSpec(dir=Path("spool"), batch_interval=0.01)
    exp = Exporter.from_config(spool, sinks, tmp_path, registry=CollectorRegistry())
    await exp.start()
    try:
        n = await produce_during(exp, 0, 0.0)
        await es.stop()
        n = await produce_during(exp, n, outage)
        await exp.flush()
        await wait_lag(exp, "syslog")  # syslog catches up while Elasticsearch is down
        assert exp.lag()["syslog"] == 0 and exp.lag()["elasticsearch"] > 0
        await es.start()
        await wait_lag(exp, "elasticsearch")
        await asyncio.to_thread(rsyslogd.stop)
        n = await produce_during(exp, n, outage)
        await exp.flush()
        await wait_lag(exp, "elasticsearch")
        assert exp.lag()["elasticsearch"] == 0 and exp.lag()["syslog"] > 0
        await asyncio.to_thread(rsyslogd.start)
        assert await exp.wait_delivered(within=30)
    finally:
        await exp.aclose()
        await asyncio.to_thread(rsyslogd.stop)
        await es.stop()
    want = {f"e-{i}" for i in range(n)}
    stored = collections.Counter(d["event"]["id"] for d in es.all_docs())
    assert set(stored) == want and max(stored.values()) == 1
    received = collections.Counter(json_ids(rsyslogd.lines()))
    assert set(received) == want and max(received.values()) == 1
