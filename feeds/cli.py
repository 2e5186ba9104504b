"""Plain functions behind ``egressgw feeds update | check | lookup``.

Each takes parsed arguments and an output stream and returns an exit code (0 success, 1 the
answer is "no" or something failed, 2 a usage error, 4 a feed has no data to answer with);
none calls ``sys.exit`` or parses argv.

Tools that answer from feed data (``lookup``, the gateway's ``explain`` and firewall exports)
get it from ``current_data``, which gives them what the running gateway serves: each enabled
feed's stored last good data, refreshed first when there is none, when it is older than the
feed's period (the gateway would have refreshed it) or when the feed is a local file (read again
if it changed). A refresh goes through the same guard as the gateway's and persists what it
accepts. A feed that still has no data is reported, never served as an empty list.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import aiohttp
from prometheus_client import CollectorRegistry

from feeds.acceptance import classify_body, classify_result
from feeds.fetch import FetchError, gunzip_limited
from feeds.matcher import Matcher
from feeds.options import ParseOptions
from feeds.parsers import parse
from feeds.refresh import FeedManager, UpdateReport
from feeds.spec import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_REJECTED_RATIO,
    DEFAULT_MAX_SHRINK,
    FeedSpec,
)

EXIT_OK = 0
EXIT_NO = 1
EXIT_USAGE = 2
EXIT_NO_DATA = 4


def _manager(specs: Sequence[FeedSpec], base_dir: Path, state_dir: Path) -> FeedManager:
    # A private registry: the CLI may run inside a process that already has a manager.
    return FeedManager(specs, base_dir, state_dir, registry=CollectorRegistry())


def load_matcher(specs: Sequence[FeedSpec], base_dir: Path, state_dir: Path) -> Matcher:
    """A matcher from the persisted last good data, without fetching anything."""
    manager = _manager(specs, base_dir, state_dir)
    manager.load_state()
    return manager.matcher


@dataclass(frozen=True, slots=True)
class FeedData:
    """The data a tool answers with for one enabled feed: how much, how old, from where."""

    feed: str
    has_data: bool
    entries: int
    age: float | None  # seconds since the data was last fetched or confirmed; None if never
    origin: str  # "fetched now", "stored, source unchanged", "stored", or "none"
    stale: bool = False  # older than the feed's period and not refreshed
    error: str | None = None  # why a refresh failed or was refused, when one did

    def describe(self) -> str:
        """One line: ``name: N entries, fetched now (age 0s)``, or why there is no data."""
        if not self.has_data:
            return f"{self.feed}: no data" + (f": {self.error}" if self.error else "")
        age = "age unknown" if self.age is None else f"age {format_age(self.age)}"
        text = f"{self.feed}: {self.entries} entries, {self.origin} ({age})"
        if self.stale:
            text += ", older than its period"
        if self.error:
            text += f"; refresh failed: {self.error}"
        return text


def format_age(seconds: float) -> str:
    """A short age: ``42s``, ``3m``, ``2h5m``, ``3d4h``."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _needs_refresh(spec: FeedSpec, has_data: bool, age: float | None) -> bool:
    # Local files are cheap to check (unchanged when their mtime and size are) and are what an
    # operator edits right before asking; remote data is fetched when the gateway would have.
    return not has_data or age is None or age >= spec.period or not spec.is_remote


async def current_data(
    specs: Sequence[FeedSpec],
    base_dir: Path,
    state_dir: Path,
    *,
    fetch: bool = True,
    clock: Callable[[], float] = time.time,
) -> tuple[FeedManager, list[FeedData]]:
    """A manager serving what the gateway would, and what each enabled feed's data is.

    With ``fetch`` false nothing is fetched: stored data only, stale data marked as such.
    """
    manager = FeedManager(specs, base_dir, state_dir, registry=CollectorRegistry(), clock=clock)
    await asyncio.to_thread(manager.load_state)
    enabled = [s for s in specs if s.enabled]
    before = manager.status()
    due = [
        s.name for s in enabled if _needs_refresh(s, before[s.name].has_data, before[s.name].age)
    ]
    reports: dict[str, UpdateReport] = {}
    if fetch and due:
        reports = {r.feed: r for r in await manager.update_now(due)}
    after = manager.status()
    data = []
    for spec in enabled:
        st = after[spec.name]
        report = reports.get(spec.name)
        if report is not None and report.status == "updated":
            origin = "fetched now"
        elif report is not None and report.status == "unchanged":
            origin = "stored, source unchanged"
        else:
            origin = "stored" if st.has_data else "none"
        error = report.reason if report is not None and not report.ok else None
        if not fetch and not st.has_data:
            error = "nothing stored, and fetching is off"
        data.append(
            FeedData(
                feed=spec.name,
                has_data=st.has_data,
                entries=st.entries,
                age=st.age,
                origin=origin,
                stale=st.has_data and (st.age is None or st.age >= spec.period),
                error=error,
            )
        )
    return manager, data


def format_report(report: UpdateReport) -> str:
    """One aligned row of ``feeds update`` output."""
    row = (
        f"{report.feed:<24} {report.entries:>9} {report.added:>8} {report.removed:>8} "
        f"{report.rejected:>8} {report.duration:>8.2f}s  {report.status}"
    )
    return f"{row}: {report.reason}" if report.reason else row


REPORT_HEADER = (
    f"{'FEED':<24} {'ENTRIES':>9} {'ADDED':>8} {'REMOVED':>8} {'REJECTED':>8} {'DURATION':>9}  "
    "STATUS"
)


async def update_async(
    specs: Sequence[FeedSpec],
    base_dir: Path,
    state_dir: Path,
    names: Sequence[str],
    out: TextIO,
) -> int:
    """Fetch the named feeds (all if none named) now; print one row per feed."""
    known = {s.name for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        out.write(f"unknown feed(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}\n")
        return EXIT_USAGE
    wanted = list(names) or [s.name for s in specs if s.enabled]
    out.write(REPORT_HEADER + "\n")
    out.flush()
    async with aiohttp.ClientSession() as session:
        manager = FeedManager(
            specs, base_dir, state_dir, registry=CollectorRegistry(), session=session
        )
        await asyncio.to_thread(manager.load_state)
        ok = True
        # Rows appear as feeds finish, so a long download shows the others' progress.
        for next_done in asyncio.as_completed([manager.update_now([n]) for n in wanted]):
            for report in await next_done:
                ok = ok and report.ok
                out.write(format_report(report) + "\n")
                out.flush()
    return EXIT_OK if ok else EXIT_NO


def update(
    specs: Sequence[FeedSpec],
    base_dir: Path,
    state_dir: Path,
    names: Sequence[str],
    out: TextIO,
) -> int:
    """Synchronous ``update_async`` for a CLI without a running event loop."""
    return asyncio.run(update_async(specs, base_dir, state_dir, names, out))


def check_file(
    path: Path,
    fmt: str,
    options: ParseOptions | None,
    out: TextIO,
    *,
    allow_empty: bool = False,
) -> int:
    """Parse a local feed file, report what was found and rejected, and the acceptance verdict."""
    try:
        body = Path(path).read_bytes()
    except OSError as e:
        out.write(f"cannot read {path}: {e.strerror or e}\n")
        return EXIT_USAGE
    try:
        if body.startswith(b"\x1f\x8b"):
            body = gunzip_limited(body, DEFAULT_MAX_BYTES)
        problem = classify_body(body, allow_empty=allow_empty)
        if problem is not None:
            out.write(f"{path}: {problem}\n")
            return EXIT_NO
        result = parse(fmt, body, options=options or ParseOptions(), now=datetime.now(UTC))
    except (ValueError, FetchError) as e:
        out.write(f"{path}: cannot parse as {fmt}: {e}\n")
        return EXIT_NO
    kinds = Counter(i.type.value for i in result.indicators)
    out.write(f"{path}: format {fmt}, {result.records} rows\n")
    out.write(
        f"  indicators: {len(result.indicators)}"
        + "".join(f", {k} {n}" for k, n in sorted(kinds.items()))
        + "\n"
    )
    out.write(f"  rejected: {result.rejected}, ignored (out of scope): {result.ignored}\n")
    for reason, n in sorted(result.dropped.items()):
        out.write(f"  dropped ({reason}): {n}\n")
    for note, n in sorted(result.notes.items()):
        out.write(f"  note ({note}): {n}\n")
    for sample in result.samples:
        out.write(f"  line {sample.line}: {sample.reason}: {sample.text!r}\n")
    if result.expected is not None:
        verdict = "TRUNCATED" if result.truncated else "ok"
        out.write(f"  trailer: {result.expected} entries announced, {verdict}\n")
    # The verdict the gateway's guard gives a first update (no previous data to shrink from).
    refused = classify_result(
        result,
        None,
        max_shrink=DEFAULT_MAX_SHRINK,
        max_rejected_ratio=DEFAULT_MAX_REJECTED_RATIO,
        allow_empty=allow_empty,
    )
    if refused is not None:
        out.write(f"  verdict: the gateway would refuse this update: {refused}\n")
        return EXIT_NO
    out.write("  verdict: the gateway would accept it\n")
    return EXIT_OK


def lookup(value: str, matcher: Matcher, out: TextIO) -> int:
    """Say which feeds list a domain, IP or URL and why; exit 0 when listed, 1 when not."""
    matches = matcher.match(value.strip())
    if not matches:
        allowed = (
            matcher.url_allowlisted(value)
            if "://" in value
            else matcher.ip_allowlisted(value) or matcher.domain_allowlisted(value)
        )
        out.write(f"{value}: not listed" + (" (covered by an allowlist)" if allowed else "") + "\n")
        return EXIT_NO
    out.write(f"{value}: listed by {len({m.feed for m in matches})} feed(s)\n")
    for m in matches:
        extra = []
        if m.confidence is not None:
            extra.append(f"confidence {m.confidence}")
        if m.severity:
            extra.append(f"severity {m.severity}")
        if m.first_seen is not None:
            extra.append(f"first seen {m.first_seen.isoformat()}")
        if m.reference:
            extra.append(f"ref {m.reference}")
        detail = f" ({', '.join(extra)})" if extra else ""
        out.write(f"  {m.feed}: {m.ecs_type} {m.indicator} [{m.why}]{detail}\n")
    return EXIT_OK
