"""The running gateway: listeners, admin server, events, reload and graceful shutdown.

Lifecycle:

1. ``Gateway.start()``: bind the proxy's socket and start the admin server first, so a taken
   address fails before anything else runs and the error names it (``proxy.listen ...``); then
   open the event exporter (its spool is recovered first) and the feeds, and accept. A failure
   closes whatever had started. ``/readyz`` turns ready once config, policy, identity and feeds
   are loaded and the listener accepts.
2. ``reload()`` (SIGHUP, or a changed configuration or policy file): load and validate
   everything into a new Runtime off the event loop, then swap it in whole; on any error keep the
   running one and log every error with file, line and key. Requests go through
   ``request_reload``, which logs each and runs one reload at a time: requests arriving during a
   reload make one more run after it, and the file watcher asks for none when the files are as
   the last reload read them (a SIGHUP after an edit reloads once, not once per trigger). A
   reload replaces policy and guard; the long-lived services stay (the resolver and its cache
   unless its settings changed; the inventory, updated in place when the static identities
   changed; the feeds).
3. ``stop()`` (SIGTERM/SIGINT): stop accepting, let open connections finish for up to
   ``proxy.drain_timeout``, close the rest, flush events, close the exporter.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from egressgw import __version__
from egressgw.admin.server import AdminServer
from egressgw.config import model as cfgmod
from egressgw.config.model import Config
from egressgw.config.source import ConfigError
from egressgw.decision.guard import Guard
from egressgw.decision.names import parse_ip_port
from egressgw.decision.path import NoThreats, Runtime, Services, ThreatSource
from egressgw.flow import Flow
from egressgw.identity.workload import IPNetwork, Workload
from egressgw.listeners.explicit import ClientConnection
from egressgw.metrics import Metrics
from egressgw.net.rawstream import Listener, Reactor
from egressgw.record.consumers import FlowConsumer, FlowEvents, FlowMetrics
from egressgw.resolver import Resolver
from egressgw.threats import MatcherThreats
from feeds.refresh import FeedManager, UpdateReport
from siem.exporter import Exporter
from siem.tasks import spawn

log = structlog.get_logger("egressgw")

# How often idle and head timeouts are checked (their resolution).
SWEEP_INTERVAL = 1.0


def build_resolver(cfg: Config) -> Resolver:
    """The resolver of a configuration (blocking: may read the system's resolver settings)."""
    r = cfg.resolver
    return Resolver(r.nameservers, r.timeout, r.cache_size, r.min_ttl, r.max_ttl, r.ipv6)


def build_services(cfg: Config, threats: ThreatSource | None = None) -> Services:
    """The long-lived services of a configuration: resolver, static inventory, threat source."""
    return Services(build_resolver(cfg), cfgmod.build_inventory(cfg), threats or NoThreats())


def build_runtime(cfg: Config, services: Services) -> Runtime:
    """Load policy files and build this configuration's decision state (blocking: file reads)."""
    pol = cfgmod.load_policy(cfg.policy.files, {f.name for f in cfg.feeds})
    return Runtime.over(services, pol, Guard(cfg.guard.allow, cfg.guard.enabled))


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


def _reason(e: OSError) -> str:
    # The event loop's bind error repeats the address in its own words: the errno says it all.
    return os.strerror(e.errno) if e.errno else str(e)


def _split(listen: str) -> tuple[str, int]:
    ip, port = parse_ip_port(listen)
    return str(ip), port


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
        self.inventory = cfgmod.build_inventory(cfg)
        services = Services(build_resolver(cfg), self.inventory, self.threats)
        self.runtime = build_runtime(cfg, services)
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
        self.admin = AdminServer(self, self.metrics.registry)
        # Told about every flow, in order; the egress map and other views join this list.
        self.consumers: list[FlowConsumer] = [
            FlowMetrics(self.metrics),
            FlowEvents(self.exporter.submit, self.observer),
        ]
        self.proxy_address: tuple[str, int] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._drained: asyncio.Event | None = None
        self._watched = self._mtimes()
        self._reload_lock = asyncio.Lock()
        self._reload_requests: set[str] = set()
        self._reloader: asyncio.Task[None] | None = None

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """Where the admin server listens, once started."""
        return self.admin.address

    # -- Hub ------------------------------------------------------------------------------------
    def flow_decided(self, flow: Flow) -> None:
        """Tell every consumer the flow was decided."""
        for consumer in self.consumers:
            consumer.flow_decided(flow)

    def flow_ended(self, flow: Flow) -> None:
        """Tell every consumer the flow ended."""
        for consumer in self.consumers:
            consumer.flow_ended(flow)

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
        """Bind proxy and admin listeners, start exporter and feeds, then accept."""
        loop = self.loop = asyncio.get_running_loop()
        proxy_listen, admin_listen = self.config.proxy.listen, self.config.admin.listen
        try:
            sock = listen_socket(proxy_listen)
        except OSError as e:
            raise OSError(f"proxy.listen {proxy_listen}: {_reason(e)}") from e
        try:
            try:
                await self.admin.start(admin_listen)
            except OSError as e:
                raise OSError(f"admin.listen {admin_listen}: {_reason(e)}") from e
            await self.exporter.start()
            await self.feeds.start()
        except BaseException:
            sock.close()
            await self._close_services()
            raise
        self.threats.refresh()  # the feeds' stored data, loaded by start()
        missing = [n for n, s in self.feeds.status().items() if s.enabled and not s.has_data]
        if missing:
            # Feeds with no stored data are fetched now rather than after the startup spread,
            # so /readyz turns ready as soon as they are in.
            self._tasks.append(spawn(self.feeds.update_now(missing), name="feeds-first-fetch"))
        self.reactor = Reactor(loop)
        self.server = Listener(
            self.reactor, sock, lambda: ClientConnection(self), on_error=self.metrics.count_error
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
            conn.close("gateway shutdown: proxy.drain_timeout passed")
        await asyncio.sleep(0)  # let connection_lost callbacks record the flows' end events
        if self.server is not None:
            self.reactor.close()
        await self._close_services()
        log.info("gateway stopped")

    async def _close_services(self) -> None:
        """Stop background tasks, feeds, admin server and exporter (each only if started)."""
        for task in self._tasks:
            task.cancel()
        if self._reloader is not None:
            self._reloader.cancel()
        await self.feeds.stop()
        # After the connections: nothing waits on a lookup any more; any still running ends.
        await self.runtime.resolver.aclose()
        await self.admin.stop()
        await self.exporter.aclose()

    def request_reload(self, by: str) -> None:
        """Ask for a reload (``by``: ``SIGHUP``, ``watch``); coalesced with any already asked."""
        log.info("reload requested", by=by)
        self._reload_requests.add(by)
        if self._reloader is None or self._reloader.done():
            self._reloader = spawn(self._run_reloads(), name="reload")

    async def _run_reloads(self) -> None:
        while self._reload_requests:
            by, self._reload_requests = self._reload_requests, set()
            # What this reload reads: the watcher compares the files with it, not with the last
            # time it looked, so it does not ask again for an edit a SIGHUP already applied.
            current = await asyncio.to_thread(self._mtimes)
            if by == {"watch"} and current == self._watched:
                continue
            self._watched = current
            await self.reload()

    async def reload(self) -> bool:
        """Load configuration and policy again; swap them in whole, or keep the running ones."""
        if self.config_path is None:
            return False
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> bool:
        assert self.config_path is not None
        try:
            cfg, runtime, identities = await asyncio.to_thread(
                self._load, self.config_path, self.config, self.runtime.services
            )
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
        new_resolver = runtime.resolver is not self.runtime.resolver
        # Inventory and runtime change together, with no flow decided in between.
        if identities is not None:
            self.inventory.update(identities)
        self.config = cfg
        self.limits = cfg.proxy
        self.runtime = runtime
        self.metrics.count_reload("ok")
        log.info(
            "configuration reloaded",
            tiers=len(runtime.policy.tiers),
            resolver="new" if new_resolver else "kept",
            identities="updated" if identities is not None else "kept",
        )
        return True

    @staticmethod
    def _load(
        path: Path, running: Config, services: Services
    ) -> tuple[Config, Runtime, tuple[tuple[IPNetwork, Workload], ...] | None]:
        """The new configuration, its runtime over the kept services, and new identities if any."""
        cfg = cfgmod.load_config(path)
        if cfg.resolver != running.resolver:
            # Only new resolver settings drop the DNS cache.
            services = replace(services, resolver=build_resolver(cfg))
        identities = None
        if cfg.identity != running.identity:
            identities = cfgmod.build_inventory(cfg).entries
        return cfg, build_runtime(cfg, services), identities

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
            await self._check_files()

    async def _check_files(self) -> None:
        """Ask for a reload when the watched files differ from what the last reload read."""
        current = await asyncio.to_thread(self._mtimes)
        if current != self._watched and "watch" not in self._reload_requests:
            log.info("configuration files changed")
            self.request_reload("watch")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.clock = now = time.monotonic()
            for conn in list(self.connections):
                conn.expire(now)

    # -- what the admin server reads -------------------------------------------------------------
    def readiness(self) -> str | None:
        """None when serving with every enabled feed loaded, else why not."""
        if not self.ready:
            return "starting"
        if not self.feeds.ready:
            waiting = [n for n, s in self.feeds.status().items() if s.enabled and not s.has_data]
            return f"feeds without data: {', '.join(waiting)}"
        return None

    def blocklist_values(self, kind: str, feeds: list[str] | None) -> list[str]:
        """The feeds' blocked values of one kind; MissingFeedData while one has none yet."""
        return self.feeds.blocklist_values(kind, feeds)

    def _feed_report(self, report: UpdateReport) -> None:
        # Called right after an update swapped the matcher: the next flow is decided with it,
        # and outcomes cached with the old one are dropped (the threat source's generation).
        self.threats.refresh()
        # The feeds library logs each update itself; the gateway counts the refused ones.
        if not report.ok:
            self.metrics.count_error("feed_update")
