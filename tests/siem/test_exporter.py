"""Tests for the exporter: batching into the spool, per-sink delivery, retries, restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import TypeAdapter
from ruamel.yaml import YAML

from siem.config import FileSinkSpec, SinkSpec, SpoolSpec
from siem.exporter import DeliveryOptions, Exporter, _SpoolSource, backoff_delay
from siem.sinks import SendResult
from siem.sinks.elasticsearch import ElasticsearchSink
from siem.sinks.file import FileSink
from siem.sinks.syslog import SyslogSink
from siem.spool import Record, Spool

CONTRACT = Path(__file__).resolve().parents[1] / "integration" / "contract" / "egressgw-siem.yaml"
FAST = DeliveryOptions(batch_events=100, backoff_initial=0.01, backoff_max=0.05)


def event(n: int) -> dict[str, Any]:
    return {"@timestamp": "2026-11-24T10:00:00Z", "event": {"id": f"e-{n}", "action": "connect"}}


class RecordingSink:
    """A sink that keeps what it receives; can fail whole batches or ask for item retries."""

    def __init__(self, name: str, fail_batches: int = 0, retry_first: int = 0) -> None:
        self.name = name
        self.received: list[str] = []
        self.payloads: list[bytes] = []
        self.fail_batches = fail_batches
        self.retry_first = retry_first
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def start(self) -> None:
        pass

    async def send(self, batch: Sequence[Record]) -> SendResult:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_batches:
            self.fail_batches -= 1
            raise ConnectionError("receiver down")
        retry = list(batch[: self.retry_first])
        self.retry_first = 0
        self.received += [orjson.loads(r.payload)["event"]["id"] for r in batch[len(retry) :]]
        self.payloads += [r.payload for r in batch[len(retry) :]]
        return SendResult(retry=retry)

    async def aclose(self) -> None:
        self.closed = True


def spool_spec(tmp_path: Path, **kw: Any) -> SpoolSpec:
    return SpoolSpec(dir=tmp_path / "spool", segment_bytes=64 * 1024, batch_interval=0.01, **kw)


def exporter(sinks: list[Any], spool: SpoolSpec | None, **kw: Any) -> Exporter:
    return Exporter(
        sinks,
        spool,
        delivery={s.name: FAST for s in sinks},
        registry=CollectorRegistry(),
        **kw,
    )


def metric(exp: Exporter, name: str, **labels: str) -> float:
    value = exp.metrics.delivered._name  # keep mypy quiet about the registry type
    assert value
    for family in exp.metrics.__dict__.values():
        for m in family.collect():
            for sample in m.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
    return 0.0


async def test_events_reach_every_sink_in_order(tmp_path: Path) -> None:
    """Submitted events are spooled and each sink receives all of them once, in order."""
    a, b = RecordingSink("a"), RecordingSink("b")
    exp = exporter([a, b], spool_spec(tmp_path))
    await exp.start()
    for i in range(2500):
        exp.submit(event(i))
    await exp.flush()
    assert await exp.wait_delivered(within=10)
    want = [f"e-{i}" for i in range(2500)]
    assert a.received == want and b.received == want
    assert metric(exp, "siem_sink_delivered_events_total", sink="a") == 2500
    await exp.aclose()
    assert a.closed and b.closed


async def test_dead_sink_blocks_neither_submit_nor_other_sinks(tmp_path: Path) -> None:
    """A sink that never answers only grows its own lag."""
    stuck, ok = RecordingSink("stuck"), RecordingSink("ok")
    stuck.gate = asyncio.Event()
    exp = exporter([stuck, ok], spool_spec(tmp_path))
    await exp.start()
    for i in range(500):
        exp.submit(event(i))
    await exp.flush()
    for _ in range(1000):
        if len(ok.received) == 500:
            break
        await asyncio.sleep(0.01)
    assert len(ok.received) == 500
    assert exp.lag()["stuck"] == 500 and exp.lag()["ok"] == 0
    await exp.aclose()


async def test_undelivered_events_survive_restart(tmp_path: Path) -> None:
    """Events a sink could not take stay in the spool and go out after the next start."""
    down = RecordingSink("siem", fail_batches=10**9)
    exp = exporter([down], spool_spec(tmp_path))
    await exp.start()
    for i in range(300):
        exp.submit(event(i))
    await exp.flush()
    await asyncio.sleep(0.05)
    await exp.aclose()
    assert down.received == []
    up = RecordingSink("siem")
    exp2 = exporter([up], spool_spec(tmp_path))
    await exp2.start()
    assert await exp2.wait_delivered(within=10)
    assert up.received == [f"e-{i}" for i in range(300)]
    await exp2.aclose()


async def test_failed_batches_and_items_are_retried(tmp_path: Path) -> None:
    """Whole-batch failures and per-item retries both end in delivery, counted as retried."""
    sink = RecordingSink("s", fail_batches=2, retry_first=5)
    exp = exporter([sink], spool_spec(tmp_path))
    await exp.start()
    for i in range(50):
        exp.submit(event(i))
    await exp.flush()
    assert await exp.wait_delivered(within=10)
    assert sorted(sink.received) == sorted(f"e-{i}" for i in range(50))
    assert len(sink.received) == 50
    assert metric(exp, "siem_sink_retried_events_total", sink="s") == 2 * 50 + 5
    await exp.aclose()


async def test_interval_fsync_flush_is_durable(tmp_path: Path) -> None:
    """With fsync: interval, flush still makes everything submitted durable."""
    sink = RecordingSink("s")
    exp = exporter([sink], spool_spec(tmp_path, fsync="interval", fsync_interval=30))
    await exp.start()
    for i in range(10):
        exp.submit(event(i))
    await exp.flush()
    assert exp.spool is not None and exp.spool.durable_seq == 10
    await exp.aclose()


async def test_memory_mode_bounds_and_reports_drops() -> None:
    """Without a spool each sink has a bounded queue; overflow is counted and marked by a gap."""
    sink = RecordingSink("s")
    sink.gate = asyncio.Event()
    exp = Exporter(
        [sink],
        None,
        delivery={"s": DeliveryOptions(batch_events=1000, queue_events=100)},
        registry=CollectorRegistry(),
    )
    await exp.start()
    for i in range(250):
        exp.submit(event(i))
    await exp.flush()
    sink.gate.set()
    assert await exp.wait_delivered(within=5)
    await asyncio.sleep(0.05)
    assert any(r.startswith("e-") for r in sink.received)
    gaps = [r for r in sink.received if not r.startswith("e-")]
    assert len(gaps) == 1
    assert metric(exp, "siem_dropped_events_total", sink="s", reason="queue_full") >= 150
    await exp.aclose()


async def test_pending_limit_counts_drops(tmp_path: Path) -> None:
    """More submitted events than max_pending are dropped, counted and marked by a gap event."""
    sink = RecordingSink("s")
    exp = exporter([sink], spool_spec(tmp_path), max_pending=10)
    for i in range(25):  # before start: nothing drains the pending batch
        exp.submit(event(i))
    await exp.start()
    await exp.flush()
    assert await exp.wait_delivered(within=5)
    assert sink.received[:10] == [f"e-{i}" for i in range(10)]
    assert len(sink.received) == 11  # ten events and one gap marker
    assert exp.spool is not None and exp.spool.dropped["pending_full"] == 15
    await exp.aclose()


@pytest.mark.parametrize("spooled", [True, False])
async def test_an_unserialisable_event_is_counted_and_marked(tmp_path: Path, spooled: bool) -> None:
    """An event orjson cannot write is not delivered; a gap marker says so and the rest flow."""
    sink = RecordingSink("s")
    exp = exporter([sink], spool_spec(tmp_path) if spooled else None)
    await exp.start()
    exp.submit(event(0))
    exp.submit({"event": {"id": "bad"}, "oops": object()})
    exp.submit(event(2))
    await exp.flush()
    assert await exp.wait_delivered(within=5)
    await exp.aclose()
    assert [r for r in sink.received if r.startswith("e-")] == ["e-0", "e-2"]
    assert len(sink.received) == 3  # and one gap marker, never the bad event
    if spooled:
        assert exp.spool is not None and exp.spool.dropped["unserialisable"] == 1


async def test_an_event_with_non_string_keys_is_delivered_with_string_keys(tmp_path: Path) -> None:
    """Plain serialisation refuses an int key; the exporter retries with string keys."""
    sink = RecordingSink("s")
    exp = exporter([sink], None)
    await exp.start()
    exp.submit({"event": {"id": "numbered"}, "labels": {7: "seven"}})
    await exp.flush()
    assert await exp.wait_delivered(within=5)
    await exp.aclose()
    assert sink.received == ["numbered"]
    assert orjson.loads(sink.payloads[0])["labels"] == {"7": "seven"}


async def test_file_sink_end_to_end_with_rotation(tmp_path: Path) -> None:
    """The file sink writes JSON lines and rotates by size, keeping `keep` old files."""
    spec = FileSinkSpec(
        type="file", path=tmp_path / "out" / "events.jsonl", rotate_bytes=4096, keep=2
    )
    exp = Exporter.from_config(spool_spec(tmp_path), [spec], tmp_path, registry=CollectorRegistry())
    await exp.start()
    for i in range(400):
        exp.submit(event(i))
    await exp.flush()
    assert await exp.wait_delivered(within=10)
    await exp.aclose()
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    assert all(f.stat().st_size <= 4096 for f in files)
    lines = (tmp_path / "out" / "events.jsonl").read_bytes().splitlines()
    assert orjson.loads(lines[-1])["event"]["id"] == "e-399"


def test_from_config_builds_the_contract_sinks(tmp_path: Path) -> None:
    """The contract's spool and sinks validate and become sinks with paths under base_dir."""
    data = YAML(typ="safe").load(CONTRACT.read_text())
    spool = SpoolSpec.model_validate(data["spool"])
    sinks = TypeAdapter(list[SinkSpec]).validate_python(data["sinks"])
    exp = Exporter.from_config(spool, sinks, tmp_path, registry=CollectorRegistry())
    assert exp.spool_spec is not None and exp.spool_spec.dir == tmp_path / "spool"
    kinds = [type(s).__name__ for s in exp.sinks]
    assert kinds == ["FileSink", "SyslogSink", "ElasticsearchSink", "SplunkHecSink", "WebhookSink"]
    file_sink, syslog_sink, es_sink = exp.sinks[0], exp.sinks[1], exp.sinks[2]
    assert isinstance(file_sink, FileSink) and file_sink.spec.path == tmp_path / "events.jsonl"
    assert isinstance(syslog_sink, SyslogSink) and syslog_sink.spec.ca == tmp_path / "ca.pem"
    assert isinstance(es_sink, ElasticsearchSink)
    assert es_sink.dead_letter == tmp_path / "spool" / "elasticsearch.dead-letter.jsonl"


def test_backoff_is_capped_and_jittered() -> None:
    """Backoff doubles per attempt, never exceeds the cap, and is at least half the delay."""
    assert 0.05 <= backoff_delay(0, 0.1, 30) <= 0.1
    assert 0.2 <= backoff_delay(2, 0.1, 30) <= 0.4
    assert backoff_delay(100, 0.1, 30) <= 30


def test_duplicate_sink_names_are_refused() -> None:
    """Two sinks with one name would share a cursor, so the exporter refuses them."""
    with pytest.raises(ValueError, match="unique"):
        Exporter([RecordingSink("x"), RecordingSink("x")], None, registry=CollectorRegistry())


async def test_aclose_drains_memory_queues() -> None:
    """Without a spool, aclose lets a live sink deliver what is still queued."""
    sink = RecordingSink("s")
    exp = exporter([sink], None)
    await exp.start()
    for i in range(300):
        exp.submit(event(i))
    await exp.aclose()
    assert sink.received == [f"e-{i}" for i in range(300)]


async def test_aclose_does_not_wait_for_a_dead_sink(tmp_path: Path) -> None:
    """A sink that makes no progress delays aclose only by close_stall, not close_timeout."""
    dead = RecordingSink("dead", fail_batches=10**9)
    exp = exporter([dead], spool_spec(tmp_path), close_timeout=30, close_stall=0.2)
    await exp.start()
    for i in range(10):
        exp.submit(event(i))
    await exp.flush()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await exp.aclose()
    assert loop.time() - started < 5


async def test_readers_follow_many_segment_rolls(tmp_path: Path) -> None:
    """With tiny segments rolled while sinks read, every sink still gets everything in order."""
    sinks = [RecordingSink(f"s{i}") for i in range(3)]
    spec = SpoolSpec(
        dir=tmp_path / "spool", segment_bytes="4KiB", batch_events=50, batch_interval=0.001
    )
    exp = exporter(sinks, spec)  # type: ignore[arg-type]
    await exp.start()
    for i in range(10_000):
        exp.submit(event(i))
        if i % 50 == 0:
            await asyncio.sleep(0)
    await exp.flush()
    assert await exp.wait_delivered(within=30)
    await exp.aclose()
    want = [f"e-{i}" for i in range(10_000)]
    for sink in sinks:
        assert sink.received == want
    assert len(list((tmp_path / "spool").glob("segment-*"))) <= 2  # acknowledged ones deleted


async def test_disk_write_error_is_counted_not_silent(tmp_path: Path) -> None:
    """A failing disk write loses that batch visibly (counter, gap marker); later ones flow."""
    sink = RecordingSink("s")
    exp = exporter([sink], spool_spec(tmp_path))
    await exp.start()
    assert exp.spool is not None
    real_sync = exp.spool.sync
    calls = {"n": 0}

    def failing_sync() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        real_sync()

    exp.spool.sync = failing_sync  # type: ignore[method-assign]
    for i in range(20):
        exp.submit(event(i))
    await exp.flush()
    for i in range(20, 30):
        exp.submit(event(i))
    await exp.flush()
    assert await exp.wait_delivered(within=10)
    await exp.aclose()
    assert sink.received[-10:] == [f"e-{i}" for i in range(20, 30)]
    assert not any(r in sink.received for r in ("e-0", "e-19"))
    assert len(sink.received) == 11  # the gap marker and the ten later events
    assert metric(exp, "siem_dropped_events_total", sink="*", reason="write_error") == 20


async def test_a_waiting_sink_is_cancellable_as_it_is_woken(tmp_path: Path) -> None:
    """Cancelling a sink's delivery task just as new records wake it ends the task.

    With asyncio.wait_for (Python 3.11) the cancellation was lost in that instant and
    aclose() waited for the task forever (seen about once in 130 RELP restart tests).
    """
    spool = Spool(tmp_path / "spool", ["s"]).open()
    source = _SpoolSource(spool, "s")
    task = asyncio.get_running_loop().create_task(source.next_batch(10))
    await asyncio.sleep(0.05)  # the spool is empty: the task now waits for a wake-up
    source.wake()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    source.reader.close()
    spool.close()


async def test_serialised_events_pass_through_and_lost_ones_are_marked(tmp_path: Path) -> None:
    """Events serialised elsewhere (a worker) are spooled byte for byte; ones lost before the
    exporter (a worker's full channel) are counted behind a gap marker."""
    sink = RecordingSink("s")
    exp = exporter([sink], spool_spec(tmp_path))
    await exp.start()
    payloads = [orjson.dumps(event(i)) for i in range(3)]
    for p in payloads:
        exp.submit_serialised(p)
    exp.note_lost(4)
    await exp.flush()
    assert await exp.wait_delivered(within=5)
    await exp.aclose()
    assert sink.payloads[:3] == payloads
    assert len(sink.received) == 4  # the three and one gap marker
    assert exp.spool is not None and exp.spool.dropped["pending_full"] == 4
