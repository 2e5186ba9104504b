"""Tests of feeds.cli: the functions behind `egressgw feeds update|check|lookup`."""

from __future__ import annotations

import io
import time
from pathlib import Path

from feeds.cli import check_file, current_data, load_matcher, lookup, update_async
from feeds.options import ParseOptions
from feeds.spec import FeedSpec
from feeds.state import StoredFeed, save_feed

from .conftest import FeedServer


def _specs(server: FeedServer) -> list[FeedSpec]:
    return [
        FeedSpec(name="ips", url=server.url("/ips"), format="lines"),
        FeedSpec(name="doms", url="doms.txt", format="lines", confidence=70),
    ]


async def test_update_prints_one_row_per_feed(feed_server: FeedServer, tmp_path: Path) -> None:
    """update prints a header and a row per feed with entries and status; exit 0 when ok."""
    feed_server.serve("/ips", b"1.2.3.4\n5.6.7.8\n")
    (tmp_path / "doms.txt").write_text("evil.example\n")
    out = io.StringIO()
    code = await update_async(_specs(feed_server), tmp_path, tmp_path / "st", [], out)
    lines = out.getvalue().splitlines()
    assert code == 0 and lines[0].startswith("FEED") and len(lines) == 3
    rows = {line.split()[0]: line for line in lines[1:]}  # in completion order
    assert rows["ips"].split()[:5] == ["ips", "2", "2", "0", "0"]
    assert rows["ips"].endswith("updated") and rows["doms"].endswith("updated")


async def test_update_failure_and_unknown_names(feed_server: FeedServer, tmp_path: Path) -> None:
    """A failing feed gives exit 1 with its reason; an unknown name is a usage error."""
    out = io.StringIO()
    code = await update_async(_specs(feed_server), tmp_path, tmp_path / "st", ["ips"], out)
    assert code == 1 and "failed: HTTP 404" in out.getvalue()
    out = io.StringIO()
    assert await update_async(_specs(feed_server), tmp_path, tmp_path / "st", ["x"], out) == 2
    assert "unknown feed(s): x" in out.getvalue()


async def test_lookup_explains_matches(feed_server: FeedServer, tmp_path: Path) -> None:
    """lookup names the feed, indicator and why (parent domain); exit 1 when not listed."""
    feed_server.serve("/ips", b"1.2.3.0/24\n")
    (tmp_path / "doms.txt").write_text("evil.example\n")
    specs = _specs(feed_server)
    await update_async(specs, tmp_path, tmp_path / "st", [], io.StringIO())
    matcher = load_matcher(specs, tmp_path, tmp_path / "st")
    out = io.StringIO()
    assert lookup("www.evil.example", matcher, out) == 0
    text = out.getvalue()
    assert "doms: domain-name evil.example [parent domain] (confidence 70)" in text
    out = io.StringIO()
    assert lookup("1.2.3.99", matcher, out) == 0 and "[in network]" in out.getvalue()
    out = io.StringIO()
    assert lookup("good.example", matcher, out) == 1 and "not listed" in out.getvalue()


def test_check_file_reports_counts_rejects_and_trailer(tmp_path: Path) -> None:
    """check reports indicators by kind, rejected samples with lines, drops and the trailer."""
    path = tmp_path / "f.txt"
    path.write_text("1.2.3.4\nevil.example\n10.0.0.1\nbad value\n# END 4 entries\n")
    out = io.StringIO()
    assert check_file(path, "lines", None, out) == 0
    text = out.getvalue()
    assert "indicators: 2, domain 1, ip 1" in text
    assert "rejected: 1" in text and "line 4:" in text
    assert "dropped (private): 1" in text and "trailer: 4 entries announced, ok" in text


def test_check_file_failures(tmp_path: Path) -> None:
    """Truncated files, HTML, unparseable bodies and missing files give non-zero exits."""
    out = io.StringIO()
    cut = tmp_path / "cut.txt"
    cut.write_text("1.2.3.4\n# END 9 entries\n")
    assert check_file(cut, "lines", None, out) == 1 and "TRUNCATED" in out.getvalue()
    html = tmp_path / "page.txt"
    html.write_text("<html><body>error</body></html>")
    assert check_file(html, "lines", None, out) == 1
    js = tmp_path / "f.json"
    js.write_text("[1, 2")
    assert check_file(js, "json", ParseOptions(), out) == 1 and "invalid JSON" in out.getvalue()
    assert check_file(tmp_path / "missing", "lines", None, out) == 2


async def test_current_data_reads_an_edited_local_file(tmp_path: Path) -> None:
    """A local feed edited after its data was stored is read again, as the gateway would."""
    (tmp_path / "doms.txt").write_text("evil.example\n")
    specs = [FeedSpec(name="doms", url="doms.txt", format="lines")]
    await update_async(specs, tmp_path, tmp_path / "st", [], io.StringIO())
    (tmp_path / "doms.txt").write_text("evil.example\napi.partner.example\n")
    manager, data = await current_data(specs, tmp_path, tmp_path / "st")
    assert manager.matcher.match_domain("api.partner.example")
    assert data[0].entries == 2 and data[0].origin == "fetched now" and not data[0].stale
    assert data[0].describe() == "doms: 2 entries, fetched now (age 0s)"


async def test_current_data_fetches_missing_and_stale_remote_data_only(
    feed_server: FeedServer, tmp_path: Path
) -> None:
    """Remote data is fetched when none is stored or it is older than the period, not otherwise."""
    feed_server.serve("/ips", b"1.2.3.4\n")
    specs = [FeedSpec(name="ips", url=feed_server.url("/ips"), format="lines", period=3600)]
    manager, data = await current_data(specs, tmp_path, tmp_path / "st")
    assert manager.matcher.match_ip("1.2.3.4") and data[0].origin == "fetched now"
    assert feed_server.hits["/ips"] == 1
    manager, data = await current_data(specs, tmp_path, tmp_path / "st")
    assert feed_server.hits["/ips"] == 1 and data[0].origin == "stored" and data[0].has_data
    later = time.time() + 7200
    manager, data = await current_data(specs, tmp_path, tmp_path / "st", clock=lambda: later)
    assert feed_server.hits["/ips"] == 2 and not data[0].stale


async def test_current_data_reports_missing_and_stale_data(
    feed_server: FeedServer, tmp_path: Path
) -> None:
    """No data is reported with the reason; stored data older than the period is marked stale."""
    specs = [FeedSpec(name="ips", url=feed_server.url("/ips"), format="lines", retries=0)]
    manager, data = await current_data(specs, tmp_path, tmp_path / "st")
    assert not data[0].has_data and data[0].describe() == "ips: no data: HTTP 404 Not Found"
    _, data = await current_data(specs, tmp_path, tmp_path / "st", fetch=False)
    assert not data[0].has_data and feed_server.hits["/ips"] == 1
    save_feed(
        tmp_path / "st",
        "ips",
        StoredFeed(b"1.2.3.4\n", specs[0].url, last_success=time.time() - 7300),
    )
    manager, data = await current_data(specs, tmp_path, tmp_path / "st")
    assert manager.matcher.match_ip("1.2.3.4")
    assert data[0].describe() == (
        "ips: 1 entries, stored (age 2h1m), older than its period; "
        "refresh failed: HTTP 404 Not Found"
    )
    _, data = await current_data(specs, tmp_path, tmp_path / "st", fetch=False)
    assert data[0].stale and feed_server.hits["/ips"] == 2


def test_check_file_gives_the_guards_verdict_on_an_empty_list(tmp_path: Path) -> None:
    """A file with no indicators is refused as the gateway would, unless empty is allowed."""
    path = tmp_path / "empty.txt"
    path.write_text("# nothing listed today\n")
    out = io.StringIO()
    assert check_file(path, "lines", None, out) == 1
    assert "verdict: the gateway would refuse this update: no indicators" in out.getvalue()
    out = io.StringIO()
    assert check_file(path, "lines", None, out, allow_empty=True) == 0
    assert "verdict: the gateway would accept it" in out.getvalue()
