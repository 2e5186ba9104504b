"""Tests for the Elasticsearch sink through the official client against the stand-in."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from elasticsearch import AsyncElasticsearch, UnsupportedProductError
from prometheus_client import CollectorRegistry

from siem.config import ElasticsearchSinkSpec, SpoolSpec
from siem.exporter import DeliveryOptions, Exporter
from siem.sinks.elasticsearch import ElasticsearchSink, classify_item, index_template
from siem.spool import Record
from tests.siem.es_standin import EsStandin

DS = "logs-egressgw-default"
FAST = DeliveryOptions(batch_events=100, backoff_initial=0.01, backoff_max=0.1)


def event(n: int, **extra: Any) -> dict[str, Any]:
    return {"@timestamp": "2026-11-24T10:00:00Z", "event": {"id": f"e-{n}"}, **extra}


@pytest.fixture
async def es() -> AsyncIterator[EsStandin]:
    standin = EsStandin()
    await standin.start()
    yield standin
    await standin.stop()


def es_exporter(tmp_path: Path, url: str, **spec: Any) -> Exporter:
    sink = ElasticsearchSink(
        ElasticsearchSinkSpec(type="elasticsearch", hosts=[url], **spec),
        "es",
        dead_letter=tmp_path / "dead.jsonl",
    )
    spool = SpoolSpec(dir=tmp_path / "spool", batch_interval=0.01)
    return Exporter([sink], spool, delivery={"es": FAST}, registry=CollectorRegistry())


def metric(exp: Exporter, name: str) -> float:
    for family in exp.metrics.__dict__.values():
        for m in family.collect():
            for sample in m.samples:
                if sample.name == name and sample.labels.get("sink") == "es":
                    return float(sample.value)
    return 0.0


async def run(exp: Exporter, events: list[dict[str, Any]]) -> None:
    await exp.start()
    for e in events:
        exp.submit(e)
    await exp.flush()
    assert await exp.wait_delivered(within=15)
    await exp.aclose()


async def test_standin_speaks_to_the_official_client(es: EsStandin) -> None:
    """The real client accepts the stand-in's info answer and product header."""
    client = AsyncElasticsearch(es.url)
    info = await client.info()
    assert info["version"]["number"].startswith("9.")
    await client.close()


async def test_missing_product_header_is_refused(es: EsStandin, tmp_path: Path) -> None:
    """Without X-Elastic-Product the client refuses the answer and the sink raises."""
    es.product_header = False
    sink = ElasticsearchSink(
        ElasticsearchSinkSpec(type="elasticsearch", hosts=[es.url], install_template=False),
        "es",
        dead_letter=tmp_path / "dead.jsonl",
    )
    await sink.start()
    with pytest.raises(UnsupportedProductError):
        await sink.send([Record(1, orjson.dumps(event(1)))])
    await sink.aclose()


async def test_template_installed_once_and_docs_created(es: EsStandin, tmp_path: Path) -> None:
    """The template is installed if missing; every event is created with _id = event.id."""
    await run(es_exporter(tmp_path, es.url), [event(i) for i in range(250)])
    assert es.template_puts == 1
    assert es.templates["egressgw"]["index_patterns"] == ["logs-egressgw-*"]
    assert "data_stream" in es.templates["egressgw"]
    assert sorted(es.docs[DS]) == sorted(f"e-{i}" for i in range(250))
    await run(es_exporter(tmp_path, es.url), [event(1000)])
    assert es.template_puts == 1  # present now: not installed again


async def test_item_429_and_5xx_retried_without_duplicates(es: EsStandin, tmp_path: Path) -> None:
    """Items answered 429 or 500 are retried alone until created; nothing is stored twice."""

    def fault(doc: dict[str, Any], attempt: int) -> int | None:
        n = int(doc["event"]["id"][2:])
        if n % 7 == 0 and attempt == 1:
            return 429
        if n % 11 == 0 and attempt <= 2:
            return 500
        return None

    es.item_fault = fault
    exp = es_exporter(tmp_path, es.url)
    await run(exp, [event(i) for i in range(200)])
    assert sorted(es.docs[DS]) == sorted(f"e-{i}" for i in range(200))
    assert es.item_statuses[429] > 0 and es.item_statuses[500] > 0
    assert es.item_statuses[201] == 200
    assert metric(exp, "siem_sink_delivered_events_total") == 200
    assert metric(exp, "siem_sink_retried_events_total") >= es.item_statuses[429]


async def test_mapping_errors_go_to_dead_letter(es: EsStandin, tmp_path: Path) -> None:
    """A 400 item is written to the dead-letter file with its reason and counted as failed."""
    exp = es_exporter(tmp_path, es.url)
    await run(exp, [event(1), {"event": {"id": "no-timestamp"}}, event(2)])
    assert sorted(es.docs[DS]) == ["e-1", "e-2"]
    dead = [orjson.loads(line) for line in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert len(dead) == 1
    assert dead[0]["status"] == 400 and "@timestamp" in dead[0]["reason"]
    assert dead[0]["event"] == {"event": {"id": "no-timestamp"}}
    assert metric(exp, "siem_sink_failed_events_total") == 1


async def test_conflict_409_counts_as_delivered(es: EsStandin, tmp_path: Path) -> None:
    """A document that already exists (a retry after a crash) is not stored twice."""
    es.templates["egressgw"] = index_template(DS)
    es.docs[DS] = {"e-1": event(1)}
    exp = es_exporter(tmp_path, es.url)
    await run(exp, [event(1), event(2)])
    assert sorted(es.docs[DS]) == ["e-1", "e-2"]
    assert es.item_statuses[409] == 1
    assert metric(exp, "siem_sink_delivered_events_total") == 2


async def test_whole_request_503_is_retried(es: EsStandin, tmp_path: Path) -> None:
    """A 503 for the whole _bulk request is retried until it succeeds."""
    es.fail_requests = [503, 503, 429]
    exp = es_exporter(tmp_path, es.url)
    await run(exp, [event(i) for i in range(20)])
    assert len(es.docs[DS]) == 20
    assert es.bulk_requests >= 4


async def test_outage_loses_and_duplicates_nothing(es: EsStandin, tmp_path: Path) -> None:
    """With the server down mid-stream, events wait in the spool and arrive once afterwards."""
    exp = es_exporter(tmp_path, es.url)
    await exp.start()
    for i in range(100):
        exp.submit(event(i))
    await exp.flush()
    assert await exp.wait_delivered(within=10)
    await es.stop()
    for i in range(100, 300):
        exp.submit(event(i))
        if i % 20 == 0:
            await asyncio.sleep(0.01)
    await exp.flush()
    await asyncio.sleep(0.3)
    assert exp.lag()["es"] > 0
    await es.start()
    assert await exp.wait_delivered(within=15)
    await exp.aclose()
    assert sorted(es.docs[DS]) == sorted(f"e-{i}" for i in range(300))
    ids = collections.Counter(d["event"]["id"] for d in es.all_docs())
    assert max(ids.values()) == 1


async def test_too_large_requests_are_split(es: EsStandin, tmp_path: Path) -> None:
    """A 413 answer halves the batch until it fits; a document too large alone is dead."""
    es.max_bulk_bytes = 2000
    huge = event(999, message="x" * 5000)
    exp = es_exporter(tmp_path, es.url)
    await run(exp, [*(event(i) for i in range(60)), huge])
    assert sorted(es.docs[DS]) == sorted(f"e-{i}" for i in range(60))
    dead = [orjson.loads(line) for line in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert [(d["status"], d["event"]["event"]["id"]) for d in dead] == [(413, "e-999")]


async def test_template_permission_denied_still_writes(es: EsStandin, tmp_path: Path) -> None:
    """A key that may not manage templates (403) still writes events."""
    es.deny_templates = True
    await run(es_exporter(tmp_path, es.url), [event(1), event(2)])
    assert sorted(es.docs[DS]) == ["e-1", "e-2"] and es.templates == {}


def test_classify_item() -> None:
    """2xx and 409 are delivered, 429 and 5xx retried, other statuses dead."""
    assert classify_item({"create": {"status": 201}}) == "ok"
    assert classify_item({"create": {"status": 409}}) == "ok"
    assert classify_item({"create": {"status": 429}}) == "retry"
    assert classify_item({"create": {"status": 503}}) == "retry"
    assert classify_item({"create": {"status": 400}}) == "dead"
    assert classify_item({"index": {"status": 404}}) == "dead"


def test_index_template_asset_has_ecs_mappings() -> None:
    """The template asset maps core ECS fields with the right types."""
    body = index_template("logs-egressgw-prod")
    props = body["template"]["mappings"]["properties"]
    assert body["index_patterns"] == ["logs-egressgw-*"]
    assert props["source"]["properties"]["ip"]["type"] == "ip"
    assert props["@timestamp"]["type"] == "date"
    assert props["event"]["properties"]["id"]["type"] == "keyword"
