"""Tests of feeds.fetch against local aiohttp servers and local files."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import pytest
from aiohttp import web

from feeds.fetch import FetchError, fetch, gunzip_limited, resolve_local

from .conftest import FeedServer

FAST = {"backoff": 0.01, "request_timeout": 2.0}


async def test_conditional_get_uses_etag(feed_server: FeedServer, tmp_path: Path) -> None:
    """A first GET returns the body and ETag; sending it back yields 'not modified'."""
    feed_server.serve("/f", b"1.2.3.4\n", etag='"v1"', **{"Last-Modified": "Mon, 01 Jan 2024"})
    first = await fetch(feed_server.url("/f"), base_dir=tmp_path, **FAST)
    assert first.body == b"1.2.3.4\n" and first.etag == '"v1"'
    assert first.last_modified == "Mon, 01 Jan 2024"
    second = await fetch(
        feed_server.url("/f"), base_dir=tmp_path, etag=first.etag, last_modified="x", **FAST
    )
    assert second.not_modified and second.status == 304
    assert feed_server.requests[-1].headers["If-Modified-Since"] == "x"


async def test_content_encoding_gzip_is_decoded(feed_server: FeedServer, tmp_path: Path) -> None:
    """A gzip Content-Encoding is transparently decoded."""
    feed_server.serve("/f", gzip.compress(b"a.example\n"), **{"Content-Encoding": "gzip"})
    assert (await fetch(feed_server.url("/f"), base_dir=tmp_path, **FAST)).body == b"a.example\n"


async def test_gzip_file_body_is_decompressed(feed_server: FeedServer, tmp_path: Path) -> None:
    """A body that is itself a .gz file is decompressed."""
    feed_server.serve("/f.gz", gzip.compress(b"a.example\n"))
    assert (await fetch(feed_server.url("/f.gz"), base_dir=tmp_path, **FAST)).body == b"a.example\n"


async def test_truncated_gzip_fails(feed_server: FeedServer, tmp_path: Path) -> None:
    """A cut gzip body is a failure, never a partial list."""
    feed_server.serve("/f.gz", gzip.compress(b"1.2.3.4\n" * 1000)[:-20])
    with pytest.raises(FetchError, match="truncated gzip"):
        await fetch(feed_server.url("/f.gz"), base_dir=tmp_path, **FAST)


async def test_size_limit_stops_reading(feed_server: FeedServer, tmp_path: Path) -> None:
    """A body beyond max_bytes fails the fetch (also after decompression)."""
    feed_server.serve("/big", b"x" * 200_000)
    with pytest.raises(FetchError, match="max_bytes"):
        await fetch(feed_server.url("/big"), base_dir=tmp_path, max_bytes=100_000, **FAST)
    feed_server.serve("/bomb.gz", gzip.compress(b"0" * 1_000_000))
    with pytest.raises(FetchError, match="max_bytes"):
        await fetch(feed_server.url("/bomb.gz"), base_dir=tmp_path, max_bytes=100_000, **FAST)


async def test_500_is_retried_then_fails(feed_server: FeedServer, tmp_path: Path) -> None:
    """5xx is retried with backoff; after the retries the reason names the status."""

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="oops")

    feed_server.handlers["/f"] = fail
    with pytest.raises(FetchError, match="HTTP 500"):
        await fetch(feed_server.url("/f"), base_dir=tmp_path, retries=2, **FAST)
    assert feed_server.hits["/f"] == 3


async def test_flaky_server_recovers_on_retry(feed_server: FeedServer, tmp_path: Path) -> None:
    """A 503 followed by a 200 succeeds within the retry budget."""
    answers = [web.Response(status=503), web.Response(body=b"1.2.3.4\n")]

    async def flaky(request: web.Request) -> web.Response:
        return answers.pop(0)

    feed_server.handlers["/f"] = flaky
    result = await fetch(feed_server.url("/f"), base_dir=tmp_path, retries=1, **FAST)
    assert result.body == b"1.2.3.4\n"


async def test_404_is_not_retried(feed_server: FeedServer, tmp_path: Path) -> None:
    """Client errors fail at once."""
    with pytest.raises(FetchError, match="HTTP 404"):
        await fetch(feed_server.url("/missing"), base_dir=tmp_path, retries=3, **FAST)
    assert feed_server.hits["/missing"] == 1


async def test_slow_server_times_out(feed_server: FeedServer, tmp_path: Path) -> None:
    """A server slower than the timeout fails with a timeout reason."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(body=b"late")

    feed_server.handlers["/slow"] = slow
    with pytest.raises(FetchError, match="timed out"):
        await fetch(feed_server.url("/slow"), base_dir=tmp_path, request_timeout=0.2, retries=0)


async def test_connection_refused_is_a_fetch_error(tmp_path: Path) -> None:
    """Nothing listening on the port: a FetchError, not an aiohttp exception."""
    with pytest.raises(FetchError, match="request failed"):
        await fetch("http://127.0.0.1:9/", base_dir=tmp_path, retries=0)


async def test_local_paths_and_file_urls(tmp_path: Path) -> None:
    """Relative paths, absolute paths and file:// URLs read the file; unchanged is detected."""
    (tmp_path / "f.txt").write_bytes(b"1.2.3.4\n")
    rel = await fetch("f.txt", base_dir=tmp_path)
    assert rel.body == b"1.2.3.4\n"
    url = await fetch(f"file://{tmp_path}/f.txt", base_dir=Path("/nonexistent"))
    assert url.body == b"1.2.3.4\n"
    again = await fetch("f.txt", base_dir=tmp_path, last_modified=rel.last_modified)
    assert again.not_modified
    with pytest.raises(FetchError, match="cannot read"):
        await fetch("missing.txt", base_dir=tmp_path)
    with pytest.raises(FetchError, match="max_bytes"):
        await fetch("f.txt", base_dir=tmp_path, max_bytes=3)


def test_resolve_local_refuses_remote_file_hosts(tmp_path: Path) -> None:
    """file://host/path is not a local file."""
    assert resolve_local("/abs/x", tmp_path) == Path("/abs/x")
    with pytest.raises(FetchError, match="remote host"):
        resolve_local("file://server/share/x", tmp_path)


def test_gunzip_limited_rejects_garbage() -> None:
    """Bytes with a gzip magic but no valid stream fail cleanly."""
    with pytest.raises(FetchError, match="corrupt gzip"):
        gunzip_limited(b"\x1f\x8bnot really gzip", 1000)
