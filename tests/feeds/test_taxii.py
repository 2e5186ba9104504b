"""Tests of feeds.taxii: polling a local TAXII 2.1 collection, and merging versions."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from feeds.fetch import FetchError
from feeds.refresh import FeedManager
from feeds.spec import FeedSpec
from feeds.taxii import TAXII_MEDIA_TYPE, merge_bundle, poll_collection

from .conftest import FeedServer

COLLECTION = "/api1/collections/91a7b528/"


def _indicator(
    n: int, value: str, modified: str = "2024-01-01T00:00:00Z", **extra: Any
) -> dict[str, Any]:
    return {
        "type": "indicator",
        "spec_version": "2.1",
        "id": f"indicator--{n}",
        "pattern": f"[ipv4-addr:value = '{value}']",
        "pattern_type": "stix",
        "valid_from": "2024-01-01T00:00:00Z",
        "modified": modified,
        **extra,
    }


class Collection:
    """A TAXII 2.1 objects endpoint: date_added per object, limit/next paging."""

    def __init__(self, media_type: str = TAXII_MEDIA_TYPE, use_next: bool = True) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []
        self.media_type = media_type
        self.use_next = use_next
        self.queries: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.queries.append(dict(request.query))
        assert request.headers["Accept"] == TAXII_MEDIA_TYPE
        after = request.query.get("added_after", "")
        start = int(request.query.get("next", "0"))
        limit = int(request.query["limit"])
        pending = [(d, o) for d, o in self.entries if d > after]
        page = pending[start : start + limit]
        more = start + limit < len(pending)
        envelope: dict[str, Any] = {"more": more, "objects": [o for _, o in page]}
        if more and self.use_next:
            envelope["next"] = str(start + limit)
        headers = {"Content-Type": self.media_type}
        if page:
            headers["X-TAXII-Date-Added-First"] = page[0][0]
            headers["X-TAXII-Date-Added-Last"] = page[-1][0]
        return web.Response(body=orjson.dumps(envelope), headers=headers)


@pytest.mark.parametrize("use_next", [True, False])
async def test_pages_are_followed(feed_server: FeedServer, use_next: bool) -> None:
    """All pages are fetched (by next, or by moving added_after); the cursor is the last date."""
    coll = Collection(use_next=use_next)
    coll.entries = [(f"2024-01-01T00:00:0{i}.000Z", _indicator(i, f"5.5.5.{i}")) for i in range(5)]
    feed_server.handlers[COLLECTION + "objects/"] = coll.handle
    async with aiohttp.ClientSession() as session:
        poll = await poll_collection(
            session, feed_server.url(COLLECTION), page_size=2, max_bytes=10**6, request_timeout=5
        )
    assert [o["id"] for o in poll.objects] == [f"indicator--{i}" for i in range(5)]
    assert poll.pages == 3 and poll.cursor == "2024-01-01T00:00:04.000Z"
    assert all(q["match[type]"] == "indicator" for q in coll.queries)


async def test_wrong_media_type_is_refused(feed_server: FeedServer) -> None:
    """An HTML or plain JSON answer is not a TAXII envelope."""
    coll = Collection(media_type="text/html")
    feed_server.handlers[COLLECTION + "objects/"] = coll.handle
    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchError, match="expected application/taxii"):
            await poll_collection(
                session, feed_server.url(COLLECTION), max_bytes=10**6, request_timeout=5
            )


def test_merge_keeps_newest_version() -> None:
    """Merging keeps one object per id, the newest modified."""
    first = merge_bundle(None, (_indicator(1, "1.1.1.1"),))
    second = merge_bundle(
        first,
        (_indicator(1, "1.1.1.1", modified="2025-01-01T00:00:00Z", revoked=True),),
    )
    objects = orjson.loads(second)["objects"]
    assert len(objects) == 1 and objects[0]["revoked"] is True


async def test_manager_polls_incrementally(feed_server: FeedServer, tmp_path: Path) -> None:
    """A taxii feed loads the collection, then asks only for objects added after the cursor."""
    coll = Collection()
    coll.entries = [("2024-01-01T00:00:01.000Z", _indicator(1, "5.5.5.1"))]
    feed_server.handlers[COLLECTION + "objects/"] = coll.handle
    spec = FeedSpec.model_validate(
        {"name": "t", "url": feed_server.url(COLLECTION), "format": "stix", "taxii": {}}
    )
    manager = FeedManager(
        [spec], tmp_path, tmp_path / "st", registry=CollectorRegistry(), rng=random.Random(1)
    )
    assert (await manager.update_now())[0].status == "updated"
    assert (await manager.update_now())[0].status == "unchanged"
    assert coll.queries[-1]["added_after"] == "2024-01-01T00:00:01.000Z"
    coll.entries.append(("2024-01-01T00:00:02.000Z", _indicator(2, "5.5.5.2")))
    report = (await manager.update_now())[0]
    assert (report.status, report.entries, report.added) == ("updated", 2, 1)
    assert manager.matcher.match_ip("5.5.5.1") and manager.matcher.match_ip("5.5.5.2")


def test_taxii_needs_stix_over_http() -> None:
    """taxii: is only valid with format stix and an http(s) url."""
    with pytest.raises(ValueError, match="taxii"):
        FeedSpec.model_validate({"name": "t", "url": "x.json", "format": "stix", "taxii": {}})
