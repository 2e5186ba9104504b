"""The running gateway: listeners, admin server, events, reload and graceful shutdown.

Lifecycle:

1. ``Gateway.start()``: open the event exporter (its spool is recovered first), the admin
   server, then the proxy listener; ``/readyz`` turns ready once config, policy, identity and
   feeds are loaded and the listener accepts.
2. ``reload()`` (SIGHUP, or a changed configuration or policy file): load and validate
   everything into a new Runtime off the event loop, then swap it in whole; on any error keep the
   running one and log every error with file, line and key.
3. ``stop()`` (SIGTERM/SIGINT): stop accepting, let open connections finish for up to
   ``proxy.drain_timeout``, close the rest, flush events, close the exporter.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from egressgw import __version__
from egressgw import config as cfgmod
from egressgw.checks import NoThreats, Runtime, ThreatSource
from egressgw.config import Config
from egressgw.events import to_decision_event, to_end_event
from egressgw.flow import Flow
from egressgw.guard import Guard
from egressgw.metrics import Metrics
from egressgw.proxy import ClientConnection
from egressgw.rawstream import Listener, Reactor
from egressgw.resolver import Resolver
from egressgw.tasks import spawn
from egressgw.threats import MatcherThreats
from egressgw.yamlsource import ConfigError
from feeds.refresh import FeedManager, UpdateReport
from siem.exporter import Exporter
from siem.firewall import to_edl

log = structlog.get_logger("egressgw")

# How often idle and head timeouts are checked (their resolution).
SWEEP_INTERVAL = 1.0


def build_runtime(cfg: Config, threats: ThreatSource | None = None) -> Runtime:
    """Load policy files and build everything the decision path needs (blocking: file reads)."""
    pol = cfgmod.load_policy(cfg.policy.files, {f.name for f in cfg.feeds})
    r = cfg.resolver
    return Runtime(
        policy=pol,
        guard=Guard(cfg.guard.allow, cfg.guard.enabled),
        inventory=cfgmod.build_inventory(cfg),
        resolver=Resolver(r.nameservers, r.timeout, r.cache_size, r.min_ttl, r.max_ttl, r.ipv6),
        threats=threats or NoThreats(),
    )


def build_feeds(
    cfg: Config,
    base: Path,
    registry: CollectorRegistry | None,
    on_report: Callable[[UpdateReport], None] | None = None,
) -> FeedManager:
    """The feed manager of a configuration (feed state lives under ``state_dir/feeds``)."""
    return FeedManager(
        list(cfg.feeds), base, cfg.state_dir / "feeds", registry=registry, on_report=on_report
    )


LISTEN_BACKLOG = 4096


def listen_socket(listen: str) -> socket.socket:
    """A listening TCP socket for the proxy.

    No TCP_DEFER_ACCEPT: accepting a client as soon as its handshake completes, while its
    request is still on the way, measured 9-13% more tunnels/s on loopback (the accept overlaps
    the client's send) at about the same CPU per tunnel (docs/decisions.md).
    """
    host, port = _split(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it: no setsockopt per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Gateway:
    """The gateway process's state; the proxy's connections see it as their Hub."""

    def __init__(self, cfg: Config, config_path: Path | None = None) -> None:
        self.config = cfg
        self.config_path = config_path
        self.limits = cfg.proxy
        self.connections: set[ClientConnection] = set()
        self.per_source: dict[str, int] = {}  # open client connections by source address
        self.metrics = Metrics(CollectorRegistry(), lambda: len(self.connections))
        base = config_path.parent if config_path else Path.cwd()
        self.base_dir = base
        self.feeds = build_feeds(cfg, base, self.metrics.registry, self._feed_report)
        self.threats = MatcherThreats(lambda: self.feeds.matcher)
        self.runtime = build_runtime(cfg, self.threats)
        self.exporter = Exporter.from_config(
            cfg.spool, list(cfg.sinks), base, registry=self.metrics.registry
        )
        self.observer = {
            "vendor": "egressgw",
            "product": "egressgw",
            "type": "proxy",
            "version": __version__,
            "hostname": socket.gethostname(),
        }
        self.clock = time.monotonic()
        self.loop: asyncio.AbstractEventLoop  # set by start(), before any connection
        self.ready = False
        self.server: Listener | None = None
        self.reactor: Reactor  # set by start(), with the loop
        self.admin: web.AppRunner | None = None
        self.proxy_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._drained: asyncio.Event | None = None
        self._watched = self._mtimes()

    # -- Hub ------------------------------------------------------------------------------------
    def flow_decided(self, flow: Flow) -> None:
        """Count the decision and emit its event."""
        decision = flow.decision
        tier = (decision.tier or "default") if decision is not None else "none"
        elapsed = time.monotonic() - flow.started_mono
        self.metrics.count_flow(flow.action or "connection_denied", tier, elapsed)
        self.exporter.submit(to_decision_event(flow, self.observer))

    def flow_ended(self, flow: Flow) -> None:
        """Count bytes and emit the end event."""
        self.metrics.bytes_out += flow.bytes_out
        self.metrics.bytes_in += flow.bytes_in
        self.exporter.submit(to_end_event(flow, self.observer, time.time()))

    def count_error(self, kind: str) -> None:
        """Count an error by kind."""
        self.metrics.count_error(kind)

    def tunnel_opened(self) -> None:
        """A tunnel started."""
        self.metrics.tunnels += 1

    def tunnel_closed(self) -> None:
        """A tunnel ended."""
        self.metrics.tunnels -= 1

    def connection_opened(self, conn: ClientConnection) -> str | None:
        """Admit a connection (None), or say which connection limit refuses it."""
        limits = self.limits
        if len(self.connections) >= limits.max_connections:
            self.metrics.count_error("too_many_connections")
            return f"more than {limits.max_connections} client connections"
        # Counted by the address's text: an IP address object hashes in Python code, a str not.
        per_source, source = self.per_source, conn.peer_text
        open_now = per_source.get(source, 0)
        if open_now >= limits.max_connections_per_source:
            self.metrics.count_error("too_many_connections_per_source")
            return f"more than {limits.max_connections_per_source} connections from {source}"
        per_source[source] = open_now + 1
        self.connections.add(conn)
        return None

    def connection_closed(self, conn: ClientConnection) -> None:
        """Forget a connection."""
        if conn in self.connections:
            self.connections.discard(conn)
            per_source, source = self.per_source, conn.peer_text
            left = per_source[source] - 1
            if left:
                per_source[source] = left
            else:
                del per_source[source]
            if not self.connections and self._drained is not None:
                self._drained.set()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start exporter, admin server and proxy listener."""
        loop = self.loop = asyncio.get_running_loop()
        await self.exporter.start()
        await self.feeds.start()
        missing = [n for n, s in self.feeds.status().items() if s.enabled and not s.entries]
        if missing:
            # Feeds with no stored data are fetched now rather than after the startup spread,
            # so /readyz turns ready as soon as they are in.
            self._tasks.append(spawn(self.feeds.update_now(missing), name="feeds-first-fetch"))
        await self._start_admin()
        self.reactor = Reactor(loop)
        self.server = Listener(
            self.reactor,
            listen_socket(self.config.proxy.listen),
            lambda: ClientConnection(self),
            on_error=self.metrics.count_error,
        )
        self.server.start()
        self.proxy_address = self.server.address
        self._tasks.append(spawn(self._sweep(), name="idle-sweeper"))
        if self.config_path is not None and self.config.reload.watch:
            self._tasks.append(spawn(self._watch(), name="config-watcher"))
        self.ready = True
        log.info(
            "gateway started",
            proxy=self.config.proxy.listen,
            admin=self.config.admin.listen,
            policy=[str(p) for p in self.config.policy.files] or "allow all (embedded)",
            tiers=len(self.runtime.policy.tiers),
        )

    async def stop(self) -> None:
        """Stop accepting, drain open connections, flush events."""
        self.ready = False
        if self.server is not None:
            self.server.close()
        if self.connections:
            self._drained = asyncio.Event()
            try:
                async with asyncio.timeout(self.limits.drain_timeout):
                    await self._drained.wait()
            except TimeoutError:
                log.warning("drain timeout: closing open connections", open=len(self.connections))
        for conn in list(self.connections):
            conn.close()
        await asyncio.sleep(0)  # let connection_lost callbacks record the flows' end events
        if self.server is not None:
            self.reactor.close()
        for task in self._tasks:
            task.cancel()
        await self.feeds.stop()
        if self.admin is not None:
            await self.admin.cleanup()
        await self.exporter.aclose()
        log.info("gateway stopped")

    async def reload(self) -> bool:
        """Load configuration and policy again; swap them in whole, or keep the running ones."""
        if self.config_path is None:
            return False
        try:
            cfg, runtime = await asyncio.to_thread(self._load, self.config_path, self.threats)
        except ConfigError as e:
            self.metrics.count_reload("failed")
            for line in e.errors:
                log.error("reload refused: keeping the running configuration", error=line)
            return False
        if (
            cfg.proxy.listen != self.config.proxy.listen
            or cfg.admin.listen != self.config.admin.listen
        ):
            log.warning("listen addresses change only on restart")
        if cfg.sinks != self.config.sinks or cfg.spool != self.config.spool:
            log.warning("sinks and spool change only on restart")
        if cfg.feeds != self.config.feeds or cfg.state_dir != self.config.state_dir:
            log.warning("feed definitions change only on restart")
        self.config = cfg
        self.limits = cfg.proxy
        self.runtime = runtime
        self.metrics.count_reload("ok")
        log.info("configuration reloaded", tiers=len(runtime.policy.tiers))
        return True

    @staticmethod
    def _load(path: Path, threats: ThreatSource) -> tuple[Config, Runtime]:
        cfg = cfgmod.load_config(path)
        return cfg, build_runtime(cfg, threats)

    def _watched_paths(self) -> list[Path]:
        if self.config_path is None:
            return []
        return [self.config_path, *self.config.policy.files]

    def _mtimes(self) -> dict[Path, tuple[int, int]]:
        out = {}
        for p in self._watched_paths():
            try:
                st = os.stat(p)
            except OSError:
                out[p] = (-1, -1)
            else:
                out[p] = (st.st_mtime_ns, st.st_size)
        return out

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload.interval)
            current = await asyncio.to_thread(self._mtimes)
            if current != self._watched:
                self._watched = current
                log.info("configuration files changed: reloading")
                await self.reload()
                self._watched = await asyncio.to_thread(self._mtimes)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.clock = now = time.monotonic()
            for conn in list(self.connections):
                conn.expire(now)

    # -- admin ----------------------------------------------------------------------------------
    async def _start_admin(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/edl/{kind}", self._edl)
        self.admin = web.AppRunner(app, access_log=None)
        await self.admin.setup()
        host, port = _split(self.config.admin.listen)
        site = web.TCPSite(self.admin, host, port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None)  # uvloop's Server is no asyncio.Server
        if sockets:
            self.admin_address = sockets[0].getsockname()[:2]

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        waiting = [n for n, s in self.feeds.status().items() if s.enabled and not s.entries]
        if self.ready and self.feeds.ready:
            return web.Response(text="ready\n")
        why = "starting" if not self.ready else f"feeds without data: {', '.join(waiting)}"
        return web.Response(status=503, text=f"not ready: {why}\n")

    def _feed_report(self, report: UpdateReport) -> None:
        # The feeds library logs each update itself; the gateway counts the refused ones.
        if not report.ok:
            self.metrics.count_error("feed_update")

    async def _edl(self, request: web.Request) -> web.Response:
        """The blocklists as plain-text external dynamic lists for firewalls to poll."""
        kind = {"ips": "ip", "domains": "domain", "urls": "url"}.get(request.match_info["kind"])
        if kind is None:
            raise web.HTTPNotFound(text="use /edl/ips, /edl/domains or /edl/urls\n")
        feed = request.query.get("feed")
        names = [n for n in feed.split(",") if n] if feed else None
        try:
            values = await asyncio.to_thread(self.feeds.blocklist_values, kind, names)
        except ValueError as e:
            raise web.HTTPBadRequest(text=f"{e}\n") from e
        return web.Response(body=to_edl(values), content_type="text/plain", charset="utf-8")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
