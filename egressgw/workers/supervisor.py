"""The supervisor: ``egressgw run`` with ``proxy.workers`` above 1.

Lifecycle:

1. ``start()``: reserve the listeners' addresses (bound with ``SO_REUSEPORT``, never listening,
   so no connection lands on them: a port 0 resolves to one port every worker binds, and an
   address in use is reported once, naming its key), start the admin server, the exporter (its
   spool recovered) and the feeds, then the workers: each gets one end of a Unix socket pair
   and binds the reserved addresses itself. It returns once every worker said ``started``; a
   worker that exits before that fails the start with its exit status.
2. While running: every event frame a worker sends is handed to the one exporter as it came
   (already JSON); a feed update tells every worker to read the feeds' stored state again; a
   reload (SIGHUP, a changed file, as in one process) is validated here and then asked of every
   worker, and counted once; ``/metrics`` asks each worker for its exposition and serves the
   sums beside the supervisor's own; the egress map's API asks each worker for its map and
   answers with them merged (``maps.py``); ``/readyz`` is ready when every worker says it is and the
   feeds are (as in one process). A worker that exits unasked is started again after a backoff
   (``egressgw_worker_restarts_total``); its open connections were lost with it, its events
   up to its death were in the socket and are read to the end. Every ``LIVENESS_INTERVAL`` (or
   half the timeout, if shorter) the supervisor asks each worker for a reply its loop gives at
   once; a worker that gives none within ``proxy.worker_liveness_timeout`` (a loop stuck in a
   call, a stopped process) is killed and started again like a crashed one
   (``egressgw_worker_unresponsive_total``).
3. ``shutdown()`` (SIGTERM): unready at once, every worker told to shut down (each accepts for
   ``proxy.shutdown_delay``, drains, exits); a second signal hurries them. Once all have exited
   and their channels are read to the end, the exporter is flushed and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from egressgw.admin.server import AdminServer
from egressgw.app import (
    FeedsReadiness,
    ReadinessCollector,
    admin_token,
    build_feeds,
    load_node_firewall,
    restart_only,
)
from egressgw.config import model as cfgmod
from egressgw.config.model import Config
from egressgw.config.reloads import Reloads
from egressgw.config.source import ConfigError
from egressgw.decision.names import parse_ip_port
from egressgw.workers.aggregate import aggregate
from egressgw.workers.channel import EVENT, Decoder, FrameError, decode_message, message
from egressgw.workers.maps import MergedMap
from feeds.refresh import UpdateReport
from feeds.spec import FeedSpec
from siem.exporter import Exporter
from siem.tasks import spawn

log = structlog.get_logger("egressgw.supervisor")

RESTART_BACKOFF = (0.5, 30.0)  # first and longest wait before starting a crashed worker again
STABLE_AFTER = 30.0  # a worker that ran this long restarts after the first wait again
REQUEST_TIMEOUT = 5.0  # a worker's answer to metrics, explain
RELOAD_TIMEOUT = 60.0  # a worker's reload (policy files, a new resolver)
STOP_MARGIN = 10.0  # beyond shutdown_delay + drain_timeout before a worker is killed
LIVENESS_INTERVAL = 5.0  # most seconds between checks that a worker's loop answers (or timeout/2)
# After a read smaller than BATCH_READ, a channel is not read again for READ_PAUSE seconds: the
# kernel holds what comes meanwhile (also for a worker killed in between), and the supervisor
# wakes a few hundred times a second per worker instead of once or twice per flow.
READ_PAUSE = 0.005
BATCH_READ = 64 * 1024
# The families the supervisor serves itself: the workers' copies would count them N times.
OWN_FAMILIES = frozenset({"egressgw_reloads", "egressgw_ready", "egressgw_ready_without_feed_data"})


def reserve(key: str, listen: str) -> tuple[socket.socket, str]:
    """Bind ``listen`` the way the workers will, without listening; the socket and its address.

    The error names the key (``proxy.listen 127.0.0.1:3128: Address already in use``).
    """
    ip, port = parse_ip_port(listen)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((str(ip), port))
    except OSError as e:
        sock.close()
        raise OSError(f"{key} {listen}: {os.strerror(e.errno) if e.errno else e}") from e
    host, bound = sock.getsockname()[:2]
    return sock, f"[{host}]:{bound}" if family == socket.AF_INET6 else f"{host}:{bound}"


class WorkerExited(OSError):
    """A worker exited while the supervisor was starting."""


class Link(asyncio.Protocol):
    """The supervisor's end of one worker's socket pair."""

    def __init__(self, handle: WorkerHandle) -> None:
        self.handle = handle
        self.submit = handle.supervisor.exporter.submit_serialised
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The channel is open."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        """Events to the exporter, messages to the handle."""
        try:
            frames = self.decoder.feed(data)
        except FrameError as e:
            log.error("channel: bad data from a worker", worker=self.handle.index, error=str(e))
            if self.transport is not None:
                self.transport.close()
            return
        submit, events = self.submit, 0
        for kind, payload in frames:
            if kind == EVENT:
                submit(payload)
                events += 1
            else:
                try:
                    self._message(decode_message(payload))
                except FrameError as e:
                    log.error("channel: bad message", worker=self.handle.index, error=str(e))
        self.handle.events += events
        if len(data) < BATCH_READ and self.transport is not None:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(READ_PAUSE, self._resume)

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """The worker is gone (or closed its end): everything it sent has been read."""
        self.transport = None
        if self.decoder.pending:
            log.error("channel: a worker's last frame was cut short", worker=self.handle.index)
        for fut in self.replies.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the worker is gone"))
        self.replies.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def _message(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "reply":
            fut = self.replies.pop(msg.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            self.handle.message(op, msg)

    def send(self, op: str, **fields: Any) -> None:
        """Tell the worker something (no answer)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(message(op, **fields))

    async def request(self, op: str, within: float, **fields: Any) -> dict[str, Any]:
        """Ask the worker, wait ``within`` s for its answer; TimeoutError, ConnectionError."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the worker is gone")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[rid] = fut
        self.transport.write(message(op, id=rid, **fields))
        try:
            async with asyncio.timeout(within):
                return await fut
        finally:
            self.replies.pop(rid, None)


class WorkerHandle:
    """One worker slot: its process (started again after a crash), channel and state."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.link: Link | None = None
        self.pid: int | None = None
        self.started = asyncio.Event()
        self.started_at = 0.0
        self.failure: str | None = None  # what the worker said when it could not start
        self.why: str | None = "starting"  # its readiness: None when ready
        self.events = 0  # event frames received from this slot's processes
        self.restarts = 0
        self.unresponsive = 0  # workers killed for not answering the liveness check
        self.watcher: asyncio.Task[None] | None = None
        self.checker: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """The worker has started and its channel is open."""
        return self.started.is_set() and self.link is not None and not self.link.closed.done()

    def message(self, op: str, msg: dict[str, Any]) -> None:
        """A message the worker sent on its own."""
        if op == "started":
            self.pid = msg.get("pid")
            self.started.set()
            log.info("worker started", worker=self.index, pid=self.pid)
        elif op == "ready":
            self.why = msg.get("why")
        elif op == "failed":
            self.failure = msg.get("error")
        elif op == "resource_feeds":
            self.supervisor.serve_resource_feeds(msg.get("specs") or [])
        elif op == "lost":
            count = int(msg.get("count", 0))
            log.error("a worker dropped events", worker=self.index, events=count)
            self.supervisor.exporter.note_lost(count)
        else:
            log.warning("unknown message from a worker", worker=self.index, op=op)

    async def spawn(self) -> None:
        """Start this slot's worker process with a new channel."""
        sup = self.supervisor
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config = str(sup.config_path.absolute())
        args = [sys.executable, "-m", "egressgw", "worker", "--config", config]
        args += ["--index", str(self.index), "--channel-fd", str(theirs.fileno())]
        for name, address in sup.addresses.items():
            args += ["--listen", f"{name}={address}"]
        self.started.clear()
        self.failure, self.why = None, "starting"
        try:
            self.process = await asyncio.create_subprocess_exec(
                *args, pass_fds=[theirs.fileno()], stdin=asyncio.subprocess.DEVNULL
            )
        finally:
            theirs.close()  # the worker's copy only: its death then closes the channel
        self.pid = self.process.pid
        self.started_at = time.monotonic()
        loop = asyncio.get_running_loop()
        _, self.link = await loop.create_unix_connection(lambda: Link(self), sock=ours)

    async def wait_started(self) -> None:
        """Return once the worker said it started; WorkerExited if it exited first."""
        assert self.process is not None
        exited = spawn(self.process.wait(), name=f"worker-{self.index}-wait")
        started = spawn(self.started.wait(), name=f"worker-{self.index}-started")
        await asyncio.wait([exited, started], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if not self.started.is_set():
            code = await exited
            if self.link is not None:
                await self.link.closed
            why = f": {self.failure}" if self.failure else " (its log says why)"
            raise WorkerExited(f"worker {self.index} exited with status {code} at start{why}")
        exited.cancel()

    async def check_liveness(self) -> None:
        """Kill the worker (``watch`` starts it again) when its loop stops answering."""
        sup = self.supervisor
        while not sup.stopping:
            timeout = sup.config.proxy.worker_liveness_timeout
            await asyncio.sleep(min(LIVENESS_INTERVAL, timeout / 2))
            link, process = self.link, self.process
            if sup.stopping or not self.running or link is None or process is None:
                continue
            try:
                await link.request("ping", timeout)
            except TimeoutError:
                if sup.stopping or process.returncode is not None or self.process is not process:
                    continue
                self.unresponsive += 1
                log.error(
                    "worker not answering: killing it to start it again",
                    worker=self.index,
                    pid=process.pid,
                    waited=timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            except ConnectionError:
                continue  # exiting: watch() takes it from here

    async def watch(self) -> None:
        """Start the worker again whenever it exits unasked, waiting longer after each crash."""
        sup = self.supervisor
        delay = RESTART_BACKOFF[0]
        while True:
            assert self.process is not None and self.link is not None
            code = await self.process.wait()
            await self.link.closed  # its last events are read before anything else
            if sup.stopping:
                return
            ran = time.monotonic() - self.started_at
            if ran >= STABLE_AFTER:
                delay = RESTART_BACKOFF[0]
            self.restarts += 1
            log.error(
                "worker exited: starting it again",
                worker=self.index,
                pid=self.pid,
                status=code,
                ran=round(ran, 1),
                wait=delay,
            )
            self.why = f"exited with status {code}; restarting"
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_BACKOFF[1])
            if sup.stopping:
                return
            try:
                await self.spawn()
            except OSError as e:
                log.error("worker not started", worker=self.index, error=str(e))
                continue  # the old process's wait() returns at once: the next wait is longer


class Supervisor(FeedsReadiness):
    """The processes' one supervisor: feeds, exporter, admin server, reloads and shutdown."""

    def __init__(self, cfg: Config, config_path: Path, count: int) -> None:
        self.config = cfg
        self.config_path = config_path
        self.count = count
        base = config_path.parent
        self.registry = CollectorRegistry()
        self.feeds = build_feeds(cfg, base, self.registry, self._feed_report)
        self.exporter = Exporter.from_config(
            cfg.spool, list(cfg.sinks), base, registry=self.registry
        )
        self.admin = AdminServer(self, self.registry, metrics_body=self.metrics)
        self.registry.register(_Collector(self))
        self.registry.register(ReadinessCollector(self))
        self.error_registry = CollectorRegistry()  # served among the workers' sums
        self.error_registry.register(_Errors(self))
        self.handles = [WorkerHandle(self, i) for i in range(count)]
        m = cfg.admin.map
        # The egress map: every worker keeps its own; the admin server reads them merged.
        self.map_source = (
            MergedMap(
                self._map_workers,
                windows=m.windows,
                max_edges=m.max_edges,
                recent=m.recent_flows,
                timeout=REQUEST_TIMEOUT,
            )
            if m.enabled
            else None
        )
        self.addresses: dict[str, str] = {}
        self.reserved: list[socket.socket] = []
        self.reloads: dict[str, int] = {}
        self.errors: dict[str, int] = {}  # the supervisor's own (node_firewall)
        # The feeds policy resources define, as the workers last said (each watches them).
        self.resource_feeds: dict[str, FeedSpec] = {}
        self._resource_wanted: dict[str, FeedSpec] | None = None
        self._resource_task: asyncio.Task[None] | None = None
        # The node's nftables set of blocklisted IPs, refreshed after every feed update.
        self.node_firewall = cfg.node.enabled and cfg.node.firewall
        self._firewall_lock = asyncio.Lock()
        self.ready = False
        self.stopping = False
        self.started_at = time.monotonic()
        self._tasks: list[asyncio.Task[Any]] = []
        self._reload_lock = asyncio.Lock()
        self.reload_queue = Reloads(
            lambda: [self.config_path, *self.config.policy.files],
            self.reload,
            lambda: self.config.reload.interval,
        )

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """Where the admin server listens, once started."""
        return self.admin.address

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Reserve the addresses, start admin, exporter, feeds, then every worker."""
        self.started_at = time.monotonic()
        cfg = self.config
        listens = {"proxy": ("proxy.listen", cfg.proxy.listen)}
        if cfg.transparent.listen is not None:
            listens["transparent"] = ("transparent.listen", cfg.transparent.listen)
        try:
            for name, (key, listen) in listens.items():
                sock, self.addresses[name] = reserve(key, listen)
                self.reserved.append(sock)
            admin_listen, metrics_listen = cfg.admin.listen, cfg.admin.metrics_listen
            token = admin_token(cfg, self.config_path.parent)
            try:
                await self.admin.start(admin_listen, token, metrics=metrics_listen is None)
            except OSError as e:
                raise OSError(f"admin.listen {admin_listen}: {_reason(e)}") from e
            if metrics_listen is not None:
                try:
                    await self.admin.start_metrics(metrics_listen)
                except OSError as e:
                    raise OSError(f"admin.metrics_listen {metrics_listen}: {_reason(e)}") from e
            await self.exporter.start()
            await self.feeds.start()
            for handle in self.handles:
                await handle.spawn()
            await asyncio.gather(*(h.wait_started() for h in self.handles))
        except BaseException:
            await self._stop_workers(at_once=True)
            await self._close()
            raise
        missing = [n for n, s in self.feeds.status().items() if s.enabled and not s.has_data]
        if missing:
            self._tasks.append(spawn(self.feeds.update_now(missing), name="feeds-first-fetch"))
        if self.node_firewall:
            self._tasks.append(spawn(self.refresh_firewall(), name="node-firewall"))
        for handle in self.handles:
            handle.watcher = spawn(handle.watch(), name=f"worker-{handle.index}-watch")
            handle.checker = spawn(handle.check_liveness(), name=f"worker-{handle.index}-alive")
        if cfg.reload.watch:
            self._tasks.append(spawn(self.reload_queue.watch(), name="config-watcher"))
        self.ready = True
        log.info(
            "supervisor started",
            workers=self.count,
            pids=[h.pid for h in self.handles],
            proxy=self.addresses["proxy"],
            admin=cfg.admin.listen,
        )
        for warning in cfgmod.unbuilt(cfg):
            log.warning(warning)

    async def shutdown(self) -> None:
        """Tell every worker to shut down, wait for them, then flush and close the exporter."""
        self.stopping = True
        log.info("shutting down: workers accept for the shutdown delay, then drain")
        await self._stop_workers(at_once=False)
        await self._close()
        log.info("supervisor stopped")

    def hurry(self) -> None:
        """End the workers' shutdown delay now (a second SIGTERM or SIGINT)."""
        if self.stopping:
            log.info("shutdown delay cut short")
            for handle in self.handles:
                if handle.link is not None:
                    handle.link.send("hurry")

    async def _stop_workers(self, at_once: bool) -> None:
        self.stopping = True
        for handle in self.handles:
            for task in (handle.watcher, handle.checker):
                if task is not None:
                    task.cancel()
            if handle.link is not None:
                handle.link.send("hurry" if at_once else "shutdown")
        limits = self.config.proxy
        wait = limits.shutdown_delay + limits.drain_timeout + STOP_MARGIN
        for handle in self.handles:
            process = handle.process
            if process is None:
                continue
            if at_once and not handle.started.is_set():
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            try:
                async with asyncio.timeout(wait):
                    await process.wait()
            except TimeoutError:
                log.error("worker did not stop: killed", worker=handle.index, pid=handle.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            if handle.link is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_MARGIN):
                        await handle.link.closed

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.reload_queue.cancel()
        await self.feeds.stop()
        await self.admin.stop()
        await self.exporter.aclose()
        for sock in self.reserved:
            sock.close()

    # -- reload ---------------------------------------------------------------------------------
    def request_reload(self, by: str) -> None:
        """Ask for a reload (``by``: ``SIGHUP``, ``watch``); coalesced with any already asked."""
        self.reload_queue.request(by)

    async def reload(self) -> bool:
        """Validate configuration and policy here, then reload every worker; counted once."""
        async with self._reload_lock:
            try:
                cfg = await asyncio.to_thread(_validate, self.config_path)
            except ConfigError as e:
                self._count_reload("failed")
                for line in e.errors:
                    log.error("reload refused: keeping the running configuration", error=line)
                return False
            self._warn_restart_only(cfg)
            results = await asyncio.gather(
                *(self._reload_worker(h) for h in self.handles if h.running)
            )
            ok = all(results)
            self._count_reload("ok" if ok else "failed")
            # Kept for what the supervisor itself reads (the watch interval, readiness).
            self.config = cfg.model_copy(
                update={"proxy": self.config.proxy, "feeds": self.config.feeds}
            )
            log.info("configuration reloaded" if ok else "reload failed in a worker")
            return ok

    async def _reload_worker(self, handle: WorkerHandle) -> bool:
        assert handle.link is not None
        try:
            reply = await handle.link.request("reload", RELOAD_TIMEOUT)
        except (TimeoutError, ConnectionError) as e:
            log.error("worker did not reload", worker=handle.index, error=str(e) or "timeout")
            return False
        return bool(reply.get("ok"))

    def _count_reload(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1

    def _warn_restart_only(self, cfg: Config) -> None:
        old = self.config
        if cfg.proxy.workers != old.proxy.workers:
            log.warning("proxy.workers changes only on restart")
        if (
            cfg.proxy.listen != old.proxy.listen
            or cfg.transparent.listen != old.transparent.listen
            or cfg.admin != old.admin
        ):
            log.warning("listen addresses and admin settings change only on restart")
        if cfg.sinks != old.sinks or cfg.spool != old.spool:
            log.warning("sinks and spool change only on restart")
        if cfg.feeds != old.feeds or cfg.state_dir != old.state_dir:
            log.warning("feed definitions change only on restart")
        for key, running, configured in restart_only(old, cfg):
            log.warning(f"{key} changes only on restart", running=running, configured=configured)

    # -- feeds ----------------------------------------------------------------------------------
    def _feed_report(self, report: UpdateReport) -> None:
        # Stored before the matcher is swapped: every worker reads the new state from disk (an
        # unchanged feed gives them nothing new to read).
        if report.status == "updated":
            for handle in self.handles:
                if handle.link is not None:
                    handle.link.send("feeds")
        if report.ok:
            if self.node_firewall:
                spawn(self.refresh_firewall(), name="node-firewall")
        else:
            self._count_error("feed_update")

    def serve_resource_feeds(self, specs: list[dict[str, Any]]) -> None:
        """Fetch and store the feeds ThreatFeed resources define, as a worker last listed them.

        Every worker watches the same resources and says the same; the latest word wins.
        """
        try:
            wanted = {s.name: s for s in (FeedSpec.model_validate(d) for d in specs)}
        except ValueError as e:
            log.error("a worker sent a feed the supervisor cannot read", error=str(e))
            return
        self._resource_wanted = wanted
        if self._resource_task is None or self._resource_task.done():
            self._resource_task = spawn(self._apply_resource_feeds(), name="resource-feeds")

    async def _apply_resource_feeds(self) -> None:
        while self._resource_wanted is not None:
            wanted, self._resource_wanted = self._resource_wanted, None
            for name in [n for n in self.resource_feeds if n not in wanted]:
                await self.feeds.remove(name)
                del self.resource_feeds[name]
            for name, spec in wanted.items():
                if self.resource_feeds.get(name) == spec:
                    continue
                await self.feeds.add(spec)
                self.resource_feeds[name] = spec
                if self.feeds.status()[name].has_data:
                    for handle in self.handles:  # stored data: the workers read it now
                        if handle.link is not None:
                            handle.link.send("feeds")
                else:
                    spawn(self.feeds.update_now([name]), name=f"feed-first-fetch-{name}")

    async def refresh_firewall(self) -> bool:
        """Load the feeds' blocklisted IPs into the node table's sets (as one process does)."""
        async with self._firewall_lock:
            return await load_node_firewall(self.feeds, self.config.node.table, self._count_error)

    def _count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    # -- what the admin server reads ------------------------------------------------------------
    async def metrics(self) -> bytes:
        """The supervisor's metrics and the sums of every running worker's."""
        running = [h for h in self.handles if h.running]
        replies = await asyncio.gather(
            *(h.link.request("metrics", REQUEST_TIMEOUT) for h in running if h.link is not None),
            return_exceptions=True,
        )
        texts = [r["text"] for r in replies if isinstance(r, dict) and "text" in r]
        texts.append(generate_latest(self.error_registry).decode())
        own = generate_latest(self.registry)
        return own + aggregate(texts, skip=OWN_FAMILIES).encode()

    def readiness(self) -> str | None:
        """None when serving, else why not: starting, stopping, a worker, the feeds."""
        if self.stopping:
            return "shutting down"
        if not self.ready:
            return "starting"
        for h in self.handles:
            if not h.running:
                return f"worker {h.index}: {h.why or 'not running'}"
            if h.why is not None:
                return f"worker {h.index}: {h.why}"
        return self._feed_readiness()[0]

    def blocklist_values(self, kind: str, feeds: list[str] | None) -> list[str]:
        """The feeds' blocked values of one kind; MissingFeedData while one has none yet."""
        return self.feeds.blocklist_values(kind, feeds)

    def _map_workers(self) -> list[tuple[int, object, Link]]:
        """The running workers the egress map asks: (slot, process id, channel)."""
        return [(h.index, h.pid, h.link) for h in self.handles if h.running and h.link is not None]

    async def explain(self, source: str, target: str, protocol: str) -> tuple[bool, list[str]]:
        """How a worker decides the flow now (every worker holds the same policy and feeds)."""
        for h in self.handles:
            if h.running and h.link is not None:
                reply = await h.link.request(
                    "explain", REQUEST_TIMEOUT, source=source, target=target, protocol=protocol
                )
                if "error" in reply:
                    raise ValueError(reply["error"])
                return bool(reply["allowed"]), list(reply["lines"])
        raise ValueError("no worker is running")


class _Collector:
    """The supervisor's own families: reloads, workers, restarts, events per worker."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        sup = self.sup
        reloads = CounterMetricFamily(
            "egressgw_reloads", "Configuration reloads, by result", labels=["result"]
        )
        for result, n in sorted(sup.reloads.items()):
            reloads.add_metric([result], n)
        yield reloads
        yield GaugeMetricFamily(
            "egressgw_workers",
            "Worker processes running",
            value=sum(h.running for h in sup.handles),
        )
        restarts = CounterMetricFamily(
            "egressgw_worker_restarts",
            "Workers started again after exiting unasked",
            labels=["worker"],
        )
        unresponsive = CounterMetricFamily(
            "egressgw_worker_unresponsive",
            "Workers killed (and started again) for not answering the liveness check",
            labels=["worker"],
        )
        events = CounterMetricFamily(
            "egressgw_worker_events", "Events received from each worker", labels=["worker"]
        )
        for h in sup.handles:
            restarts.add_metric([str(h.index)], h.restarts)
            unresponsive.add_metric([str(h.index)], h.unresponsive)
            events.add_metric([str(h.index)], h.events)
        yield restarts
        yield unresponsive
        yield events


class _Errors:
    """The supervisor's errors by kind, summed with the workers' ``egressgw_errors_total``."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily("egressgw_errors", "Errors by kind", labels=["kind"])
        for kind, n in sorted(self.sup.errors.items()):
            errors.add_metric([kind], n)
        yield errors


def _validate(path: Path) -> Config:
    """The configuration file and its policy files, loaded and checked (blocking)."""
    cfg = cfgmod.load_config(path)
    cfgmod.load_policy(cfg.policy.files, {f.name for f in cfg.feeds})
    return cfg


def _reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


async def serve(cfg: Config, path: Path, count: int) -> None:
    """Run the supervisor and its workers until SIGTERM or SIGINT (a second one hurries)."""
    sup = Supervisor(cfg, path, count)
    await sup.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            sup.hurry()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, sup.request_reload, "SIGHUP")
    await stop.wait()
    await sup.shutdown()
