"""Fixtures for the feeds tests: real feed excerpts (tests/feeds/samples) and a feed server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"  # SOURCES.md says where each is from


@pytest.fixture
def samples() -> Path:
    """The folder of real feed excerpts."""
    return SAMPLES_DIR


class FeedServer:
    """A local aiohttp server on 127.0.0.1:0 whose responses each test sets per path."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.hits: dict[str, int] = {}
        self.requests: list[web.Request] = []
        self.port = 0

    def url(self, path: str) -> str:
        """The full URL of a path on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, body: bytes, *, etag: str | None = None, **headers: str) -> None:
        """Serve a fixed body; with an ETag, answer 304 to a matching If-None-Match."""

        async def handler(request: web.Request) -> web.StreamResponse:
            if etag is not None and request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers={"ETag": etag})
            extra = dict(headers)
            if etag is not None:
                extra["ETag"] = etag
            return web.Response(body=body, headers=extra)

        self.handlers[path] = handler

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        self.requests.append(request)
        handler = self.handlers.get(request.path)
        if handler is None:
            return web.Response(status=404, text="not found")
        return await handler(request)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def feed_server() -> AsyncIterator[FeedServer]:
    """A running FeedServer, stopped after the test."""
    server = FeedServer()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", server._dispatch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
    server.port = sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        await runner.cleanup()
