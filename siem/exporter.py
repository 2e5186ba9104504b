"""Exporter: takes ECS events from the gateway and delivers them to every sink.

Flow: `submit(event)` appends the dict to an in-memory batch (cheap, never blocks). A writer
task wakes every ``batch_interval`` or when ``batch_events`` are waiting, serialises the batch
and appends it to the spool in a dedicated I/O thread, fsyncing per batch (or on an interval).
Each sink has its own delivery task and cursor: it reads durable records after its cursor,
sends them (retrying with capped exponential backoff and jitter), then acknowledges them.
A slow or dead sink therefore only grows its own lag.

Without a spool, each sink gets a bounded in-memory queue instead (drops are counted and
reported by a gap-marker event); nothing survives a restart in that mode.

The caller must not mutate an event dict after submitting it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from siem.config import (
    DEFAULT_BACKOFF_INITIAL,
    DEFAULT_BACKOFF_MAX,
    DEFAULT_MEMORY_QUEUE_EVENTS,
    DEFAULT_SINK_BATCH_EVENTS,
    SinkSpec,
    SpoolSpec,
    resolve_paths,
    sink_names,
)
from siem.sinks import SendResult, Sink, build_sink
from siem.spool import Record, Spool, SpoolReader, gap_event
from siem.tasks import spawn

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 200_000
DEFAULT_BATCH_EVENTS = 1000
DEFAULT_BATCH_INTERVAL = 0.05
DEFAULT_LEDGER_INTERVAL = 0.2
DEFAULT_IDLE_POLL = 0.01
READ_WAIT = 1.0  # a reader re-checks the spool at least this often even without a wake-up
ALL_SINKS = "*"


# How long aclose() lets sinks deliver what they still hold before stopping them, and how
# long it waits for a sink that makes no progress at all (a dead receiver) before giving up.
DEFAULT_CLOSE_TIMEOUT = 5.0
DEFAULT_CLOSE_STALL = 0.5


def _new_record(fields: tuple[int, bytes]) -> Record:
    return tuple.__new__(Record, fields)


def _serialise_harder(event: Mapping[str, Any]) -> bytes | None:
    """An event plain serialisation refused, as JSON bytes; None when it cannot be serialised.

    Only events with non-string keys need OPT_NON_STR_KEYS, and it takes orjson's slower path
    (about 1.7x the time for a gateway event): it is the second try, not the first.
    """
    try:
        return orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return None


class ExporterMetrics:
    """Prometheus metrics of the exporter (one set per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.submitted = Counter(
            "siem_submitted_events", "Events submitted to the exporter", registry=registry
        )
        self.spool_bytes = Gauge(
            "siem_spool_bytes", "Bytes in spool segment files", registry=registry
        )
        self.lag = Gauge(
            "siem_sink_lag_events", "Events not yet delivered", ["sink"], registry=registry
        )
        self.delivered = Counter(
            "siem_sink_delivered_events", "Events delivered", ["sink"], registry=registry
        )
        self.retried = Counter(
            "siem_sink_retried_events", "Event deliveries retried", ["sink"], registry=registry
        )
        self.failed = Counter(
            "siem_sink_failed_events",
            "Events given up (dead-lettered or rejected)",
            ["sink"],
            registry=registry,
        )
        self.dropped = Counter(
            "siem_dropped_events",
            "Events dropped, by sink ('*' for the spool) and reason",
            ["sink", "reason"],
            registry=registry,
        )


_metrics: weakref.WeakKeyDictionary[CollectorRegistry, ExporterMetrics] = (
    weakref.WeakKeyDictionary()
)


def metrics_for(registry: CollectorRegistry) -> ExporterMetrics:
    """The exporter metrics registered in registry (created once per registry)."""
    if registry not in _metrics:
        _metrics[registry] = ExporterMetrics(registry)
    return _metrics[registry]


@dataclass(frozen=True)
class DeliveryOptions:
    """Per-sink delivery limits."""

    batch_events: int = DEFAULT_SINK_BATCH_EVENTS
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL
    backoff_max: float = DEFAULT_BACKOFF_MAX
    queue_events: int = DEFAULT_MEMORY_QUEUE_EVENTS


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Capped exponential backoff with jitter (half to full delay)."""
    delay = min(maximum, initial * float(2 ** min(attempt, 32)))
    return delay * (0.5 + random.random() / 2)


class _Source(Protocol):
    async def next_batch(self, n: int) -> list[Record]:
        """Wait for and return up to n records."""
        ...

    def ack(self, seq: int) -> None:
        """Mark records up to seq delivered."""
        ...

    def lag(self) -> int:
        """Records not delivered yet."""
        ...

    def wake(self) -> None:
        """New records may be available."""
        ...


class _SpoolSource:
    def __init__(self, spool: Spool, name: str) -> None:
        self.spool = spool
        self.name = name
        self.reader: SpoolReader = spool.reader(name)
        self._event = asyncio.Event()

    def wake(self) -> None:
        """New records may be available."""
        self._event.set()

    async def next_batch(self, n: int) -> list[Record]:
        """Read up to n durable records after the cursor, waiting until there are some."""
        while True:
            self._event.clear()
            records = await asyncio.to_thread(self.reader.read, n)
            if records:
                return records
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives as the event is set, and aclose() would wait for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READ_WAIT):
                    await self._event.wait()

    def ack(self, seq: int) -> None:
        """Move the sink's cursor."""
        self.spool.ack(self.name, seq)

    def lag(self) -> int:
        """Durable records after the cursor."""
        return self.spool.lag(self.name)


class _MemorySource:
    def __init__(self, name: str, limit: int, metrics: ExporterMetrics) -> None:
        self.name = name
        self.limit = limit
        self.metrics = metrics
        self.queue: collections.deque[Record] = collections.deque()
        self.seq = 0
        self.acked = 0  # highest sequence number a sink confirmed: lag counts batches in flight
        self.unreported = 0
        self._event = asyncio.Event()

    def wake(self) -> None:
        """New records may be available."""
        self._event.set()

    def push(self, payloads: Sequence[bytes]) -> None:
        """Queue payloads, dropping (and counting) the oldest beyond the limit."""
        first = self.seq + 1
        self.seq += len(payloads)
        # Records made in C (tuple.__new__), not through the named tuple's Python __new__.
        self.queue.extend(map(_new_record, zip(range(first, self.seq + 1), payloads, strict=True)))
        overflow = len(self.queue) - self.limit
        if overflow > 0:
            for _ in range(overflow):
                self.queue.popleft()
            self.unreported += overflow
            self.metrics.dropped.labels(self.name, "queue_full").inc(overflow)
            log.warning("sink %s: memory queue full, dropped %d events", self.name, overflow)

    async def next_batch(self, n: int) -> list[Record]:
        """Up to n queued records, a gap marker first if events were dropped."""
        while not self.queue and not self.unreported:
            self._event.clear()
            await self._event.wait()
        batch: list[Record] = []
        if self.unreported:
            gap = gap_event(self.unreported, "queue_full", 0, 0)
            batch.append(Record(0, orjson.dumps(gap)))
            self.unreported = 0
        queue = self.queue
        if len(queue) <= n - len(batch):
            batch.extend(queue)
            queue.clear()
        else:
            batch.extend(queue.popleft() for _ in range(n - len(batch)))
        return batch

    def ack(self, seq: int) -> None:
        self.acked = max(self.acked, seq)

    def lag(self) -> int:
        return self.seq - self.acked


@dataclass
class _SinkState:
    name: str
    sink: Sink
    options: DeliveryOptions
    source: _Source | None = None
    task: asyncio.Task[None] | None = None


class Exporter:
    """Spools submitted events and delivers them to every sink at its own pace."""

    def __init__(
        self,
        sinks: Sequence[Sink],
        spool: SpoolSpec | None = None,
        *,
        delivery: Mapping[str, DeliveryOptions] | None = None,
        registry: CollectorRegistry | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        close_stall: float = DEFAULT_CLOSE_STALL,
    ) -> None:
        delivery = delivery or {}
        self._sinks = [
            _SinkState(s.name, s, delivery.get(s.name, DeliveryOptions())) for s in sinks
        ]
        if len({s.name for s in self._sinks}) != len(self._sinks):
            raise ValueError("sink names must be unique")
        self.spool_spec = spool
        self.close_timeout = close_timeout
        self.close_stall = close_stall
        self.metrics = metrics_for(registry if registry is not None else REGISTRY)
        self.max_pending = max_pending
        self.batch_events = spool.batch_events if spool else DEFAULT_BATCH_EVENTS
        self.batch_interval = spool.batch_interval if spool else DEFAULT_BATCH_INTERVAL
        self.ledger_interval = spool.ledger_interval if spool else DEFAULT_LEDGER_INTERVAL
        self.spool: Spool | None = None
        self._pending: list[bytes] = []
        self._pending_lost = 0
        self._unserialisable = 0
        self._submitted = 0
        self._durable = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._force_sync = False
        self._wake: asyncio.Event | None = None
        self._io: ThreadPoolExecutor | None = None
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self._started = False

    @classmethod
    def from_config(
        cls,
        spool: SpoolSpec | None,
        sinks: Sequence[SinkSpec],
        base_dir: Path | str,
        *,
        registry: CollectorRegistry | None = None,
    ) -> Exporter:
        """Build sinks from their specs; relative paths resolve against base_dir."""
        base = Path(base_dir)
        spool = resolve_paths(spool, base) if spool is not None else None
        specs = [resolve_paths(s, base) for s in sinks]
        names = sink_names(specs)
        state_dir = spool.dir if spool is not None else base
        built = [build_sink(s, n, state_dir=state_dir) for s, n in zip(specs, names, strict=True)]
        delivery = {
            n: DeliveryOptions(s.batch_events, s.backoff_initial, s.backoff_max, s.queue_events)
            for s, n in zip(specs, names, strict=True)
        }
        return cls(built, spool, delivery=delivery, registry=registry)

    @property
    def sinks(self) -> list[Sink]:
        """The sinks, in configuration order."""
        return [s.sink for s in self._sinks]

    # -- the hot path ---------------------------------------------------------------------

    def submit(self, event: Mapping[str, Any]) -> None:
        """Queue one ECS event for export (cheap, never blocks, never raises on overload)."""
        if len(self._pending) >= self.max_pending:
            self._pending_lost += 1
            return
        # Serialised now (orjson, about a microsecond): the queue then holds bytes, which the
        # cyclic garbage collector does not track, instead of a batch interval's worth of
        # nested dicts that every young-generation collection would scan again.
        payload: bytes | None
        try:
            payload = orjson.dumps(event)
        except TypeError:
            payload = _serialise_harder(event)
        if payload is None:
            self._unserialisable += 1  # reported with the batch, behind a gap marker
        else:
            self._pending.append(payload)
        self._submitted += 1
        if len(self._pending) >= self.batch_events and self._wake is not None:
            self._wake.set()

    def submit_serialised(self, payload: bytes) -> None:
        """Queue one event already serialised as JSON by the same rules (another process's)."""
        if len(self._pending) >= self.max_pending:
            self._pending_lost += 1
            return
        self._pending.append(payload)
        self._submitted += 1
        if len(self._pending) >= self.batch_events and self._wake is not None:
            self._wake.set()

    def note_lost(self, count: int) -> None:
        """Count events lost before they reached the exporter (a gap marker reports them)."""
        self._pending_lost += count
        if self._wake is not None:
            self._wake.set()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (recovering it), start sinks, the writer and one task per sink."""
        if self._started:
            return
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="siem-spool")
        names = [s.name for s in self._sinks]
        if self.spool_spec is not None:
            spec = self.spool_spec
            spool = Spool(
                spec.dir,
                names,
                max_bytes=spec.max_bytes,
                segment_bytes=spec.segment_bytes,
                when_full=spec.when_full,
                on_drop=self._on_spool_drop,
            )
            self.spool = await loop.run_in_executor(self._io, spool.open)
        for st in self._sinks:
            if self.spool is not None:
                st.source = _SpoolSource(self.spool, st.name)
            else:
                st.source = _MemorySource(st.name, st.options.queue_events, self.metrics)
            await st.sink.start()
            self.metrics.lag.labels(st.name).set(st.source.lag())
        self._started = True
        self._writer = spawn(self._write_loop(), name="siem-writer")
        for st in self._sinks:
            st.task = spawn(self._deliver(st), name=f"siem-sink-{st.name}")

    async def flush(self) -> None:
        """Return once every event submitted so far is durable in the spool (or queued)."""
        if not self._started or self._wake is None:
            raise RuntimeError("exporter not started")
        target = self._submitted
        if self._durable >= target and not self._pending_lost:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._force_sync = True
        self._wake.set()
        await fut

    async def wait_delivered(self, within: float | None = None) -> bool:
        """Wait until every sink has delivered everything durable; False if `within` s pass."""
        deadline = None if within is None else time.monotonic() + within
        while True:
            if all(st.source is not None and st.source.lag() == 0 for st in self._sinks) and (
                self._durable >= self._submitted
            ):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(DEFAULT_IDLE_POLL)

    def lag(self) -> dict[str, int]:
        """Undelivered events per sink."""
        return {st.name: st.source.lag() if st.source else 0 for st in self._sinks}

    async def aclose(self) -> None:
        """Flush, stop delivery and sinks; undelivered events stay in the spool."""
        if not self._started or self._wake is None:
            return
        await self.flush()
        self._stopping = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        # Give sinks a bounded time to deliver what they hold: without a spool, anything still
        # queued in memory when the tasks are cancelled would be lost.
        # A sink that makes no progress for close_stall seconds is not waited for (its events
        # stay in the spool, or are reported lost without one).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.close_timeout
        last_lag, last_progress = sum(self.lag().values()), loop.time()
        while loop.time() < deadline and last_lag > 0:
            await asyncio.sleep(DEFAULT_IDLE_POLL)
            lag = sum(self.lag().values())
            if lag < last_lag:
                last_progress = loop.time()
            elif loop.time() - last_progress >= self.close_stall:
                break
            last_lag = lag
        for st in self._sinks:
            if st.task is not None:
                st.task.cancel()
        await asyncio.gather(*(st.task for st in self._sinks if st.task), return_exceptions=True)
        for st in self._sinks:
            try:
                await st.sink.aclose()
            except Exception:
                log.exception("sink %s: error while closing", st.name)
        if self.spool is not None and self._io is not None:
            for st in self._sinks:
                if isinstance(st.source, _SpoolSource):
                    st.source.reader.close()
            await loop.run_in_executor(self._io, self.spool.close)
        if self._io is not None:
            self._io.shutdown(wait=True)
        self._started = False

    # -- background tasks -----------------------------------------------------------------

    def _on_spool_drop(self, reason: str, count: int) -> None:
        self.metrics.dropped.labels(ALL_SINKS, reason).inc(count)

    def _spool_write(self, payloads: list[bytes], lost: int, bad: int, sync: bool) -> None:
        assert self.spool is not None
        before = self.spool.next_seq
        noted = False
        try:
            self.spool.append(payloads)
            # Lost events were submitted after the accepted ones: their gap marker follows them.
            self._note_lost(lost, bad)
            noted = True
            if sync:
                self.spool.sync()
        except Exception:
            # Events of this batch that never reached the spool are lost too; those that did
            # are counted by recover_write_error. Both get a gap marker; nothing is silent.
            appended = self.spool.next_seq - before
            try:
                self.spool.recover_write_error()
            finally:
                if len(payloads) > appended:
                    self.spool.note_lost("write_error", len(payloads) - appended)
                if not noted:
                    self._note_lost(lost, bad)
            raise

    def _note_lost(self, lost: int, bad: int) -> None:
        assert self.spool is not None
        if lost:
            self.spool.note_lost("pending_full", lost)
        if bad:
            self.spool.note_lost("unserialisable", bad)

    async def _write_once(self, loop: asyncio.AbstractEventLoop, sync: bool) -> None:
        assert self._io is not None
        batch, self._pending = self._pending, []
        lost, self._pending_lost = self._pending_lost, 0
        bad, self._unserialisable = self._unserialisable, 0
        target = self._submitted
        if batch:
            self.metrics.submitted.inc(len(batch))
        if lost:
            log.warning("exporter: %d events dropped, more than %d pending", lost, self.max_pending)
            if self.spool is None:
                self.metrics.dropped.labels(ALL_SINKS, "pending_full").inc(lost)
        if self.spool is not None:
            if batch or lost or bad or sync:
                await loop.run_in_executor(self._io, self._spool_write, batch, lost, bad, sync)
        elif batch or lost or bad:
            for st in self._sinks:
                assert isinstance(st.source, _MemorySource)
                st.source.unreported += lost + bad
                st.source.push(batch)
        if sync or self.spool is None:
            self._durable = target
            done = [w for w in self._waiters if w[0] <= target]
            self._waiters = [w for w in self._waiters if w[0] > target]
            for _, fut in done:
                if not fut.done():
                    fut.set_result(None)
            for st in self._sinks:
                if st.source is not None:
                    st.source.wake()

    async def _write_loop(self) -> None:
        assert self._wake is not None and self._io is not None
        loop = asyncio.get_running_loop()
        spec = self.spool_spec
        last_sync = last_ledger = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.batch_interval):  # not wait_for: see next_batch
                    await self._wake.wait()
            self._wake.clear()
            now = loop.time()
            interval_due = spec is not None and now - last_sync >= spec.fsync_interval
            sync = self._force_sync or spec is None or spec.fsync == "batch" or interval_due
            sync = sync and (bool(self._pending) or self._durable < self._submitted or interval_due)
            self._force_sync = False
            try:
                await self._write_once(loop, sync)
            except Exception:
                log.exception("exporter: writing to the spool failed; events counted as lost")
                await asyncio.sleep(self.batch_interval)
                continue
            if sync:
                last_sync = now
            if self.spool is not None and now - last_ledger >= self.ledger_interval:
                last_ledger = now
                await loop.run_in_executor(self._io, self._save_ledger)
                self.metrics.spool_bytes.set(self.spool.total_bytes)
            for st in self._sinks:
                if st.source is not None:
                    self.metrics.lag.labels(st.name).set(st.source.lag())
            if self._stopping and not self._pending:
                return

    def _save_ledger(self) -> None:
        assert self.spool is not None
        if self.spool.save_ledger():
            self.spool.collect()

    async def _deliver(self, st: _SinkState) -> None:
        assert st.source is not None
        while True:
            try:
                batch = await st.source.next_batch(st.options.batch_events)
            except Exception:
                log.exception("sink %s: reading the spool failed", st.name)
                await asyncio.sleep(READ_WAIT)
                continue
            await self._send(st, batch)
            st.source.ack(batch[-1].seq)
            self.metrics.lag.labels(st.name).set(st.source.lag())

    async def _send(self, st: _SinkState, batch: Sequence[Record]) -> None:
        pending: Sequence[Record] = batch
        attempt = 0
        while pending:
            try:
                result: SendResult = await st.sink.send(pending)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff_delay(attempt, st.options.backoff_initial, st.options.backoff_max)
                log.warning(
                    "sink %s: sending %d events failed (%s); retry in %.2fs",
                    st.name,
                    len(pending),
                    exc,
                    delay,
                )
                self.metrics.retried.labels(st.name).inc(len(pending))
                attempt += 1
                await asyncio.sleep(delay)
                continue
            done = len(pending) - len(result.retry) - result.failed
            self.metrics.delivered.labels(st.name).inc(max(0, done))
            if result.failed:
                self.metrics.failed.labels(st.name).inc(result.failed)
            if not result.retry:
                return
            self.metrics.retried.labels(st.name).inc(len(result.retry))
            pending = result.retry
            await asyncio.sleep(
                backoff_delay(attempt, st.options.backoff_initial, st.options.backoff_max)
            )
            attempt += 1
