"""Tests of the ``special_ranges`` feed key: local lists keep what downloaded lists drop."""

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from feeds.refresh import FeedManager
from feeds.spec import FeedSpec


def test_auto_keeps_special_ranges_in_local_files(tmp_path: Path) -> None:
    """A local blocklist listing loopback addresses keeps them under the default ``auto``."""
    (tmp_path / "ips.txt").write_text("127.0.0.66\n127.0.1.0/24\n10.0.0.0/8\n93.184.216.34\n")
    specs = [
        FeedSpec(name="local", url="ips.txt", format="lines"),
        FeedSpec(name="strict", url="ips.txt", format="lines", special_ranges="drop"),
    ]
    assert specs[0].drops_special_ranges is False
    assert FeedSpec(name="r", url="https://x.test/l.txt", format="lines").drops_special_ranges
    manager = FeedManager(specs, tmp_path, tmp_path / "state", registry=CollectorRegistry())

    reports = asyncio.run(manager.update_now())
    assert {r.feed: r.entries for r in reports} == {"local": 4, "strict": 1}
    assert [m.feed for m in manager.matcher.match_ip("127.0.0.66")] == ["local"]
    assert {m.feed for m in manager.matcher.match_ip("93.184.216.34")} == {"local", "strict"}
