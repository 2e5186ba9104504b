"""FeedManager: keeps every feed fresh and serves one matcher, swapped whole.

Rules:

- At start, each feed's last good body persisted in ``state_dir`` is parsed again, so the
  matcher is ready (``ready``) before the first fetch; a feed whose source changed since it
  was stored starts empty. Where ``state_dir`` holds nothing usable for a feed, ``seed_dir`` (a
  read-only copy of a state directory made elsewhere, e.g. a ConfigMap) is read the same way
  and what it holds is copied into ``state_dir``, so later updates build on it.
- Each enabled feed refreshes on its own period with jitter (``period * (1 +/- jitter)``);
  after a failure it retries sooner (``FAILURE_RETRY`` doubling, never later than the period).
  The first fetch happens at once unless the stored data is younger than the period.
- An update runs: fetch (conditional) -> body guard -> parse -> result guard (see
  ``feeds.acceptance``) -> persist -> rebuild the matcher -> swap the reference. A refused or failed
  update keeps the last good data and says why: a log line, the ``last_error`` status, metrics
  and the ``on_report`` callback.
- Parsing and matcher builds run in a worker thread so the event loop keeps serving.
- Metrics (``prometheus_client``, registry passed in or the global one), labelled by feed:
  ``feeds_entries``, ``feeds_last_success_timestamp_seconds``, ``feeds_age_seconds``,
  ``feeds_rejected_lines``, ``feeds_update_failures_total`` and
  ``feeds_updates_total{result}``; ``feeds_ready`` is 1 when every enabled feed has data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from feeds import fetch as fetching
from feeds.acceptance import classify_body, classify_result
from feeds.indicator import EMPTY_SET, IndicatorSet, IndicatorType, Provenance
from feeds.matcher import FeedRules, Matcher
from feeds.parsers import parse
from feeds.result import ParseResult
from feeds.spec import FeedSpec, TaxiiOptions, check_unique_names
from feeds.state import StoredFeed, load_feed, save_feed
from feeds.taxii import merge_bundle, poll_collection

log = logging.getLogger("feeds.refresh")

_EXPORT_TYPES = {
    "ip": frozenset({IndicatorType.IP, IndicatorType.CIDR}),
    "domain": frozenset({IndicatorType.DOMAIN}),
    "url": frozenset({IndicatorType.URL}),
}
DEFAULT_JITTER = 0.1
FAILURE_RETRY = 30.0
STARTUP_SPREAD = 5.0
FRESH_ENOUGH = 0.5  # a scheduled refresh is skipped when the data is younger than this x period


@dataclass(frozen=True, slots=True)
class UpdateReport:
    """The outcome of one feed update: one row of ``feeds update``."""

    feed: str
    status: str  # updated | unchanged | rejected | failed | disabled
    entries: int = 0
    added: int = 0
    removed: int = 0
    rejected: int = 0
    duration: float = 0.0
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when the feed now serves fresh data (updated or confirmed unchanged)."""
        return self.status in ("updated", "unchanged", "disabled")


class MissingFeedData(LookupError):
    """Feeds asked for have no data yet: an empty answer would be a lie, not "nothing listed"."""

    def __init__(self, feeds: Sequence[str]) -> None:
        self.feeds = tuple(feeds)
        super().__init__(f"no data yet for feed(s): {', '.join(self.feeds)}")


@dataclass(frozen=True, slots=True)
class FeedStatus:
    """What is known about one feed right now."""

    name: str
    enabled: bool
    entries: int
    last_success: float | None
    last_attempt: float | None
    failures: int
    rejected_lines: int
    last_error: str | None
    age: float | None
    has_data: bool = False  # fetched or stored data is served (an allowed empty list counts)


@dataclass(slots=True)
class _FeedState:
    spec: FeedSpec
    indicators: IndicatorSet = EMPTY_SET
    has_data: bool = False
    etag: str | None = None
    last_modified: str | None = None
    last_success: float | None = None
    last_attempt: float | None = None
    failures: int = 0
    rejected_lines: int = 0
    last_error: str | None = None


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.entries = Gauge(
            "feeds_entries", "Indicators served per feed", ["feed"], registry=registry
        )
        self.last_success = Gauge(
            "feeds_last_success_timestamp_seconds",
            "Unix time of the last successful update (fetched or confirmed unchanged)",
            ["feed"],
            registry=registry,
        )
        self.age = Gauge(
            "feeds_age_seconds",
            "Seconds since the last successful update (-1 when never)",
            ["feed"],
            registry=registry,
        )
        self.rejected_lines = Gauge(
            "feeds_rejected_lines",
            "Malformed rows in the last parsed body",
            ["feed"],
            registry=registry,
        )
        self.failures = Counter(
            "feeds_update_failures",
            "Updates that failed or were refused by the acceptance checks",
            ["feed"],
            registry=registry,
        )
        self.updates = Counter(
            "feeds_updates", "Update attempts by result", ["feed", "result"], registry=registry
        )
        self.ready = Gauge("feeds_ready", "1 when every enabled feed has data", registry=registry)


class FeedManager:
    """Fetches, guards, persists and serves the indicators of a set of feeds."""

    def __init__(
        self,
        specs: Sequence[FeedSpec],
        base_dir: Path,
        state_dir: Path,
        *,
        registry: CollectorRegistry | None = None,
        session: aiohttp.ClientSession | None = None,
        on_report: Callable[[UpdateReport], None] | None = None,
        seed_dir: Path | None = None,
        jitter: float = DEFAULT_JITTER,
        backoff: float = fetching.DEFAULT_BACKOFF,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        check_unique_names(specs)
        self.base_dir = Path(base_dir)
        self.state_dir = Path(state_dir)
        self.seed_dir = None if seed_dir is None else Path(seed_dir)
        self._feeds = {spec.name: _FeedState(spec) for spec in specs}
        self._matcher = Matcher.empty()
        self._served: frozenset[str] = frozenset()
        self._default_provenance: dict[str, Provenance] = {}
        self._session = session
        self._own_session = False
        self._on_report = on_report
        self._jitter = jitter
        self._backoff = backoff
        self._clock = clock
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks = {name: asyncio.Lock() for name in self._feeds}
        self._build_lock = asyncio.Lock()
        self._generation = 0
        self._built_generation = 0
        self._metrics = _Metrics(registry if registry is not None else REGISTRY)
        self._metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        for name in self._feeds:
            self._metrics.age.labels(feed=name).set_function(self._age_function(name))

    def _age_function(self, name: str) -> Callable[[], float]:
        def age() -> float:
            last = self._feeds[name].last_success
            return -1.0 if last is None else max(0.0, self._clock() - last)

        return age

    # -- what the gateway reads ----------------------------------------------------------------

    @property
    def matcher(self) -> Matcher:
        """The current matcher (replaced whole on every accepted update)."""
        return self._matcher

    @property
    def ready(self) -> bool:
        """True when every enabled feed has data, fresh or last good."""
        served = self._served
        return all(name in served for name, f in self._feeds.items() if f.spec.enabled)

    def status(self) -> dict[str, FeedStatus]:
        """Per-feed status, keyed by feed name."""
        now = self._clock()
        return {
            name: FeedStatus(
                name=name,
                enabled=f.spec.enabled,
                entries=len(f.indicators),
                last_success=f.last_success,
                last_attempt=f.last_attempt,
                failures=f.failures,
                rejected_lines=f.rejected_lines,
                last_error=f.last_error,
                age=None if f.last_success is None else max(0.0, now - f.last_success),
                has_data=f.has_data,
            )
            for name, f in self._feeds.items()
        }

    # -- lifecycle ------------------------------------------------------------------------------

    def load_state(self) -> None:
        """Load every feed's persisted last good data and build the matcher (synchronous)."""
        for f in self._feeds.values():
            if not f.spec.enabled or self._load_stored(f, self.state_dir) is not None:
                continue
            if self.seed_dir is not None and (seed := self._load_stored(f, self.seed_dir)):
                self._copy_seed(f.spec.name, seed)
        self._matcher, self._served = self._build()

    def _load_stored(self, f: _FeedState, directory: Path) -> StoredFeed | None:
        """Serve the feed's data stored in ``directory`` and return it; None when none is usable."""
        stored = load_feed(directory, f.spec.name)
        if stored is None:
            return None
        if stored.source != f.spec.url:
            log.info("feed %s: data in %s is from another source, ignored", f.spec.name, directory)
            return None
        try:
            result = self._parse(f.spec, stored.body)
        except (ValueError, fetching.FetchError) as e:
            log.warning("feed %s: data in %s no longer parses: %s", f.spec.name, directory, e)
            return None
        f.indicators = result.indicators
        f.has_data = True
        f.etag, f.last_modified = stored.etag, stored.last_modified
        f.last_success = stored.last_success
        f.rejected_lines = result.rejected
        self._publish(f)
        return stored

    def _copy_seed(self, name: str, stored: StoredFeed) -> None:
        # Later updates (a TAXII merge, a conditional request) read state_dir: the seed joins it.
        log.info("feed %s: serving the seed from %s", name, self.seed_dir)
        try:
            save_feed(self.state_dir, name, stored)
        except OSError as e:
            log.error("feed %s: cannot copy the seed into %s: %s", name, self.state_dir, e)

    async def start(self) -> None:
        """Load the last good data, then refresh each enabled feed on its own schedule."""
        await asyncio.to_thread(self.load_state)
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        for f in self._feeds.values():
            if f.spec.enabled:
                self._spawn(self._loop(f), name=f"feed-refresh-{f.spec.name}")

    async def stop(self) -> None:
        """Stop refreshing and release the HTTP session."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
            self._own_session = False

    async def add(self, spec: FeedSpec) -> None:
        """Serve one more feed, or a changed definition of one (defined while running).

        Its stored data, if any, is served at once; once started, it refreshes on its own
        schedule (``update_now`` fetches it sooner).
        """
        current = self._feeds.get(spec.name)
        if current is not None:
            if current.spec == spec:
                return
            await self.remove(spec.name)
        f = _FeedState(spec)
        self._feeds[spec.name] = f
        self._locks[spec.name] = asyncio.Lock()
        self._metrics.age.labels(feed=spec.name).set_function(self._age_function(spec.name))
        if spec.enabled:
            await asyncio.to_thread(self._load_stored, f, self.state_dir)
            await self._rebuild()
            if self._session is not None:  # started: else start() begins its refreshes
                self._spawn(self._loop(f), name=f"feed-refresh-{spec.name}")

    async def remove(self, name: str) -> None:
        """Stop refreshing and serving a feed; its stored data stays on disk."""
        if self._feeds.pop(name, None) is None:
            return
        mine = [t for t in self._tasks if t.get_name() == f"feed-refresh-{name}"]
        for task in mine:
            task.cancel()
        await asyncio.gather(*mine, return_exceptions=True)
        self._locks.pop(name, None)
        self._default_provenance.pop(name, None)
        for metric in (self._metrics.entries, self._metrics.age, self._metrics.rejected_lines):
            with contextlib.suppress(KeyError):
                metric.remove(name)
        with contextlib.suppress(KeyError):
            self._metrics.last_success.remove(name)
        await self._rebuild()

    def _spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s crashed", task.get_name(), exc_info=task.exception())

    async def _loop(self, f: _FeedState) -> None:
        period = f.spec.period
        delay = self._rng.uniform(0, min(STARTUP_SPREAD, period))
        if f.has_data and f.last_success is not None:
            delay = max(delay, period - (self._clock() - f.last_success))
        while True:
            await asyncio.sleep(delay)
            age = None if f.last_success is None else self._clock() - f.last_success
            if age is not None and f.failures == 0 and age < period * FRESH_ENOUGH:
                # Someone else (update_now) refreshed it meanwhile: no second download.
                delay = period - age
                continue
            report = await self._update(f)
            if report.ok:
                delay = period * (1.0 + self._rng.uniform(-self._jitter, self._jitter))
            else:
                retry = FAILURE_RETRY * 2 ** min(f.failures - 1, 10)
                delay = min(period, retry) * (1.0 + self._rng.uniform(-self._jitter, self._jitter))

    # -- updates --------------------------------------------------------------------------------

    async def update_now(self, names: Iterable[str] | None = None) -> list[UpdateReport]:
        """Update the named feeds (all enabled ones by default) now; one report per feed."""
        wanted = list(self._feeds) if names is None else list(names)
        unknown = [n for n in wanted if n not in self._feeds]
        if unknown:
            raise ValueError(f"unknown feed(s): {', '.join(unknown)}")
        session_made = False
        if self._session is None:
            self._session = aiohttp.ClientSession()
            session_made = True
        try:
            return list(await asyncio.gather(*(self._update(self._feeds[n]) for n in wanted)))
        finally:
            if session_made and self._session is not None:
                await self._session.close()
                self._session = None

    async def _update(self, f: _FeedState) -> UpdateReport:
        async with self._locks[f.spec.name]:
            try:
                report = await self._update_locked(f)
            except Exception as e:
                # A bug must not stop this feed's refreshes or other feeds' updates: it is
                # logged with its traceback and reported as a failure, the last good data kept.
                log.exception("feed %s: update crashed", f.spec.name)
                report = self._failed(f, "failed", f"internal error: {e!r}", time.monotonic())
        self._metrics.updates.labels(feed=f.spec.name, result=report.status).inc()
        if report.status in ("rejected", "failed"):
            self._metrics.failures.labels(feed=f.spec.name).inc()
            log.warning("feed %s: update %s: %s", f.spec.name, report.status, report.reason)
        else:
            log.info(
                "feed %s: %s, %d entries (+%d -%d), %d rejected lines",
                f.spec.name,
                report.status,
                report.entries,
                report.added,
                report.removed,
                report.rejected,
            )
        if self._on_report is not None:
            self._on_report(report)
        return report

    async def _update_locked(self, f: _FeedState) -> UpdateReport:
        spec = f.spec
        start = time.monotonic()
        if not spec.enabled:
            return UpdateReport(spec.name, "disabled", reason="feed is disabled")
        f.last_attempt = self._clock()
        try:
            fetched = await self._fetch(f)
        except fetching.FetchError as e:
            return self._failed(f, "failed", e.reason, start)
        if fetched.body is None:
            f.last_success = self._clock()
            f.failures = 0
            f.last_error = None
            self._publish(f)
            n = len(f.indicators)
            return UpdateReport(spec.name, "unchanged", n, duration=time.monotonic() - start)
        body = fetched.body
        reason = classify_body(
            body, content_type=fetched.content_type, allow_empty=spec.allow_empty
        )
        if reason is not None:
            return self._failed(f, "rejected", reason, start)
        try:
            result = await asyncio.to_thread(self._parse, spec, body)
        except ValueError as e:
            return self._failed(f, "rejected", f"unparseable: {e}", start)
        f.rejected_lines = result.rejected
        previous = len(f.indicators) if f.has_data else None
        reason = classify_result(
            result,
            previous,
            max_shrink=spec.max_shrink,
            max_rejected_ratio=spec.max_rejected_ratio,
            allow_empty=spec.allow_empty,
        )
        if reason is not None:
            return self._failed(f, "rejected", reason, start, rejected=result.rejected)
        new_set = result.indicators
        old_keys = f.indicators.keys()
        new_keys = new_set.keys()
        added, removed = len(new_keys - old_keys), len(old_keys - new_keys)
        del old_keys, new_keys, result  # large transient sets: free them before the rebuild
        now = self._clock()
        stored = StoredFeed(body, spec.url, fetched.etag, fetched.last_modified, now)
        try:
            await asyncio.to_thread(save_feed, self.state_dir, spec.name, stored)
        except OSError as e:
            # Serving the new data matters more than persisting it; say so and carry on.
            log.error("feed %s: cannot persist last good data: %s", spec.name, e)
        f.indicators = new_set
        f.has_data = True
        f.etag, f.last_modified = fetched.etag, fetched.last_modified
        f.last_success = now
        f.failures = 0
        f.last_error = None
        self._publish(f)
        await self._rebuild()
        return UpdateReport(
            spec.name,
            "updated",
            len(new_set),
            added=added,
            removed=removed,
            rejected=f.rejected_lines,
            duration=time.monotonic() - start,
        )

    async def _fetch(self, f: _FeedState) -> fetching.FetchResult:
        spec = f.spec
        if spec.taxii is not None:
            return await self._fetch_taxii(f, spec.taxii)
        return await fetching.fetch(
            spec.url,
            base_dir=self.base_dir,
            session=self._session,
            request_timeout=spec.timeout,
            max_bytes=spec.max_bytes,
            etag=f.etag if f.has_data else None,
            last_modified=f.last_modified if f.has_data else None,
            retries=spec.retries,
            backoff=self._backoff,
            rng=self._rng,
        )

    async def _fetch_taxii(self, f: _FeedState, options: TaxiiOptions) -> fetching.FetchResult:
        # The stored body is the merged bundle and last_modified the server-side cursor.
        assert self._session is not None
        spec = f.spec
        poll = await poll_collection(
            self._session,
            spec.url,
            added_after=f.last_modified if f.has_data else None,
            page_size=options.page_size,
            max_pages=options.max_pages,
            max_bytes=spec.max_bytes,
            request_timeout=spec.timeout,
        )
        if f.has_data and not poll.objects:
            return fetching.FetchResult(None, last_modified=poll.cursor, status=304)
        stored = (
            await asyncio.to_thread(load_feed, self.state_dir, spec.name) if f.has_data else None
        )
        body = merge_bundle(stored.body if stored else None, poll.objects)
        return fetching.FetchResult(body, None, poll.cursor, "application/json")

    def _failed(
        self, f: _FeedState, status: str, reason: str, start: float, rejected: int = 0
    ) -> UpdateReport:
        f.failures += 1
        f.last_error = reason
        return UpdateReport(
            f.spec.name,
            status,
            len(f.indicators),
            rejected=rejected,
            duration=time.monotonic() - start,
            reason=reason,
        )

    def _parse(self, spec: FeedSpec, body: bytes) -> ParseResult:
        if body.startswith(b"\x1f\x8b"):
            body = fetching.gunzip_limited(body, spec.max_bytes)
        provenance = self._provenance(spec)
        # Rows with metadata of their own derive from this provenance, keeping its defaults.
        return parse(
            spec.format,
            body,
            options=spec.options,
            provenance=provenance,
            blocklist=spec.kind == "blocklist" and spec.drops_special_ranges,
            now=datetime.fromtimestamp(self._clock(), UTC),
        )

    def _provenance(self, spec: FeedSpec) -> Provenance:
        """The feed's default provenance: one shared object per feed definition."""
        prov = self._default_provenance.get(spec.name)
        if prov is None:
            prov = Provenance(
                feed=spec.name,
                confidence=spec.confidence,
                severity=spec.severity,
                tags=spec.labels,
            )
            self._default_provenance[spec.name] = prov
        return prov

    def blocklist_values(self, kind: str, feeds: Iterable[str] | None = None) -> list[str]:
        """Every value the blocklists serve of a kind (``ip``: addresses and networks,
        ``domain``, ``url``), sorted, from the named feeds or all; for firewall exports.

        Raises ``MissingFeedData`` when an enabled blocklist among them has no data yet: a
        firewall loading the answer would otherwise drop every entry it had.
        """
        types = _EXPORT_TYPES.get(kind)
        if types is None:
            raise ValueError(f"unknown kind {kind!r}: use ip, domain or url")
        wanted = None if feeds is None else set(feeds)
        if wanted is not None and (unknown := wanted - set(self._feeds)):
            raise ValueError(f"unknown feed(s): {', '.join(sorted(unknown))}")
        chosen = [
            f
            for name, f in self._feeds.items()
            if f.spec.kind == "blocklist" and f.spec.enabled and (wanted is None or name in wanted)
        ]
        if missing := [f.spec.name for f in chosen if not f.has_data]:
            raise MissingFeedData(missing)
        values: set[str] = set()
        for f in chosen:
            values.update(v for t, v, _ in f.indicators.triples() if t in types)
        return sorted(values)

    def _publish(self, f: _FeedState) -> None:
        name = f.spec.name
        self._metrics.entries.labels(feed=name).set(len(f.indicators))
        self._metrics.rejected_lines.labels(feed=name).set(f.rejected_lines)
        if f.last_success is not None:
            self._metrics.last_success.labels(feed=name).set(f.last_success)

    def _build(self) -> tuple[Matcher, frozenset[str]]:
        feeds = [f for f in self._feeds.values() if f.spec.enabled and f.has_data]
        matcher = Matcher.build_raw(
            (
                FeedRules(f.spec.name, f.spec.kind == "allowlist", f.spec.subdomains),
                f.indicators.triples(),
            )
            for f in feeds
        )
        return matcher, frozenset(f.spec.name for f in feeds)

    async def _rebuild(self) -> None:
        self._generation += 1
        async with self._build_lock:
            # Updates that finished while another build ran are served by one build, not one
            # each: a build reads the data of every feed as it is when the build starts.
            if self._built_generation == self._generation:
                return
            generation = self._generation
            # The matcher and the set of feeds it serves change together: ready never lies.
            self._matcher, self._served = await asyncio.to_thread(self._build)
            self._built_generation = generation
