"""The admin HTTP server (aiohttp): ``/healthz``, ``/readyz``, ``/metrics``, ``/edl/{kind}``, and
the egress map: its page at ``/`` (assets shipped in ``static/``) and its API under ``/api/v1``.

It reads the gateway through the small ``AdminSource`` protocol below and never changes it, so
new pages (the egress map) are added here without touching the proxy.

An EDL asked for while one of its feeds has no data yet (before the first fetch succeeded) is
answered ``503`` with ``Retry-After``, never an empty list: a firewall polling it would drop
every entry it holds, while on an error it keeps its last list.

The egress map's routes (``/``, ``/static/*``, ``/api/*``) need the bearer token when
``admin.auth`` sets one: an ``Authorization: Bearer`` header, or the cookie ``/?token=...``
sets (a browser's page, its ``fetch`` calls and its EventSource cannot all send a header).
The probes, ``/metrics`` and the EDLs stay open, as before. The live stream
(``/api/v1/stream``) checks the map's version every ``STREAM_INTERVAL`` seconds and sends the
graph and the new refused flows when it changed: one computation per interval however many
flows passed, and at most ``MAX_STREAMS`` streams at once.

The map is read through ``MapSource``: one process's ``EgressMap`` (``LocalMap``), or, with
``proxy.workers`` above 1, the workers' maps asked and merged by the supervisor. Streams pass
``max_age=STREAM_INTERVAL``: an answer that young is shared, so however many streams are open
the workers are asked at most once per interval and question.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from egressgw.decision.names import parse_ip_port
from egressgw.record.egressmap import EgressMap
from feeds.refresh import MissingFeedData
from feeds.spec import parse_duration
from siem.firewall import to_edl

EDL_KINDS = {"ips": "ip", "domains": "domain", "urls": "url"}
EDL_RETRY_AFTER = 30  # seconds a firewall is told to wait while feeds have no data yet
STREAM_INTERVAL = 2.0  # seconds between the live stream's looks at the map
STREAM_KEEPALIVE = 15.0  # seconds of silence after which the stream sends a comment
MAX_STREAMS = 16  # live streams open at once; more are answered 503
MAX_FLOWS_LIMIT = 1000  # the most recent flows one answer holds
TOKEN_COOKIE = "egressgw_admin"
PROTECTED = ("/api/", "/static/")
MAP_OFF = "the egress map is off (admin.map.enabled: false)\n"
STATIC = {"map.js": "text/javascript", "map.css": "text/css", "index.html": "text/html"}


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

    @property
    def map_source(self) -> MapSource | None:
        """The egress map, or None when ``admin.map.enabled`` is off."""
        ...

    async def explain(self, source: str, target: str, protocol: str) -> tuple[bool, list[str]]:
        """Decide a flow from ``source`` to ``target`` now and say how (allowed, lines)."""
        ...


class MapSource(Protocol):
    """The egress map as the admin API reads it (``EgressMap``'s questions, awaited).

    ``max_age``: how old (seconds) an answer may be: a source asking other processes may
    answer from a round of questions that recent instead of asking again.
    """

    @property
    def windows(self) -> tuple[float, ...]:
        """The windows a graph may be asked for, shortest first."""
        ...

    async def version(self, max_age: float = 0.0) -> int:
        """A number that changes whenever the map does."""
        ...

    async def graph(
        self,
        window: float,
        *,
        namespace: str | None,
        decision: str | None,
        tier: str | None,
        limit: int,
        max_age: float = 0.0,
    ) -> dict[str, Any]:
        """``EgressMap.graph`` of ``window`` now; ValueError for a bad filter."""
        ...

    async def flows(
        self, *, decision: str | None, limit: int, after: int, max_age: float = 0.0
    ) -> list[dict[str, Any]]:
        """``EgressMap.recent_flows``; ValueError for a bad filter."""
        ...


class LocalMap:
    """This process's ``EgressMap`` as a ``MapSource``: every answer is computed now."""

    def __init__(self, egress_map: EgressMap) -> None:
        self.map = egress_map

    @property
    def windows(self) -> tuple[float, ...]:
        """The map's windows."""
        return self.map.windows

    async def version(self, max_age: float = 0.0) -> int:
        """The map's version."""
        return self.map.version

    async def graph(
        self,
        window: float,
        *,
        namespace: str | None,
        decision: str | None,
        tier: str | None,
        limit: int,
        max_age: float = 0.0,
    ) -> dict[str, Any]:
        """The map's graph of ``window`` now."""
        return self.map.graph(
            time.monotonic(), window, namespace=namespace, decision=decision, tier=tier, limit=limit
        )

    async def flows(
        self, *, decision: str | None, limit: int, after: int, max_age: float = 0.0
    ) -> list[dict[str, Any]]:
        """The map's recent refused flows."""
        return self.map.recent_flows(decision=decision, limit=limit, after=after)


class AdminServer:
    """The admin pages on their own listener."""

    def __init__(
        self,
        source: AdminSource,
        registry: CollectorRegistry,
        metrics_body: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        """``metrics_body``: what ``/metrics`` serves, when not ``registry`` alone (workers'
        sums)."""
        self.source = source
        self.registry = registry
        self._metrics_body = metrics_body
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._token: bytes | None = None
        self._streams = 0
        self._closing = asyncio.Event()  # set by stop(): open streams end
        # The stream's shared answer per query: (map version, when, body).
        self._stream_cache: dict[tuple[str, ...], tuple[int, float, bytes]] = {}
        files = importlib.resources.files(__package__).joinpath("static")
        self._static = {name: files.joinpath(name).read_bytes() for name in STATIC}

    async def start(self, listen: str, token: str | None = None, metrics: bool = True) -> None:
        """Listen on ``listen`` (``IP:port``); ``address`` says where (port 0 picks one).

        ``token``: the bearer token the egress map's page and API require, if any. ``metrics``:
        serve ``/metrics`` here (False when ``start_metrics`` serves it on its own listener).
        """
        self._token = token.encode() if token else None
        self._closing.clear()
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if metrics:
            app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/edl/{kind}", self._edl)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/api/v1/graph", self._graph)
        app.router.add_get("/api/v1/flows", self._flows)
        app.router.add_get("/api/v1/stream", self._stream)
        app.router.add_get("/api/v1/explain", self._explain)
        self._runner = web.AppRunner(app, access_log=None)
        self.address = await _serve(self._runner, listen)

    async def start_metrics(self, listen: str) -> None:
        """Serve ``/metrics`` on ``listen`` instead (``metrics_address`` says where)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        self.metrics_address = await _serve(self._metrics_runner, listen)

    async def stop(self) -> None:
        """Close the listener and every open admin connection."""
        self._closing.set()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
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
        if self._metrics_body is not None:
            body = await self._metrics_body()
        else:
            body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- the egress map ------------------------------------------------------------------------
    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if self._token is None or not (path == "/" or path.startswith(PROTECTED)):
            return await handler(request)
        given = request.query.get("token")
        if path == "/" and given is not None and self._token_ok(given):
            # Swap the token in the address for a cookie the page's requests all carry.
            response = web.HTTPFound("/")
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="Strict", path="/")
            raise response
        header = request.headers.get("Authorization", "")
        bearer = header[7:] if header.startswith("Bearer ") else None
        if self._token_ok(bearer) or self._token_ok(request.cookies.get(TOKEN_COOKIE)):
            return await handler(request)
        raise web.HTTPUnauthorized(
            text="admin.auth: send Authorization: Bearer <token>, or open /?token=<token>\n",
            headers={"WWW-Authenticate": 'Bearer realm="egressgw"'},
        )

    def _token_ok(self, given: str | None) -> bool:
        assert self._token is not None
        return given is not None and hmac.compare_digest(given.encode(), self._token)

    def _map(self) -> MapSource:
        m = self.source.map_source
        if m is None:
            raise web.HTTPNotFound(text=MAP_OFF)
        return m

    async def _page(self, request: web.Request) -> web.Response:
        return self._static_response("index.html")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return self._static_response(name)

    def _static_response(self, name: str) -> web.Response:
        return web.Response(
            body=self._static[name],
            content_type=STATIC[name],
            charset="utf-8",
            headers={
                "Cache-Control": "no-cache",
                # Everything the page loads comes from here; no inline script runs.
                "Content-Security-Policy": "default-src 'self'; style-src 'self'",
            },
        )

    async def _graph_query(
        self, m: MapSource, request: web.Request, max_age: float = 0.0
    ) -> dict[str, Any]:
        q = request.query
        try:
            window = parse_duration(q["window"]) if q.get("window") else m.windows[0]
            if window not in m.windows:
                shown = ", ".join(f"{w / 60:g}m" for w in m.windows)
                raise ValueError(f"window must be one of {shown}")
            limit = int(q.get("limit", "300"))
            graph = await m.graph(
                window,
                namespace=q.get("namespace") or None,
                decision=q.get("decision") or None,
                tier=q.get("tier") or None,
                limit=max(1, limit),
                max_age=max_age,
            )
        except ValueError as e:
            raise web.HTTPBadRequest(text=f"{e}\n") from e
        graph["windows"] = list(m.windows)
        return graph

    async def _flows_query(
        self, m: MapSource, request: web.Request, after: int = 0, max_age: float = 0.0
    ) -> list[Any]:
        q = request.query
        decision = q.get("decision") or None
        if decision == "allowed":
            return []  # the ring holds refused and audited flows only
        try:
            limit = min(MAX_FLOWS_LIMIT, max(1, int(q.get("limit", "100"))))
            flows = await m.flows(decision=decision, limit=limit, after=after, max_age=max_age)
        except ValueError as e:
            raise web.HTTPBadRequest(text=f"{e}\n") from e
        namespace, tier = q.get("namespace") or None, q.get("tier") or None
        return [
            f
            for f in flows
            if (namespace is None or f["source"]["namespace"] == namespace)
            and (tier is None or f["tier"] == tier)
        ]

    async def _graph(self, request: web.Request) -> web.Response:
        """The edges of a window as JSON (``window``, ``namespace``, ``decision``, ``tier``)."""
        return _json(await self._graph_query(self._map(), request))

    async def _flows(self, request: web.Request) -> web.Response:
        """Recent denied and would-deny flows, newest first (``decision``, ``limit``)."""
        return _json({"flows": await self._flows_query(self._map(), request)})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: ``graph`` when the map changed, ``flows`` for new refused flows."""
        m = self._map()
        # A bad query is answered 400 before the stream starts.
        await self._graph_query(m, request, max_age=STREAM_INTERVAL)
        if self._streams >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text=f"{MAX_STREAMS} streams open already\n")
        self._streams += 1
        try:
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            seen_version, seen_seq = -1, int(request.query.get("after", "0") or 0)
            quiet_since = time.monotonic()
            while True:
                version = await m.version(max_age=STREAM_INTERVAL)
                if version != seen_version:
                    seen_version = version
                    graph = await self._cached_graph(m, request, version)
                    await response.write(b"event: graph\ndata: " + graph)
                    flows = await self._flows_query(
                        m, request, after=seen_seq, max_age=STREAM_INTERVAL
                    )
                    if flows:
                        seen_seq = flows[0]["seq"]
                        body = orjson.dumps(flows)
                        await response.write(b"event: flows\ndata: " + body + b"\n\n")
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= STREAM_KEEPALIVE:
                    await response.write(b": keepalive\n\n")
                    quiet_since = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), STREAM_INTERVAL)
                if self._closing.is_set():
                    break
        except ConnectionResetError:
            pass
        finally:
            self._streams -= 1
        return response

    async def _cached_graph(self, m: MapSource, request: web.Request, version: int) -> bytes:
        # Streams asking the same question within one interval share one computation.
        key = tuple(sorted(f"{k}={v}" for k, v in request.query.items() if k != "after"))
        cached = self._stream_cache.get(key)
        now = time.monotonic()
        if cached is None or (cached[0] != version and now - cached[1] >= STREAM_INTERVAL):
            body = orjson.dumps(await self._graph_query(m, request, STREAM_INTERVAL)) + b"\n\n"
            if len(self._stream_cache) >= MAX_STREAMS:
                self._stream_cache.clear()
            self._stream_cache[key] = cached = (version, now, body)
        return cached[2]

    async def _explain(self, request: web.Request) -> web.Response:
        """How the gateway decides ``from`` (an IP) -> ``to`` (host:port) now, step by step."""
        q = request.query
        source, target = q.get("from", ""), q.get("to", "")
        protocol = q.get("protocol", "tcp")
        try:
            ipaddress.ip_address(source)
        except ValueError as e:
            raise web.HTTPBadRequest(text=f"from: {e}\n") from e
        if protocol not in ("tcp", "tls", "http"):
            raise web.HTTPBadRequest(text="protocol must be tcp, tls or http\n")
        try:
            allowed, lines = await self.source.explain(source, target, protocol)
        except ValueError as e:
            raise web.HTTPBadRequest(text=f"to: {e}\n") from e
        return _json({"from": source, "to": target, "allowed": allowed, "lines": lines})


async def _serve(runner: web.AppRunner, listen: str) -> tuple[str, int] | None:
    """Start ``runner`` on ``listen`` (``IP:port``); the bound address (port 0 picks one)."""
    await runner.setup()
    ip, port = parse_ip_port(listen)
    site = web.TCPSite(runner, str(ip), port, reuse_address=True)
    await site.start()
    sockets = getattr(site._server, "sockets", None)  # uvloop's Server is no asyncio.Server
    return sockets[0].getsockname()[:2] if sockets else None


def _json(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")
