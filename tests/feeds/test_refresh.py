"""Tests of feeds.refresh: the FeedManager against local servers and files."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from feeds.refresh import FeedManager, MissingFeedData, UpdateReport
from feeds.spec import FeedSpec
from feeds.state import StoredFeed, load_feed, save_feed

from .conftest import FeedServer

IPS = b"# test list\n" + b"".join(f"5.6.{i}.1\n".encode() for i in range(20))


def _spec(name: str, url: str, **extra: object) -> FeedSpec:
    return FeedSpec.model_validate({"name": name, "url": url, "format": "lines", **extra})


def _manager(
    specs: list[FeedSpec], tmp_path: Path, registry: CollectorRegistry | None = None, **kw: object
) -> FeedManager:
    return FeedManager(
        specs,
        tmp_path,
        tmp_path / "state",
        registry=registry or CollectorRegistry(),
        backoff=0.01,
        rng=random.Random(1),
        **kw,  # type: ignore[arg-type]
    )


async def test_update_serves_and_persists(feed_server: FeedServer, tmp_path: Path) -> None:
    """An update swaps in a matcher that matches; a new manager loads it before any fetch."""
    feed_server.serve("/ips", IPS, etag='"1"')
    (tmp_path / "local.txt").write_text("evil.example\n")
    specs = [_spec("remote", feed_server.url("/ips")), _spec("local", "local.txt")]
    manager = _manager(specs, tmp_path)
    assert not manager.ready and manager.matcher.match_ip("5.6.1.1") == ()
    reports = await manager.update_now()
    assert [(r.feed, r.status, r.entries, r.added) for r in reports] == [
        ("remote", "updated", 20, 20),
        ("local", "updated", 1, 1),
    ]
    assert manager.ready
    assert manager.matcher.match_ip("5.6.1.1")[0].feed == "remote"
    assert manager.matcher.match_domain("a.evil.example")[0].why == "parent domain"

    restarted = _manager(specs, tmp_path)
    restarted.load_state()
    assert restarted.ready and restarted.matcher.match_ip("5.6.1.1")
    again = await restarted.update_now(["remote"])
    assert again[0].status == "unchanged"
    assert feed_server.requests[-1].headers["If-None-Match"] == '"1"'


async def test_guard_keeps_last_good(feed_server: FeedServer, tmp_path: Path) -> None:
    """HTML, garbage, truncation, a big shrink and a 500 are refused; the old data stays."""
    feed_server.serve("/ips", IPS)
    registry = CollectorRegistry()
    seen: list[UpdateReport] = []
    manager = _manager(
        [_spec("f", feed_server.url("/ips"))], tmp_path, registry, on_report=seen.append
    )
    assert (await manager.update_now())[0].status == "updated"
    bad_bodies = {
        "HTML page": b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
        "unparseable": bytes(range(256)),
        "truncated": b"5.6.0.1\n# END 20 entries\n",
        "shrank from 20 to 5": b"".join(f"5.6.{i}.1\n".encode() for i in range(5)),
        "mostly unparseable": b"".join(f"garbage line {i}\n".encode() for i in range(30)),
        "no indicators": b"# nothing here\n",
    }
    for reason, body in bad_bodies.items():
        feed_server.serve("/ips", body)
        report = (await manager.update_now())[0]
        assert report.status == "rejected" and reason in (report.reason or ""), report
        assert manager.matcher.match_ip("5.6.19.1"), reason
        assert manager.status()["f"].last_error == report.reason

    async def fail(request: object) -> object:
        from aiohttp import web

        return web.Response(status=500)

    feed_server.handlers["/ips"] = fail  # type: ignore[assignment]
    report = (await manager.update_now())[0]
    assert report.status == "failed" and "HTTP 500" in (report.reason or "")
    assert manager.matcher.match_ip("5.6.19.1") and manager.ready
    status = manager.status()["f"]
    assert status.entries == 20 and status.failures == 7
    assert registry.get_sample_value("feeds_update_failures_total", {"feed": "f"}) == 7
    assert (
        registry.get_sample_value("feeds_updates_total", {"feed": "f", "result": "rejected"}) == 6
    )
    assert registry.get_sample_value("feeds_entries", {"feed": "f"}) == 20
    assert [r.status for r in seen] == ["updated"] + ["rejected"] * 6 + ["failed"]


async def test_shrink_limit_is_configurable(feed_server: FeedServer, tmp_path: Path) -> None:
    """max_shrink: 1.0 lets a list shrink to a single entry."""
    feed_server.serve("/ips", IPS)
    manager = _manager([_spec("f", feed_server.url("/ips"), max_shrink=1.0)], tmp_path)
    await manager.update_now()
    feed_server.serve("/ips", b"5.6.0.1\n")
    report = (await manager.update_now())[0]
    assert (report.status, report.entries, report.removed) == ("updated", 1, 19)
    assert manager.matcher.match_ip("5.6.19.1") == ()


async def test_allowlist_feed_suppresses(tmp_path: Path) -> None:
    """An allowlist feed suppresses matches of blocklist feeds (8.8.8.8 in Feodo's list)."""
    (tmp_path / "block.txt").write_text("8.8.8.8\n9.9.9.9\n")
    (tmp_path / "allow.txt").write_text("8.8.8.8\n")
    specs = [_spec("block", "block.txt"), _spec("allow", "allow.txt", kind="allowlist")]
    manager = _manager(specs, tmp_path)
    await manager.update_now()
    assert manager.matcher.match_ip("8.8.8.8") == ()
    assert manager.matcher.match_ip("9.9.9.9")


async def test_ready_ignores_disabled_feeds_and_metrics(tmp_path: Path) -> None:
    """ready waits for every enabled feed only; age and ready are exported."""
    (tmp_path / "a.txt").write_text("1.1.1.1\n")
    registry = CollectorRegistry()
    now = [1000.0]
    specs = [_spec("a", "a.txt"), _spec("off", "missing.txt", enabled=False)]
    manager = _manager(specs, tmp_path, registry, clock=lambda: now[0])
    assert registry.get_sample_value("feeds_ready") == 0.0
    assert registry.get_sample_value("feeds_age_seconds", {"feed": "a"}) == -1.0
    reports = await manager.update_now()
    assert [r.status for r in reports] == ["updated", "disabled"]
    now[0] = 1030.0
    assert manager.ready and registry.get_sample_value("feeds_ready") == 1.0
    assert registry.get_sample_value("feeds_age_seconds", {"feed": "a"}) == 30.0
    assert manager.status()["a"].age == 30.0


async def test_stored_data_from_another_source_is_ignored(tmp_path: Path) -> None:
    """Changing a feed's url discards the data stored for the old source."""
    (tmp_path / "a.txt").write_text("1.1.1.1\n")
    (tmp_path / "b.txt").write_text("2.2.2.2\n")
    await _manager([_spec("f", "a.txt")], tmp_path).update_now()
    moved = _manager([_spec("f", "b.txt")], tmp_path)
    moved.load_state()
    assert not moved.ready


async def test_start_refreshes_in_background_and_stops(tmp_path: Path) -> None:
    """start() loads state and fetches on the feed's schedule; stop() ends the tasks."""
    (tmp_path / "a.txt").write_text("1.1.1.1\n")
    manager = _manager([_spec("a", "a.txt", period="1s")], tmp_path)
    await manager.start()
    try:
        for _ in range(100):
            if manager.ready:
                break
            await asyncio.sleep(0.05)
        assert manager.ready and manager.matcher.match_ip("1.1.1.1")
        (tmp_path / "a.txt").write_text("1.1.1.1\n3.3.3.3\n")
        for _ in range(100):
            if manager.matcher.match_ip("3.3.3.3"):
                break
            await asyncio.sleep(0.05)
        assert manager.matcher.match_ip("3.3.3.3")
    finally:
        await manager.stop()
    assert not manager._tasks


async def test_unknown_names_rejected(tmp_path: Path) -> None:
    """update_now refuses names that are not configured."""
    manager = _manager([_spec("a", "a.txt")], tmp_path)
    try:
        await manager.update_now(["nope"])
    except ValueError as e:
        assert "nope" in str(e)
    else:
        raise AssertionError("expected ValueError")


async def test_unexpected_error_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash inside an update becomes a failed report; the last good data stays."""
    (tmp_path / "a.txt").write_text("1.1.1.1\n")
    manager = _manager([_spec("a", "a.txt")], tmp_path)
    await manager.update_now()

    def boom(*args: object, **kwargs: object) -> object:
        raise RuntimeError("bug")

    monkeypatch.setattr("feeds.refresh.parse", boom)
    (tmp_path / "a.txt").write_text("1.1.1.1\n2.2.2.2\n")
    report = (await manager.update_now())[0]
    assert report.status == "failed" and "RuntimeError('bug')" in (report.reason or "")
    assert manager.matcher.match_ip("1.1.1.1")


async def test_fresh_stored_data_is_not_refetched_at_start(
    feed_server: FeedServer, tmp_path: Path
) -> None:
    """A restart with data younger than the period serves it and waits for the period."""
    feed_server.serve("/ips", IPS)
    specs = [_spec("f", feed_server.url("/ips"), period="1h")]
    await _manager(specs, tmp_path).update_now()
    restarted = _manager(specs, tmp_path)
    await restarted.start()
    try:
        assert restarted.ready and restarted.matcher.match_ip("5.6.3.1")
        await asyncio.sleep(0.3)
    finally:
        await restarted.stop()
    assert feed_server.hits["/ips"] == 1


async def test_blocklist_values_refuses_feeds_without_data(tmp_path: Path) -> None:
    """An export of a blocklist that has no data yet raises instead of answering empty."""
    (tmp_path / "a.txt").write_text("1.1.1.1\n")
    specs = [_spec("a", "a.txt"), _spec("gone", "missing.txt"), _spec("off", "x", enabled=False)]
    manager = _manager(specs, tmp_path)
    await manager.update_now(["a", "gone"])
    with pytest.raises(MissingFeedData) as caught:
        manager.blocklist_values("ip")
    assert caught.value.feeds == ("gone",) and "gone" in str(caught.value)
    assert manager.blocklist_values("ip", ["a"]) == ["1.1.1.1"]
    assert manager.status()["a"].has_data and not manager.status()["gone"].has_data


def _seed(directory: Path, name: str, url: str, body: bytes, etag: str | None = None) -> None:
    save_feed(directory, name, StoredFeed(body, url, etag, None, 1_700_000_000.0))


async def test_seed_serves_a_feed_without_state_and_joins_state(
    feed_server: FeedServer, tmp_path: Path
) -> None:
    """With no stored state, the seed's data is served, copied into the state and revalidated
    with its ETag."""
    url = feed_server.url("/ips")
    _seed(tmp_path / "seed", "remote", url, IPS, etag='"7"')
    manager = _manager([_spec("remote", url)], tmp_path, seed_dir=tmp_path / "seed")
    manager.load_state()
    assert manager.ready and manager.matcher.match_ip("5.6.3.1")[0].feed == "remote"
    assert manager.status()["remote"].last_success == 1_700_000_000.0
    assert load_feed(tmp_path / "state", "remote") == load_feed(tmp_path / "seed", "remote")
    feed_server.serve("/ips", IPS, etag='"7"')
    assert (await manager.update_now())[0].status == "unchanged"
    assert feed_server.requests[-1].headers["If-None-Match"] == '"7"'


async def test_state_wins_over_seed(tmp_path: Path) -> None:
    """Stored state of the feed's source is served; the seed is not read over it."""
    url = "https://feeds.example/ips.txt"
    _seed(tmp_path / "state", "remote", url, b"5.6.1.1\n")
    _seed(tmp_path / "seed", "remote", url, b"9.9.9.9\n")
    manager = _manager([_spec("remote", url)], tmp_path, seed_dir=tmp_path / "seed")
    manager.load_state()
    assert manager.matcher.match_ip("5.6.1.1") and not manager.matcher.match_ip("9.9.9.9")


async def test_seed_of_another_source_is_ignored(tmp_path: Path) -> None:
    """A seed stored for another URL is not served: the feed stays without data."""
    _seed(tmp_path / "seed", "remote", "https://old.example/ips.txt", IPS)
    spec = _spec("remote", "https://feeds.example/ips.txt")
    manager = _manager([spec], tmp_path, seed_dir=tmp_path / "seed")
    manager.load_state()
    assert not manager.ready
    assert load_feed(tmp_path / "state", "remote") is None


async def test_feeds_added_and_removed_while_running(
    feed_server: FeedServer, tmp_path: Path
) -> None:
    """A feed added to a started manager is refreshed and served; removed, it is neither."""
    feed_server.serve("/ips", IPS)
    manager = _manager([], tmp_path)
    await manager.start()
    try:
        spec = _spec("late", feed_server.url("/ips"))
        await manager.add(spec)
        assert "late" in manager.status() and not manager.ready
        assert any(t.get_name() == "feed-refresh-late" for t in manager._tasks)
        [report] = await manager.update_now(["late"])
        assert report.status == "updated" and manager.matcher.match_ip("5.6.1.1")
        await manager.add(spec)  # the same definition again: nothing changes
        assert manager.matcher.match_ip("5.6.1.1")
        await manager.remove("late")
        assert manager.status() == {} and manager.ready
        assert manager.matcher.match_ip("5.6.1.1") == ()
        assert not any(t.get_name() == "feed-refresh-late" for t in manager._tasks)
        await manager.add(spec)  # its stored data is served again at once
        assert manager.matcher.match_ip("5.6.1.1")
    finally:
        await manager.stop()
