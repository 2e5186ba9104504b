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
3. ``shutdown()`` (SIGTERM/SIGINT): ``/readyz`` turns 503 at once while the listener keeps
   accepting for ``proxy.shutdown_delay`` (Kubernetes is still sending clients here until every
   node has dropped the pod from the Service), or until ``hurry()`` (a second signal); then
   ``stop()``: stop accepting, let open connections finish for up to ``proxy.drain_timeout``,
   close the rest, flush events, close the exporter.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import structlog
from kubernetes_asyncio.config import ConfigException
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from egressgw import __version__
from egressgw.admin.server import AdminServer, LocalMap
from egressgw.config import model as cfgmod
from egressgw.config import policyobjects
from egressgw.config.kubernetes import PolicyWatcher
from egressgw.config.model import Config
from egressgw.config.reloads import Reloads
from egressgw.config.source import ConfigError
from egressgw.decision.answers import AnswerLog
from egressgw.decision.guard import Guard
from egressgw.decision.names import parse_authority, parse_ip_port
from egressgw.decision.path import NoThreats, Runtime, Services, ThreatSource, explain_flow
from egressgw.decision.policy import Policy
from egressgw.flow import Flow
from egressgw.identity.kubernetes import PodWatcher
from egressgw.identity.podindex import PodIndex
from egressgw.identity.workload import FirstKnown, Inventory, IPNetwork, Workload
from egressgw.kube import Api
from egressgw.listeners.dns import DnsProxy
from egressgw.listeners.explicit import ClientConnection
from egressgw.listeners.transparent import TransparentConnection
from egressgw.metrics import Metrics
from egressgw.net import nft
from egressgw.net.pool import IdlePool
from egressgw.net.rawstream import Listener, Reactor
from egressgw.record.consumers import (
    DnsConsumer,
    DnsEvents,
    DnsMetrics,
    FlowConsumer,
    FlowEvents,
    FlowMetrics,
)
from egressgw.record.dnsevents import DnsExchange
from egressgw.record.egressmap import EgressMap
from egressgw.resolver import Resolver
from egressgw.threats import MatcherThreats
from feeds.refresh import FeedManager, FeedStatus, MissingFeedData, UpdateReport
from feeds.spec import FeedSpec
from siem.exporter import Exporter
from siem.firewall import to_nft_set
from siem.tasks import spawn

log = structlog.get_logger("egressgw")

# How often idle and head timeouts are checked (their resolution).
SWEEP_INTERVAL = 1.0


def build_resolver(cfg: Config) -> Resolver:
    """The resolver of a configuration (blocking: may read the system's resolver settings)."""
    r = cfg.resolver
    return Resolver(
        r.nameservers,
        r.timeout,
        r.cache_size,
        r.min_ttl,
        r.max_ttl,
        r.ipv6,
        r.max_inflight,
        r.max_inflight_per_source,
    )


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
        list(cfg.feeds),
        base,
        cfg.state_dir / "feeds",
        registry=registry,
        on_report=on_report,
        seed_dir=None if cfg.state_seed_dir is None else cfg.state_seed_dir / "feeds",
    )


def feed_readiness(
    statuses: Mapping[str, FeedStatus], required: Set[str], waited: float, timeout: float
) -> tuple[str | None, list[FeedStatus]]:
    """Why feeds keep the gateway unready (or None), and the feeds it serves without data.

    A feed with no data holds readiness up until ``timeout`` seconds have been ``waited``, a
    ``required`` one for as long as it has none.
    """
    missing = [s for s in statuses.values() if s.enabled and not s.has_data]
    if not missing:
        return None, []
    described = describe_feeds(missing)
    if any(s.name in required for s in missing):
        needed = ", ".join(s.name for s in missing if s.name in required)
        return f"required feeds without data: {needed} (all without data: {described})", []
    if waited < timeout:
        left = timeout - waited
        return f"feeds without data: {described}; ready without them in {left:.0f}s", []
    return None, missing


def describe_feeds(statuses: list[FeedStatus]) -> str:
    """The feeds' names, each with its last error if any."""
    return ", ".join(_describe(s) for s in statuses)


def _describe(status: FeedStatus) -> str:
    return status.name if status.last_error is None else f"{status.name} ({status.last_error})"


LISTEN_BACKLOG = 4096


def listen_socket(listen: str, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket for the proxy (``reuse_port``: one of several workers' sockets).

    No TCP_DEFER_ACCEPT: accepting a client as soon as its handshake completes, while its
    request is still on the way, measured 9-13% more tunnels/s on loopback (the accept overlaps
    the client's send) at about the same CPU per tunnel (docs/decisions.md).
    """
    host, port = _split(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # The kernel spreads new connections over every listening socket of the group.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted sockets inherit it: no setsockopt per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def missing_egress_ips(egress_ips: dict[str, Any]) -> list[str]:
    """Each ``egress_ips`` address this node does not have, as a reason (a bind is the test)."""
    out = []
    for namespace, ip in sorted(egress_ips.items()):
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((str(ip), 0))
            except OSError as e:
                out.append(f"{ip} ({namespace}) is not an address of this node: {_reason(e)}")
    return out


def _reason(e: OSError) -> str:
    # The event loop's bind error repeats the address in its own words: the errno says it all.
    return os.strerror(e.errno) if e.errno else str(e)


def admin_token(cfg: Config, base: Path) -> str | None:
    """The admin.auth token, read from its file (a mounted Secret) when the server starts."""
    auth = cfg.admin.auth
    if auth is None:
        return None
    path = auth.token_file if auth.token_file.is_absolute() else base / auth.token_file
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise OSError(f"admin.auth.token_file {path}: {_reason(e)}") from e
    if not token:
        raise OSError(f"admin.auth.token_file {path}: empty")
    return token


async def load_node_firewall(
    feeds: FeedManager, table: str, count_error: Callable[[str], None]
) -> bool:
    """Load the feeds' blocklisted IPs into the node table's sets; False if not loaded."""
    try:
        values = await asyncio.to_thread(feeds.blocklist_values, "ip", None)
        script = to_nft_set(table, "blocked", values)
        await asyncio.to_thread(nft.apply, script)
    except MissingFeedData as e:
        log.info("node firewall kept: feeds without data", feeds=sorted(e.feeds))
        return False
    except (nft.NftError, ValueError, OSError) as e:
        count_error("node_firewall")
        log.error("node firewall not refreshed", error=str(e))
        return False
    log.info("node firewall refreshed", table=f"inet {table}", entries=len(values))
    return True


def _split(listen: str) -> tuple[str, int]:
    ip, port = parse_ip_port(listen)
    return str(ip), port


def restart_only(running: Config, loaded: Config) -> list[tuple[str, object, object]]:
    """The node-mode settings a reload cannot apply that differ: (key, running, loaded)."""
    pairs = [
        ("transparent.listen", running.transparent.listen, loaded.transparent.listen),
        ("dns.listen", running.dns.listen, loaded.dns.listen),
        ("dns.max_records", running.dns.max_records, loaded.dns.max_records),
        (
            "dns.max_records_per_client",
            running.dns.max_records_per_client,
            loaded.dns.max_records_per_client,
        ),
        ("node", running.node, loaded.node),
    ]
    return [(key, str(old), str(new)) for key, old, new in pairs if old != new]


class EventExport(Protocol):
    """Where a gateway's ECS events go: the exporter, or a worker's channel to it."""

    def submit(self, event: Mapping[str, Any]) -> None:
        """Queue one event (cheap, never blocks)."""
        ...

    async def start(self) -> None:
        """Open before the first event."""
        ...

    async def flush(self) -> None:
        """Return once every event submitted so far is handed on (durable, or sent)."""
        ...

    async def aclose(self) -> None:
        """Hand on every event submitted so far, then close."""
        ...


@dataclass(frozen=True)
class WorkerRole:
    """A gateway run as one of several worker processes (``proxy.workers``; egressgw.workers).

    Its events go to ``events`` (the supervisor's exporter, over the worker's channel); it
    listens on the addresses the supervisor reserved (``proxy``, ``transparent``), with
    ``SO_REUSEPORT``; the supervisor serves the admin pages, fetches the feeds (the worker
    reads their stored state when told) and watches the configuration files.
    """

    events: EventExport
    listen: Mapping[str, str]
    # Told the feeds the policy resources (ThreatFeed) define whenever they change: the
    # supervisor fetches them, as it fetches the configured ones.
    resource_feeds: Callable[[list[FeedSpec]], None] = lambda specs: None


class FeedsReadiness:
    """Readiness as the feeds see it, for the process that fetches them (the gateway, or the
    supervisor of its workers): feeds without data hold it for ``readiness.feeds_timeout``
    after the start, required ones (configured or ThreatFeed resources) for as long as that."""

    config: Config
    feeds: FeedManager
    resource_feeds: dict[str, FeedSpec]
    started_at: float
    ready: bool
    stopping: bool

    def _feed_specs(self) -> Iterable[FeedSpec]:
        # ThreatFeed resources may be required too: their specs join the configuration's.
        return (*self.config.feeds, *self.resource_feeds.values())

    def readiness_warning(self) -> str | None:
        """What a ready gateway serves without: feeds it stopped waiting for."""
        without = self._feed_readiness()[1]
        if not without:
            return None
        timeout = self.config.readiness.feeds_timeout
        return f"serving without data of feeds {describe_feeds(without)}, none after {timeout:g}s"

    def feeds_served_without_data(self) -> list[str]:
        """Feeds readiness stopped waiting for, while they still have no data."""
        if not self.ready or self.stopping:
            return []
        return [s.name for s in self._feed_readiness()[1]]

    def _feed_readiness(self) -> tuple[str | None, list[FeedStatus]]:
        if self.feeds.ready:  # the common case, without building every feed's status
            return None, []
        required = {f.name for f in self._feed_specs() if f.required}
        waited = time.monotonic() - self.started_at
        timeout = self.config.readiness.feeds_timeout
        return feed_readiness(self.feeds.status(), required, waited, timeout)


class Gateway(FeedsReadiness):
    """The gateway process's state; the proxy's connections see it as their Hub."""

    def __init__(
        self, cfg: Config, config_path: Path | None = None, worker: WorkerRole | None = None
    ) -> None:
        self.config = cfg
        self.config_path = config_path
        self.worker = worker
        self.limits = cfg.proxy
        self.peek_timeout = cfg.transparent.peek_timeout
        self.egress_ips: Mapping[str, Any] = cfg.egress_ips
        # Idle absolute-form upstreams, shared by every client connection (forward.py).
        self.upstreams: IdlePool[Any] = IdlePool()
        self._size_upstreams(cfg)
        self.connections: set[ClientConnection | TransparentConnection] = set()
        self.per_source: dict[str, int] = {}  # open client connections by source address
        self.metrics = Metrics(CollectorRegistry(), lambda: len(self.connections))
        base = config_path.parent if config_path else Path.cwd()
        self.base_dir = base
        # A worker's feed metrics would repeat the supervisor's in every worker: kept aside.
        feed_registry = self.metrics.registry if worker is None else CollectorRegistry()
        self.feeds = build_feeds(cfg, base, feed_registry, self._feed_report)
        self.threats = MatcherThreats(lambda: self.feeds.matcher)
        self.static_inventory = cfgmod.build_inventory(cfg)
        self.inventory: Inventory = self.static_inventory
        # Pods from the Kubernetes API, asked first; the static CIDRs answer for the rest.
        self.pods: PodIndex | None = None
        self.pod_watcher: PodWatcher | None = None
        self.kube_api: Api | None = None
        if cfg.identity.kubernetes is not None:
            self.pods = PodIndex()
            self.inventory = FirstKnown(self.pods, self.static_inventory)
        services = Services(build_resolver(cfg), self.inventory, self.threats)
        self.runtime = build_runtime(cfg, services)
        # Policy resources (policy.kubernetes): the files' policy they join, the objects as last
        # watched, what was judged of them, and the feeds ThreatFeeds define.
        self.file_policy: Policy = self.runtime.policy
        self.policy_watcher: PolicyWatcher | None = None
        self.policy_objects: list[Mapping[str, Any]] = []
        self.policy_judged: policyobjects.Judged | None = None
        self.resource_feeds: dict[str, FeedSpec] = {}
        self.exporter: EventExport = (
            Exporter.from_config(cfg.spool, list(cfg.sinks), base, registry=self.metrics.registry)
            if worker is None
            else worker.events
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
        self.stopping = False
        self.started_at = time.monotonic()  # set again by start(): the readiness timeout's origin
        self._hurry = asyncio.Event()
        # Configured egress source addresses this node does not have (checked at start).
        self.egress_problems: list[str] = []
        self.server: Listener | None = None
        self.transparent: Listener | None = None  # transparent.listen
        self.transparent_address: tuple[str, int] | None = None
        self.reactor: Reactor  # set by start(), with the loop
        self.admin = AdminServer(self, self.metrics.registry)
        self.metrics.registry.register(ReadinessCollector(self))
        # Told about every flow, in order; the egress map and other views join this list.
        self.consumers: list[FlowConsumer] = [
            FlowMetrics(self.metrics),
            FlowEvents(self.exporter.submit, self.observer),
        ]
        self.egress_map: EgressMap | None = None
        # What the admin server reads; a worker's map is read by its supervisor, which asks
        # every worker and merges their answers.
        self.map_source: LocalMap | None = None
        if cfg.admin.map.enabled:
            m = cfg.admin.map
            self.egress_map = EgressMap(
                windows=m.windows, max_edges=m.max_edges, recent=m.recent_flows
            )
            self.map_source = LocalMap(self.egress_map)
            self.consumers.append(self.egress_map)
        self.dns_consumers: list[DnsConsumer] = [
            DnsMetrics(self.metrics),
            DnsEvents(self.exporter.submit, self.observer),
        ]
        # The answers the DNS proxy served, per client: what the transparent listener asks.
        self.answers = AnswerLog(cfg.dns.max_records, cfg.dns.max_records_per_client)
        self.dns: DnsProxy | None = None
        if cfg.dns.listen is not None:
            mark = cfg.node.exempt_mark if cfg.node.enabled else None
            self.dns = DnsProxy(self, cfg.dns, self.answers, mark)
        # The gateway's own connections carry the node rules' exemption mark (node mode).
        self.exempt_mark: int | None = cfg.node.exempt_mark if cfg.node.enabled else None
        # The node's nftables set of blocklisted IPs, refreshed after every feed update.
        self.node_firewall = cfg.node.enabled and cfg.node.firewall and worker is None
        self._firewall_lock = asyncio.Lock()
        self._feeds_lock = asyncio.Lock()
        self.proxy_address: tuple[str, int] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._drained: asyncio.Event | None = None
        self._reload_lock = asyncio.Lock()
        self.reload_queue = Reloads(
            self._watched_paths, self.reload, lambda: self.config.reload.interval
        )

    def _size_upstreams(self, cfg: Config) -> None:
        """The upstream pool's bounds from the configuration (at start and on reload)."""
        pool, proxy = self.upstreams, cfg.proxy
        pool.max_idle = proxy.max_idle_upstreams
        pool.max_idle_per_key = proxy.max_idle_upstreams_per_destination
        pool.idle_timeout = proxy.upstream_idle_timeout

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

    def dns_answered(self, x: DnsExchange) -> None:
        """Tell every DNS consumer about an exchange of the DNS proxy."""
        for consumer in self.dns_consumers:
            consumer.dns_answered(x)

    def count_error(self, kind: str) -> None:
        """Count an error by kind."""
        self.metrics.count_error(kind)

    def tunnel_opened(self) -> None:
        """A tunnel started."""
        self.metrics.tunnels += 1

    def tunnel_closed(self) -> None:
        """A tunnel ended."""
        self.metrics.tunnels -= 1

    def connection_opened(self, conn: ClientConnection | TransparentConnection) -> str | None:
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

    def connection_closed(self, conn: ClientConnection | TransparentConnection) -> None:
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
        self.started_at = time.monotonic()
        proxy_listen, admin_listen = self.config.proxy.listen, self.config.admin.listen
        metrics_listen = self.config.admin.metrics_listen
        worker = self.worker
        transparent_listen = self.config.transparent.listen
        if worker is not None:  # the addresses the supervisor reserved (port 0 resolved)
            proxy_listen = worker.listen["proxy"]
            transparent_listen = worker.listen.get("transparent", transparent_listen)
        try:
            sock = listen_socket(proxy_listen, reuse_port=worker is not None)
        except OSError as e:
            raise OSError(f"proxy.listen {proxy_listen}: {_reason(e)}") from e
        socks = [sock]
        try:
            transparent_sock: socket.socket | None = None
            if transparent_listen is not None:
                try:
                    transparent_sock = listen_socket(
                        transparent_listen, reuse_port=worker is not None
                    )
                except OSError as e:
                    raise OSError(f"transparent.listen {transparent_listen}: {_reason(e)}") from e
                socks.append(transparent_sock)
            if worker is None:
                try:
                    await self.admin.start(
                        admin_listen, self._admin_token(), metrics=metrics_listen is None
                    )
                except OSError as e:
                    raise OSError(f"admin.listen {admin_listen}: {_reason(e)}") from e
            if metrics_listen is not None and worker is None:
                try:
                    await self.admin.start_metrics(metrics_listen)
                except OSError as e:
                    raise OSError(f"admin.metrics_listen {metrics_listen}: {_reason(e)}") from e
            if self.dns is not None:
                try:
                    await self.dns.start(str(self.config.dns.listen))
                except OSError as e:
                    raise OSError(f"dns.listen {self.config.dns.listen}: {_reason(e)}") from e
            await self.exporter.start()
            if worker is None:
                await self.feeds.start()
            else:  # the supervisor fetches; a worker serves what it stored
                await asyncio.to_thread(self.feeds.load_state)
            await self._start_kubernetes()
        except BaseException:
            for s in socks:
                s.close()
            await self._close_services()
            raise
        self.threats.refresh()  # the feeds' stored data, loaded by start()
        self.egress_problems = await asyncio.to_thread(missing_egress_ips, self.config.egress_ips)
        for problem in self.egress_problems:
            log.error("egress_ips: not ready", problem=problem)
        if self.node_firewall:
            self._tasks.append(spawn(self.refresh_firewall(), name="node-firewall"))
        missing = [n for n, s in self.feeds.status().items() if s.enabled and not s.has_data]
        if missing and worker is None:
            # Feeds with no stored data are fetched now rather than after the startup spread,
            # so /readyz turns ready as soon as they are in.
            self._tasks.append(spawn(self.feeds.update_now(missing), name="feeds-first-fetch"))
        self.reactor = Reactor(loop)
        self.server = Listener(
            self.reactor, sock, lambda: ClientConnection(self), on_error=self.metrics.count_error
        )
        self.server.start()
        self.proxy_address = self.server.address
        if transparent_sock is not None:
            self.transparent = Listener(
                self.reactor,
                transparent_sock,
                lambda: TransparentConnection(self),
                on_error=self.metrics.count_error,
            )
            self.transparent.start()
            self.transparent_address = self.transparent.address
        self._tasks.append(spawn(self._sweep(), name="idle-sweeper"))
        if self.config_path is not None and self.config.reload.watch and worker is None:
            self._tasks.append(spawn(self.reload_queue.watch(), name="config-watcher"))
        self.ready = True
        log.info(
            "gateway started",
            proxy=self.config.proxy.listen,
            admin=self.config.admin.listen,
            policy=[str(p) for p in self.config.policy.files] or "allow all (embedded)",
            tiers=len(self.runtime.policy.tiers),
            dns=self.config.dns.listen,
            transparent=self.config.transparent.listen,
        )
        for warning in cfgmod.unbuilt(self.config) if worker is None else ():
            log.warning(warning)  # the supervisor says it once for all workers

    async def shutdown(self) -> None:
        """Turn unready, keep accepting for ``proxy.shutdown_delay`` (or until hurried), stop."""
        self.stopping = True
        delay = self.limits.shutdown_delay
        if delay > 0 and self.server is not None:
            log.info("shutting down: unready, accepting for the shutdown delay", delay=delay)
            try:
                async with asyncio.timeout(delay):
                    await self._hurry.wait()
            except TimeoutError:
                pass
        await self.stop()

    def hurry(self) -> None:
        """End the shutdown delay now (a second SIGTERM or SIGINT)."""
        if self.stopping and not self._hurry.is_set():
            log.info("shutdown delay cut short")
            self._hurry.set()

    async def _start_kubernetes(self) -> None:
        """Open the API client and start watching pods (identity.kubernetes)."""
        kube = self.config.identity.kubernetes
        if kube is None or self.pods is None:
            return
        node = None
        if kube.own_node:
            node = os.environ.get("NODE_NAME")
            if not node:
                raise OSError("identity.kubernetes.own_node: NODE_NAME is not set")
        self.kube_api = Api(kube.kubeconfig)
        try:
            await self.kube_api.open()
        except (ConfigException, OSError) as e:
            raise OSError(f"identity.kubernetes: no API configuration: {e}") from e
        self.pod_watcher = PodWatcher(
            self.pods, self.kube_api, kube.namespaces, node, watch_timeout=kube.watch_timeout
        )
        self._tasks.append(spawn(self.pod_watcher.run(), name="pod-watch"))
        if self.config.policy.kubernetes:
            self.policy_watcher = PolicyWatcher(
                self.kube_api, self.apply_policy_objects, watch_timeout=kube.watch_timeout
            )
            self._tasks.append(spawn(self.policy_watcher.run(), name="policy-watch"))

    async def apply_policy_objects(
        self, objects: list[Mapping[str, Any]]
    ) -> Mapping[policyobjects.Key, policyobjects.Verdict]:
        """Judge the policy resources, serve their feeds and swap in the combined policy."""
        async with self._reload_lock:
            self.policy_objects = objects
            judged = await self._judge_objects(self.file_policy, self.config)
            self.runtime = Runtime.over(self.runtime.services, judged.policy, self.runtime.guard)
        refused = sum(not v.accepted for v in judged.verdicts.values())
        log.info(
            "policy resources applied",
            objects=len(judged.verdicts),
            refused=refused,
            feeds=len(judged.feeds),
            rules=sum(len(t.rules) for t in judged.policy.tiers),
        )
        return judged.verdicts

    async def _judge_objects(self, files: Policy, cfg: Config) -> policyobjects.Judged:
        """Judge the last watched objects against ``files`` and serve the feeds they define."""
        last_good = self.policy_judged.in_force if self.policy_judged is not None else None
        judged = policyobjects.judge(
            self.policy_objects, files, {f.name for f in cfg.feeds}, last_good
        )
        wanted = {f.name: f for f in judged.feeds}
        before = dict(self.resource_feeds)
        for name in [n for n in self.resource_feeds if n not in wanted]:
            await self.feeds.remove(name)
            del self.resource_feeds[name]
        for name, spec in wanted.items():
            if self.resource_feeds.get(name) != spec:
                await self.feeds.add(spec)
                self.resource_feeds[name] = spec
                if not self.feeds.status()[name].has_data and self.worker is None:
                    spawn(self.feeds.update_now([name]), name=f"feed-first-fetch-{name}")
        if self.worker is not None and self.resource_feeds != before:
            self.worker.resource_feeds(list(self.resource_feeds.values()))
        self.threats.refresh()
        self.policy_judged = judged
        return judged

    async def stop(self) -> None:
        """Stop accepting, drain open connections, flush events."""
        self.stopping = True
        self.ready = False
        if self.server is not None:
            self.server.close()
        if self.transparent is not None:
            self.transparent.close()
        if self.dns is not None:
            self.dns.close()
        if self.connections:
            self._drained = asyncio.Event()
            try:
                async with asyncio.timeout(self.limits.drain_timeout):
                    await self._drained.wait()
            except TimeoutError:
                log.warning("drain timeout: closing open connections", open=len(self.connections))
        for conn in list(self.connections):
            conn.close("gateway shutdown: proxy.drain_timeout passed")
        self.upstreams.close()
        await asyncio.sleep(0)  # let connection_lost callbacks record the flows' end events
        if self.server is not None:
            self.reactor.close()
        await self._close_services()
        log.info("gateway stopped")

    async def _close_services(self) -> None:
        """Stop background tasks, feeds, admin server and exporter (each only if started)."""
        for task in self._tasks:
            task.cancel()
        if self.dns is not None:
            self.dns.close()
        self.reload_queue.cancel()
        await self.feeds.stop()
        # After the connections: nothing waits on a lookup any more; any still running ends.
        await self.runtime.resolver.aclose()
        await self.admin.stop()
        await self.exporter.aclose()
        if self.kube_api is not None:
            await self.kube_api.aclose()

    def request_reload(self, by: str) -> None:
        """Ask for a reload (``by``: ``SIGHUP``, ``watch``); coalesced with any already asked."""
        self.reload_queue.request(by)

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
            or cfg.admin.metrics_listen != self.config.admin.metrics_listen
            or cfg.admin.auth != self.config.admin.auth
        ):
            log.warning("listen addresses change only on restart")
        if cfg.sinks != self.config.sinks or cfg.spool != self.config.spool:
            log.warning("sinks and spool change only on restart")
        if cfg.feeds != self.config.feeds or cfg.state_dir != self.config.state_dir:
            log.warning("feed definitions change only on restart")
        if cfg.identity.kubernetes != self.config.identity.kubernetes:
            log.warning("identity.kubernetes changes only on restart")
        for key, old, new in restart_only(self.config, cfg):
            log.warning(f"{key} changes only on restart", running=old, configured=new)
        new_resolver = runtime.resolver is not self.runtime.resolver
        files = runtime.policy
        if self.policy_watcher is not None:
            # The resources join the new files' tiers: judged again, their status rewritten.
            judged = await self._judge_objects(files, cfg)
            runtime = Runtime.over(runtime.services, judged.policy, runtime.guard)
            self.policy_watcher.poke()
        # Inventory and runtime change together, with no flow decided in between.
        if identities is not None:
            self.static_inventory.update(identities)
        self.config = cfg
        self.limits = cfg.proxy
        self.peek_timeout = cfg.transparent.peek_timeout
        self.egress_ips = cfg.egress_ips
        if self.dns is not None:
            self.dns.configure(cfg.dns)
        self._size_upstreams(cfg)
        self.file_policy = files
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
        if cfg.identity.static != running.identity.static:
            identities = cfgmod.build_inventory(cfg).entries
        return cfg, build_runtime(cfg, services), identities

    def _watched_paths(self) -> list[Path]:
        if self.config_path is None:
            return []
        return [self.config_path, *self.config.policy.files]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.clock = now = time.monotonic()
            for conn in list(self.connections):
                conn.expire(now)
            self.upstreams.expire(now)
            if self.egress_map is not None:
                self.egress_map.sweep(now)  # walks its edges once a minute at most

    # -- what the admin server reads -------------------------------------------------------------
    def _admin_token(self) -> str | None:
        return admin_token(self.config, self.base_dir)

    async def explain(self, source: str, target: str, protocol: str) -> tuple[bool, list[str]]:
        """Decide a flow now with the runtime in force, as ``egressgw explain`` prints it.

        The same resolver (and its cache), feeds matcher and policy as the proxy's flows; no
        event is written and no metric counted.
        """
        host, port = parse_authority(target)
        flow = Flow(ipaddress.ip_address(source), 0, time.time(), time.monotonic())
        flow.host, flow.port, flow.protocol = host, port, protocol  # type: ignore[assignment]
        verdict, lines = await explain_flow(self.runtime, flow)
        return verdict.allowed, lines

    def readiness(self) -> str | None:
        """None when serving, else why not (starting, shutting down, feeds without data)."""
        if self.stopping:
            return "shutting down"
        if not self.ready:
            return "starting"
        if self.pod_watcher is not None and not self.pod_watcher.ready:
            return "kubernetes: pods not listed yet"
        if self.policy_watcher is not None and not self.policy_watcher.ready:
            return "kubernetes: policy resources not listed yet"
        if self.egress_problems:
            return f"egress_ips: {'; '.join(self.egress_problems)}"
        if self.worker is not None:
            return None  # the supervisor judges the feeds it fetches
        return self._feed_readiness()[0]

    async def reload_feeds(self) -> None:
        """Serve the feeds' data as stored now (a worker, after the supervisor's update)."""
        async with self._feeds_lock:  # one parse at a time: a burst of updates reads once more
            await asyncio.to_thread(self.feeds.load_state)
        self.threats.refresh()

    def blocklist_values(self, kind: str, feeds: list[str] | None) -> list[str]:
        """The feeds' blocked values of one kind; MissingFeedData while one has none yet."""
        return self.feeds.blocklist_values(kind, feeds)

    async def refresh_firewall(self) -> bool:
        """Load the feeds' blocklisted IPs into the node table's sets; False if not loaded.

        Never with feed data missing: an empty set would let through what the last one dropped.
        """
        async with self._firewall_lock:
            return await load_node_firewall(
                self.feeds, self.config.node.table, self.metrics.count_error
            )

    def _feed_report(self, report: UpdateReport) -> None:
        # Called right after an update swapped the matcher: the next flow is decided with it,
        # and outcomes cached with the old one are dropped (the threat source's generation).
        self.threats.refresh()
        if self.node_firewall and report.ok:
            spawn(self.refresh_firewall(), name="node-firewall")
        # The feeds library logs each update itself; the gateway counts the refused ones.
        if not report.ok:
            self.metrics.count_error("feed_update")


class Readiness(Protocol):
    """What says whether a process is ready: the gateway, or the supervisor of its workers."""

    def readiness(self) -> str | None:
        """Why /readyz answers 503, or None."""
        ...

    def feeds_served_without_data(self) -> list[str]:
        """Feeds readiness stopped waiting for, while they still have no data."""
        ...


class ReadinessCollector:
    """``egressgw_ready`` and ``egressgw_ready_without_feed_data{feed}``, read at scrape time."""

    def __init__(self, gateway: Readiness) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gw = self.gateway
        yield GaugeMetricFamily(
            "egressgw_ready", "1 when /readyz answers 200", value=float(gw.readiness() is None)
        )
        without = GaugeMetricFamily(
            "egressgw_ready_without_feed_data",
            "1 for each feed the gateway serves without, readiness having stopped waiting for it",
            labels=["feed"],
        )
        for name in gw.feeds_served_without_data():
            without.add_metric([name], 1)
        yield without
