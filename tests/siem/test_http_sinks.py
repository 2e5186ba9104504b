"""Tests for the webhook and Splunk HEC sinks against small aiohttp receivers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from siem.config import SplunkHecSinkSpec, SpoolSpec, WebhookSinkSpec
from siem.exporter import DeliveryOptions, Exporter
from siem.sinks.splunk_hec import SplunkHecSink
from siem.sinks.webhook import HttpRetryError, WebhookSink
from siem.spool import Record

TOKEN = "00000000-0000-0000-0000-000000000000"


def event(n: int) -> dict[str, Any]:
    return {"@timestamp": "2026-11-24T10:00:00Z", "event": {"id": f"e-{n}"}}


def records(n: int) -> list[Record]:
    return [Record(i + 1, orjson.dumps(event(i))) for i in range(n)]


class Receiver:
    """Records request bodies; `statuses` scripts the next answers (default 200)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.statuses: list[int] = []
        self.acks: dict[int, bool] = {}
        self.ack_polls = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        body = await request.read()
        self.headers.append(dict(request.headers))
        if status != 200:
            return web.json_response({"text": "nope", "code": 9}, status=status)
        self.bodies.append(body)
        ack_id = len(self.bodies) - 1
        self.acks[ack_id] = False
        return web.json_response({"text": "Success", "code": 0, "ackId": ack_id})

    async def ack(self, request: web.Request) -> web.Response:
        self.ack_polls += 1
        wanted = (await request.json())["acks"]
        for a in wanted:  # acknowledge on the second poll
            if self.ack_polls > 1:
                self.acks[a] = True
        return web.json_response({"acks": {str(a): self.acks.get(a, False) for a in wanted}})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/events", rec.handle)
    app.router.add_post("/services/collector/event", rec.handle)
    app.router.add_post("/services/collector/ack", rec.ack)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield rec
    await runner.cleanup()


async def test_webhook_posts_json_lines(receiver: Receiver) -> None:
    """A batch is one POST of JSON lines with the configured headers."""
    spec = WebhookSinkSpec(type="webhook", url=receiver.url + "/events", headers={"X-Key": "k"})
    sink = WebhookSink(spec, "hook")
    await sink.start()
    result = await sink.send(records(3))
    await sink.aclose()
    assert result.retry == [] and result.failed == 0
    lines = receiver.bodies[0].splitlines()
    assert [orjson.loads(x)["event"]["id"] for x in lines] == ["e-0", "e-1", "e-2"]
    assert receiver.headers[0]["X-Key"] == "k"
    assert receiver.headers[0]["Content-Type"] == "application/x-ndjson"


async def test_webhook_5xx_raises_and_4xx_fails(receiver: Receiver) -> None:
    """5xx and 429 are retryable (raise); other 4xx reject the batch for good."""
    sink = WebhookSink(WebhookSinkSpec(type="webhook", url=receiver.url + "/events"), "hook")
    await sink.start()
    receiver.statuses = [503, 429, 400]
    with pytest.raises(HttpRetryError, match="503"):
        await sink.send(records(2))
    with pytest.raises(HttpRetryError, match="429"):
        await sink.send(records(2))
    assert (await sink.send(records(2))).failed == 2
    await sink.aclose()


async def test_webhook_through_exporter_survives_errors(receiver: Receiver, tmp_path: Path) -> None:
    """Through the exporter, 5xx answers are retried until every event is delivered."""
    receiver.statuses = [500, 502]
    sink = WebhookSink(WebhookSinkSpec(type="webhook", url=receiver.url + "/events"), "hook")
    exp = Exporter(
        [sink],
        SpoolSpec(dir=tmp_path / "spool", batch_interval=0.01),
        delivery={"hook": DeliveryOptions(backoff_initial=0.01, backoff_max=0.05)},
        registry=CollectorRegistry(),
    )
    await exp.start()
    for i in range(30):
        exp.submit(event(i))
    await exp.flush()
    assert await exp.wait_delivered(within=10)
    await exp.aclose()
    got = [orjson.loads(x)["event"]["id"] for b in receiver.bodies for x in b.splitlines()]
    assert got == [f"e-{i}" for i in range(30)]


async def test_hec_sends_events_with_token(receiver: Receiver) -> None:
    """HEC batches are concatenated event objects sent with the Splunk token."""
    spec = SplunkHecSinkSpec(type="splunk_hec", url=receiver.url, token=TOKEN, index="net")
    sink = SplunkHecSink(spec, "hec")
    await sink.start()
    await sink.send(records(2))
    await sink.aclose()
    assert receiver.headers[0]["Authorization"] == f"Splunk {TOKEN}"
    objs = [orjson.loads(x) for x in receiver.bodies[0].splitlines()]
    assert [o["event"]["event"]["id"] for o in objs] == ["e-0", "e-1"]
    assert objs[0]["index"] == "net" and objs[0]["sourcetype"] == "_json"


async def test_hec_token_from_a_file(receiver: Receiver, tmp_path: Path) -> None:
    """token_file (a mounted Secret, trailing newline and all) is read at start and sent."""
    (tmp_path / "hec-token").write_text(f"{TOKEN}\n")
    spec = SplunkHecSinkSpec(type="splunk_hec", url=receiver.url, token_file=tmp_path / "hec-token")
    sink = SplunkHecSink(spec, "hec")
    await sink.start()
    await sink.send(records(1))
    await sink.aclose()
    assert receiver.headers[0]["Authorization"] == f"Splunk {TOKEN}"


def test_hec_needs_exactly_one_token_source(tmp_path: Path) -> None:
    """Neither token nor token_file, or both, is a configuration error."""
    with pytest.raises(ValueError, match="token or token_file"):
        SplunkHecSinkSpec(type="splunk_hec", url="https://hec.example")
    with pytest.raises(ValueError, match="token or token_file"):
        SplunkHecSinkSpec(
            type="splunk_hec", url="https://hec.example", token=TOKEN, token_file=tmp_path / "t"
        )


async def test_hec_waits_for_indexer_ack(receiver: Receiver) -> None:
    """With ack: true the sink sends a channel and polls until the ack id is confirmed."""
    spec = SplunkHecSinkSpec(type="splunk_hec", url=receiver.url, token=TOKEN, ack=True)
    sink = SplunkHecSink(spec, "hec")
    await sink.start()
    await asyncio.wait_for(sink.send(records(1)), 5)
    await sink.aclose()
    assert receiver.headers[0]["X-Splunk-Request-Channel"] == sink.channel
    assert receiver.ack_polls == 2 and receiver.acks[0] is True


async def test_hec_auth_errors_are_retried(receiver: Receiver) -> None:
    """401/403 and 503 raise (retry later, a fixed token must not lose events); 400 fails."""
    sink = SplunkHecSink(SplunkHecSinkSpec(type="splunk_hec", url=receiver.url, token=TOKEN), "hec")
    await sink.start()
    receiver.statuses = [403, 503, 400]
    for _ in range(2):
        with pytest.raises(HttpRetryError):
            await sink.send(records(1))
    assert (await sink.send(records(1))).failed == 1
    await sink.aclose()
