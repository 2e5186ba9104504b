"""The admin HTTP server (aiohttp): ``/healthz``, ``/readyz``, ``/metrics``, ``/edl/{kind}``.

It reads the gateway through the small ``AdminSource`` protocol below and never changes it, so
new pages (the egress map) are added here without touching the proxy.

An EDL asked for while one of its feeds has no data yet (before the first fetch succeeded) is
answered ``503`` with ``Retry-After``, never an empty list: a firewall polling it would drop
every entry it holds, while on an error it keeps its last list.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from egressgw.decision.names import parse_ip_port
from feeds.refresh import MissingFeedData
from siem.firewall import to_edl

EDL_KINDS = {"ips": "ip", "domains": "domain", "urls": "url"}
EDL_RETRY_AFTER = 30  # seconds a firewall is told to wait while feeds have no data yet


class AdminSource(Protocol):
    """What the admin pages read from the running gateway."""

    def readiness(self) -> str | None:
        """None when ready to serve, else why not."""
        ...

    def readiness_warning(self) -> str | None:
        """What a ready gateway serves without, if anything (shown by a 200 ``/readyz``)."""
        ...

    def blocklist_values(self, kind: str, feeds: list[str] | None) -> list[str]:
        """The blocked values of one kind (``ip``, ``domain``, ``url``); blocking: file reads.

        Raises ``MissingFeedData`` when a blocklist among them has no data yet.
        """
        ...


class AdminServer:
    """The admin pages on their own listener."""

    def __init__(self, source: AdminSource, registry: CollectorRegistry) -> None:
        self.source = source
        self.registry = registry
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, listen: str) -> None:
        """Listen on ``listen`` (``IP:port``); ``address`` says where (port 0 picks one)."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/edl/{kind}", self._edl)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        ip, port = parse_ip_port(listen)
        site = web.TCPSite(self._runner, str(ip), port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None)  # uvloop's Server is no asyncio.Server
        if sockets:
            self.address = sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        """Close the listener and every open admin connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        why = self.source.readiness()
        if why is None:
            warning = self.source.readiness_warning()
            return web.Response(text="ready\n" if warning is None else f"ready: {warning}\n")
        return web.Response(status=503, text=f"not ready: {why}\n")

    async def _edl(self, request: web.Request) -> web.Response:
        """The blocklists as plain-text external dynamic lists for firewalls to poll."""
        kind = EDL_KINDS.get(request.match_info["kind"])
        if kind is None:
            raise web.HTTPNotFound(text="use /edl/ips, /edl/domains or /edl/urls\n")
        feed = request.query.get("feed")
        names = [n for n in feed.split(",") if n] if feed else None
        try:
            values = await asyncio.to_thread(self.source.blocklist_values, kind, names)
        except MissingFeedData as e:
            raise web.HTTPServiceUnavailable(
                text=f"{e}\n", headers={"Retry-After": str(EDL_RETRY_AFTER)}
            ) from e
        except ValueError as e:
            raise web.HTTPBadRequest(text=f"{e}\n") from e
        return web.Response(body=to_edl(values), content_type="text/plain", charset="utf-8")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
