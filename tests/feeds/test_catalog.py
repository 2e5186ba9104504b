"""Tests of feeds.catalog: every ready definition is a valid feed spec."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from feeds.catalog import CATALOG
from feeds.refresh import FeedManager
from feeds.spec import FeedSpec

from .conftest import FeedServer

REQUIRED = {
    "feodo",
    "urlhaus",
    "threatfox",
    "spamhaus-drop",
    "spamhaus-dropv6",
    "et-compromised",
    "firehol-level1",
    "urlhaus-hostfile",
    "openphish",
}


def test_catalog_has_the_well_known_feeds() -> None:
    """The catalog names every feed the issue asks for."""
    assert set(CATALOG) >= REQUIRED


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_catalog_entry_validates(name: str) -> None:
    """Each entry validates, is remote, has a licence note and respects publisher rates."""
    spec = FeedSpec.model_validate({"catalog": name})
    assert spec.is_remote and spec.license
    assert spec.period >= 300.0


# catalog feed -> (sample served in its place, a value the sample lists, a value it must not)
SERVED: dict[str, tuple[str, str, str]] = {
    "feodo": ("feodo_ipblocklist_recommended.txt", "100.38.242.113", "100.38.242.114"),
    "urlhaus": (
        "urlhaus_csv_recent.csv",
        "http://182.126.120.150:58801/i",
        "http://182.126.120.150/",
    ),
    "urlhaus-hostfile": (
        "urlhaus_hostfile_2022_prefix-stripped.txt",
        "10000nftgenerator.com",
        "www.10000nftgenerator.com",
    ),
    "threatfox": ("threatfox_export_csv_full_excerpt.csv", "8.134.12.90", "8.134.12.91"),
    "spamhaus-drop": ("spamhaus_drop_v4.jsonl", "1.10.20.5", "1.10.32.1"),
    "spamhaus-dropv6": ("spamhaus_dropv6.txt", "2001:678:6c4::1", "2001:678:6c5::1"),
    "et-compromised": ("et_compromised-ips.txt", "101.126.133.170", "101.126.133.171"),
    "firehol-level1": ("firehol_level1_2015.netset", "1.116.3.4", "10.1.2.3"),
    "stevenblack-hosts": (
        "stevenblack_hosts_2017.txt",
        "lb.usemaxserver.de",
        "x.lb.usemaxserver.de",
    ),
    "phishing-army": ("phishing_army_blocklist_extended.txt", "001www.com", "a.001www.com"),
    "openphish": ("openphish_feed.txt", "http://insidergroup.pages.dev/", "http://pages.dev/"),
}

# The samples are excerpts: their trailers announce the full files' counts.
EXCERPT_FIXES = {
    "threatfox_export_csv_full_excerpt.csv": (b"# Number of entries: 1217668", b""),
    "spamhaus_drop_v4.jsonl": (b'"records":1670', b'"records":50'),
}


async def test_catalog_feeds_served_locally_load_and_match(
    samples: Path, feed_server: FeedServer, tmp_path: Path
) -> None:
    """Every catalog definition, pointed at a local copy of its sample, loads and matches."""
    specs = []
    for name, (sample, _, _) in SERVED.items():
        body = (samples / sample).read_bytes()
        old, new = EXCERPT_FIXES.get(sample, (b"", b""))
        if old:
            body = body.replace(old, new)
        feed_server.serve(f"/{name}", body)
        specs.append(FeedSpec.model_validate({"catalog": name, "url": feed_server.url(f"/{name}")}))
    manager = FeedManager(specs, tmp_path, tmp_path / "state", registry=CollectorRegistry())
    reports = await manager.update_now()
    assert [(r.feed, r.status) for r in reports if r.status != "updated"] == []
    assert manager.ready
    for name, (_, listed, unlisted) in SERVED.items():
        matches = manager.matcher.match(listed)
        assert name in {m.feed for m in matches}, (name, listed)
        assert name not in {m.feed for m in manager.matcher.match(unlisted)}, (name, unlisted)
