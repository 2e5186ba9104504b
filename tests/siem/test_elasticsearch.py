"""Tests for the Elasticsearch sink through the official client against the stand-in."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from elasticsearch import AsyncElasticsearch, NotFoundError, UnsupportedProductError
from prometheus_client import CollectorRegistry

from siem.config import ElasticsearchSinkSpec, SpoolSpec
from siem.exporter import DeliveryOptions, Exporter
from siem.sinks.elasticsearch import (
    ElasticsearchSink,
    classify_item,
    derived_id,
    holds,
    index_template,
)
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


def es_sink(tmp_path: Path, url: str, **spec: Any) -> ElasticsearchSink:
    return ElasticsearchSink(
        ElasticsearchSinkSpec(type="elasticsearch", hosts=[url], **spec),
        "es",
        dead_letter=tmp_path / "dead.jsonl",
    )


def es_exporter(
    tmp_path: Path, url: str, sink: ElasticsearchSink | None = None, **spec: Any
) -> Exporter:
    sink = sink or es_sink(tmp_path, url, **spec)
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


async def test_item_429_and_5xx_retried_without_duplicates(
    es: EsStandin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Items answered 429 or 500 are retried alone until created, and logged; none twice."""

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
    assert "es_rejected_execution_exception" in caplog.text


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


async def test_resent_event_is_a_counted_duplicate(es: EsStandin, tmp_path: Path) -> None:
    """A 409 whose stored document is the event sent (a retry after a crash) is delivered once."""
    es.templates["egressgw"] = index_template(DS)
    es.docs[DS] = {"e-1": event(1)}
    sink = es_sink(tmp_path, es.url)
    exp = es_exporter(tmp_path, es.url, sink)
    await run(exp, [event(1), event(2)])
    assert es.docs[DS] == {"e-1": event(1), "e-2": event(2)}
    assert es.item_statuses[409] == 1 and es.mget_requests == 1
    assert (sink.duplicates, sink.collisions, sink.unverified) == (1, 0, 0)
    assert metric(exp, "siem_sink_delivered_events_total") == 2


async def test_fields_added_by_a_pipeline_still_make_a_duplicate(
    es: EsStandin, tmp_path: Path
) -> None:
    """A stored document with extra fields (an ingest pipeline's) is still the event sent."""
    es.templates["egressgw"] = index_template(DS)
    stored = event(1, source={"ip": "10.0.0.1"})
    stored["event"]["ingested"] = "2026-11-24T10:00:01Z"
    stored["source"]["geo"] = {"country_iso_code": "NL"}
    es.docs[DS] = {"e-1": stored}
    sink = es_sink(tmp_path, es.url)
    await run(es_exporter(tmp_path, es.url, sink), [event(1, source={"ip": "10.0.0.1"})])
    assert es.docs[DS] == {"e-1": stored}
    assert sink.duplicates == 1 and sink.collisions == 0


async def test_different_event_with_the_same_id_is_kept(
    es: EsStandin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another event under a taken _id is stored under a derived _id and the collision logged."""
    es.templates["egressgw"] = index_template(DS)
    first = event(1, message="from worker 1")
    second = event(1, message="from worker 2")
    es.docs[DS] = {"e-1": first}
    sink = es_sink(tmp_path, es.url)
    exp = es_exporter(tmp_path, es.url, sink)
    await run(exp, [second, event(2)])
    derived = derived_id("e-1", second)
    assert derived.startswith("e-1-") and derived != "e-1"
    assert es.docs[DS] == {"e-1": first, derived: second, "e-2": event(2)}
    assert (sink.duplicates, sink.collisions) == (0, 1)
    assert metric(exp, "siem_sink_delivered_events_total") == 2
    collision = [r for r in caplog.records if "collision" in r.getMessage()]
    assert len(collision) == 1 and collision[0].levelno == logging.ERROR
    assert DS in collision[0].getMessage() and derived in collision[0].getMessage()
    assert "holds event.id e-1, not the event.id e-1 sent" in collision[0].getMessage()


async def test_resent_collision_is_stored_once(es: EsStandin, tmp_path: Path) -> None:
    """Sending the colliding event again finds it under its derived _id: no third document."""
    es.templates["egressgw"] = index_template(DS)
    first, second = event(1, message="a"), event(1, message="b")
    es.docs[DS] = {"e-1": first, derived_id("e-1", second): second}
    sink = es_sink(tmp_path, es.url)
    await run(es_exporter(tmp_path, es.url, sink), [second])
    assert len(es.docs[DS]) == 2
    assert (sink.duplicates, sink.collisions) == (1, 0)


async def test_failing_mget_retries_the_conflicts(es: EsStandin, tmp_path: Path) -> None:
    """While _mget answers 5xx the 409 events are retried; then each is settled, none lost."""
    es.templates["egressgw"] = index_template(DS)
    first, second = event(1, message="a"), event(1, message="b")
    es.docs[DS] = {"e-1": first, "e-3": event(3)}
    es.fail_mget = [503, 500]
    sink = es_sink(tmp_path, es.url)
    exp = es_exporter(tmp_path, es.url, sink)
    await run(exp, [second, event(2), event(3)])
    assert es.mget_requests == 3
    assert es.docs[DS] == {
        "e-1": first,
        derived_id("e-1", second): second,
        "e-2": event(2),
        "e-3": event(3),
    }
    assert (sink.duplicates, sink.collisions) == (1, 1)
    assert metric(exp, "siem_sink_retried_events_total") == 4  # two events, two failed _mgets
    assert metric(exp, "siem_sink_delivered_events_total") == 3
    assert not (tmp_path / "dead.jsonl").exists()


async def test_conflict_not_found_is_retried(es: EsStandin, tmp_path: Path) -> None:
    """A 409 whose document _mget cannot find (deleted since) is sent again and created."""
    es.templates["egressgw"] = index_template(DS)
    es.docs[DS] = {}
    es.item_fault = lambda doc, attempt: 409 if attempt == 1 else None
    sink = es_sink(tmp_path, es.url)
    await run(es_exporter(tmp_path, es.url, sink), [event(1)])
    assert es.docs[DS] == {"e-1": event(1)} and es.mget_requests == 1
    assert (sink.duplicates, sink.collisions, sink.unverified) == (0, 0, 0)


async def test_no_read_access_counts_409_unverified(
    es: EsStandin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key that may not read (403 to _mget) delivers 409s unverified, with one warning."""
    es.templates["egressgw"] = index_template(DS)
    es.docs[DS] = {"e-1": event(1, message="other"), "e-2": event(2)}
    es.fail_mget = [403]
    sink = es_sink(tmp_path, es.url)
    exp = es_exporter(tmp_path, es.url, sink)
    await run(exp, [event(1), event(2)])
    assert es.mget_requests == 1
    assert (sink.duplicates, sink.collisions, sink.unverified) == (0, 0, 2)
    assert metric(exp, "siem_sink_delivered_events_total") == 2
    assert "grant read access" in caplog.text


async def test_standin_mget_and_get_follow_the_documented_api(es: EsStandin) -> None:
    """_mget answers found, not found and a missing index per document; GET _doc 404s."""
    es.docs[DS] = {"e-1": event(1)}
    client = AsyncElasticsearch(es.url)
    resp = await client.mget(
        docs=[
            {"_index": DS, "_id": "e-1"},
            {"_index": DS, "_id": "e-9"},
            {"_index": "nope", "_id": "e-1"},
        ]
    )
    found, missing, no_index = resp["docs"]
    assert found["found"] is True and found["_source"] == event(1) and found["_id"] == "e-1"
    assert missing == {"_index": DS, "_id": "e-9", "found": False}
    assert no_index["error"]["type"] == "index_not_found_exception"
    by_ids = await client.mget(index=DS, ids=["e-1"])
    assert by_ids["docs"][0]["_source"] == event(1)
    assert (await client.get(index=DS, id="e-1"))["_source"] == event(1)
    with pytest.raises(NotFoundError):
        await client.get(index=DS, id="e-9")
    await client.close()


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
    """2xx are delivered, 409 checked, 429 and 5xx retried, other statuses dead."""
    assert classify_item({"create": {"status": 201}}) == "ok"
    assert classify_item({"create": {"status": 409}}) == "conflict"
    assert classify_item({"create": {"status": 429}}) == "retry"
    assert classify_item({"create": {"status": 503}}) == "retry"
    assert classify_item({"create": {"status": 400}}) == "dead"
    assert classify_item({"index": {"status": 404}}) == "dead"


def test_holds_compares_parsed_fields() -> None:
    """Stored holds sent when every sent field has the same value; extra stored fields are fine."""
    sent = {"event": {"id": "e-1", "action": "x"}, "n": 1, "tags": ["a", "b"]}
    assert holds({**sent, "extra": True}, sent)
    assert holds({**sent, "event": {"id": "e-1", "action": "x", "ingested": "t"}}, sent)
    assert not holds({**sent, "n": 2}, sent)
    assert not holds({**sent, "tags": ["b", "a"]}, sent)
    assert not holds({"event": {"id": "e-1"}, "n": 1, "tags": ["a", "b"]}, sent)
    assert not holds({**sent, "event": "e-1"}, sent)


def test_derived_id_is_deterministic_and_bounded() -> None:
    """The derived _id depends on content, not key order, and stays within 512 bytes."""
    a = derived_id("e-1", {"x": 1, "y": 2})
    assert a == derived_id("e-1", {"y": 2, "x": 1}) != derived_id("e-1", {"x": 1, "y": 3})
    assert len(derived_id("i" * 512, {"x": 1}).encode()) <= 512


def test_index_template_asset_has_ecs_mappings() -> None:
    """The template asset maps core ECS fields with the right types."""
    body = index_template("logs-egressgw-prod")
    props = body["template"]["mappings"]["properties"]
    assert body["index_patterns"] == ["logs-egressgw-*"]
    assert props["source"]["properties"]["ip"]["type"] == "ip"
    assert props["@timestamp"]["type"] == "date"
    assert props["event"]["properties"]["id"]["type"] == "keyword"
