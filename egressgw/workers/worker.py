"""A worker process: one gateway on the shared port, its events and answers sent to the supervisor.

The worker is ``egressgw worker`` (a subcommand the supervisor runs, not listed in the help). It
builds the same Gateway as a single process, in its worker role: its listeners bind the
addresses the supervisor reserved with ``SO_REUSEPORT``, its events go over the channel (the
socket pair whose end it inherited), and it serves no admin pages and fetches no feeds.

Events: ``submit`` appends the event's frame to a buffer written once per turn of the event
loop, and at once after a refusal (``SendOnDecision``): a refusal is answered in the same
callback that decides it, and a decision's event must be in the socket (the kernel keeps it
for the supervisor even when this process is killed) before the client can read the answer.
An end event may follow the connection's close by one turn of the loop. When the supervisor
does not read (its socket full and ``MAX_UNSENT`` bytes queued here) events are dropped,
counted (``egressgw_errors_total{kind="events_dropped"}``) and reported to the supervisor,
whose spool records the gap.

Messages from the supervisor: ``reload`` (configuration and policy files; answered ok or not),
``feeds`` (read the feeds' stored state again), ``metrics`` (answered with the exposition
text), ``explain``, ``map_graph`` and ``map_flows`` (this worker's egress map, which the
supervisor merges with the others': ``maps.py``), ``shutdown`` (the single process's
SIGTERM: accept for the shutdown delay, drain, exit) and ``hurry`` (the second SIGTERM). The
worker tells the supervisor when it has ``started`` and whenever its readiness changes
(``ready``). When the channel closes (the supervisor is gone) the worker stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import orjson
import structlog
import uvloop
from prometheus_client import generate_latest

from egressgw.app import Gateway, WorkerRole
from egressgw.config import model as cfgmod
from egressgw.config.source import ConfigError
from egressgw.flow import Flow
from egressgw.logs import configure_logging
from egressgw.record.egressmap import DEFAULT_RECENT
from egressgw.record.mapmerge import resume_after
from egressgw.workers.channel import EVENT, HEADER, Decoder, FrameError, decode_message, message
from feeds.spec import FeedSpec
from siem.tasks import spawn

log = structlog.get_logger("egressgw.worker")

# Bytes queued in this process for the supervisor (beyond the socket's own buffer) before
# events are dropped: seconds of events at any rate the proxy reaches.
MAX_UNSENT = 64 * 1024 * 1024
# The socket's send buffer asked for (the kernel caps it at net.core.wmem_max).
SEND_BUFFER = 4 * 1024 * 1024
READY_INTERVAL = 0.5  # how often readiness is looked at, to tell the supervisor of a change


class Channel(asyncio.Protocol):
    """The worker's end of the socket pair: events out, batched per loop turn; messages both ways.

    It is the worker gateway's exporter (``EventExport``).
    """

    def __init__(self, on_message: Callable[[dict[str, Any]], None]) -> None:
        self.on_message = on_message
        self.on_drop: Callable[[int], None] = lambda n: None
        self.transport: asyncio.WriteTransport | None = None
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._decoder = Decoder()
        self._buffer = bytearray()
        self._buffered = 0  # events in the buffer
        self._scheduled = False
        self._unreported = 0  # events dropped, not told to the supervisor yet
        self.closing = False  # aclose() was called: the channel ends because we end it

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The channel is open."""
        self.transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        """Messages from the supervisor."""
        try:
            frames = self._decoder.feed(data)
            for _, payload in frames:
                self.on_message(decode_message(payload))
        except FrameError as e:
            log.error("channel: bad data from the supervisor", error=str(e))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """The supervisor is gone, or the channel was closed."""
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    # -- EventExport ------------------------------------------------------------------------------
    def submit(self, event: Any) -> None:
        """Queue one event's frame; it is written at the end of this turn of the loop."""
        try:
            payload = orjson.dumps(event)
        except TypeError:
            try:
                payload = orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS)
            except TypeError:
                self._dropped(1)
                return
        buf = self._buffer
        buf += HEADER.pack(len(payload), EVENT)
        buf += payload
        self._buffered += 1
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        """Write the queued events to the socket now."""
        self._scheduled = False
        if not self._buffered:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # kept: aclose() says how many never left
        if transport.get_write_buffer_size() > MAX_UNSENT:
            self._dropped(self._buffered)
            self._buffer.clear()
            self._buffered = 0
            return
        if self._unreported:
            transport.write(message("lost", count=self._unreported))
            self._unreported = 0
        data, self._buffer, self._buffered = self._buffer, bytearray(), 0
        transport.write(data)

    def send(self, data: bytes) -> None:
        """Write a message frame, after the events queued before it."""
        self.flush_now()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def start(self) -> None:
        """Nothing to open: the channel is connected before the gateway is built."""

    async def flush(self) -> None:
        """Write what is queued (the kernel then holds it for the supervisor)."""
        self.flush_now()

    async def aclose(self) -> None:
        """Write what is queued, close once the socket took it all, wait until it has."""
        self.closing = True
        self.flush_now()
        if self._buffered:
            log.error("events not sent: the channel is closed", events=self._buffered)
        if self.transport is not None:
            self.transport.close()  # an asyncio transport writes its buffer out first
        await self.closed

    def _dropped(self, n: int) -> None:
        self._unreported += n
        self.on_drop(n)


class SendOnDecision:
    """A flow consumer, last in the list: a refusal's event is written before its answer.

    A refusal is answered in the callback that decides it, so its event goes out now. An
    allowed flow's answer comes from its destination, read in a later turn of the loop than
    the one whose end writes the batch (call_soon'd callbacks run before the next poll).
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def flow_decided(self, flow: Flow) -> None:
        """Write the queued events now when the flow was refused."""
        verdict = flow.verdict
        if verdict is None or not verdict.allowed:
            self.channel.flush_now()

    def flow_ended(self, flow: Flow) -> None:
        """End events go with the turn's batch."""


class Worker:
    """One worker's gateway and its side of the conversation with the supervisor."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.gateway: Gateway | None = None
        self.channel: Channel | None = None
        self.stop = asyncio.Event()
        self.hurried = False
        self._feeds_wanted = False
        self._feeds_task: asyncio.Task[None] | None = None

    def on_message(self, msg: dict[str, Any]) -> None:
        """Act on a supervisor's message (replies go back with its ``id``)."""
        op = msg["op"]
        if op == "shutdown":
            self.stop.set()
        elif op == "hurry":
            self.hurried = True
            self.stop.set()
            if self.gateway is not None:
                self.gateway.hurry()
        elif op == "feeds":
            self._feeds_wanted = True
            if self._feeds_task is None or self._feeds_task.done():
                self._feeds_task = spawn(self._reload_feeds(), name="feeds-reload")
        elif op == "ping":
            # Answered from the loop's own callback: only a loop that turns answers.
            if self.channel is not None:
                self.channel.send(message("reply", id=msg.get("id")))
        elif op in ("map_graph", "map_flows"):
            self._answer_map(msg)  # at once: a few ms of Python at most, no await in it
        elif op in ("reload", "metrics", "explain"):
            spawn(self._answer(msg), name=f"answer-{op}")
        else:
            log.warning("unknown message from the supervisor", op=op)

    async def _reload_feeds(self) -> None:
        # Updates arriving while the state is read make one more read after it, not one each.
        while self._feeds_wanted and self.gateway is not None:
            self._feeds_wanted = False
            await self.gateway.reload_feeds()

    async def _answer(self, msg: dict[str, Any]) -> None:
        gw, channel = self.gateway, self.channel
        if gw is None or channel is None:
            return
        op = msg["op"]
        reply: dict[str, Any] = {}
        try:
            if op == "reload":
                reply["ok"] = await gw.reload()
            elif op == "metrics":
                reply["text"] = generate_latest(gw.metrics.registry).decode()
            else:
                allowed, lines = await gw.explain(msg["source"], msg["target"], msg["protocol"])
                reply.update(allowed=allowed, lines=lines)
        except (ValueError, KeyError) as e:
            reply["error"] = str(e)
        except Exception as e:
            # Answered all the same: the supervisor would otherwise wait out its timeout.
            log.exception("answering the supervisor failed", op=op)
            reply.update(error=f"internal error: {e!r}", ok=False)
        channel.send(message("reply", id=msg.get("id"), **reply))

    def _answer_map(self, msg: dict[str, Any]) -> None:
        gw, channel = self.gateway, self.channel
        if gw is None or channel is None:
            return
        m = gw.egress_map
        reply: dict[str, Any]
        try:
            if m is None:
                reply = {"error": "the egress map is off (admin.map.enabled: false)"}
            elif msg["op"] == "map_graph":
                reply = {"share": m.share(time.monotonic(), float(msg["window"]))}
            else:
                after = resume_after(int(msg.get("after", 0)), m.seq)
                flows = m.recent_flows(limit=int(msg.get("limit", DEFAULT_RECENT)), after=after)
                reply = {"version": m.version, "seq": m.seq, "flows": flows}
        except Exception as e:
            # Answered all the same, and kept out of the channel's callback, which it would end.
            log.exception("answering the supervisor failed", op=msg["op"])
            reply = {"error": f"internal error: {e!r}"}
        channel.send(message("reply", id=msg.get("id"), **reply))

    async def _tell_readiness(self, gw: Gateway, channel: Channel) -> None:
        told: object = object()
        while True:
            why = gw.readiness()
            if why != told:
                channel.send(message("ready", why=why))
                told = why
            await asyncio.sleep(READY_INTERVAL)

    async def serve(self, cfg: cfgmod.Config, path: Path, fd: int, listen: dict[str, str]) -> None:
        """Run the worker gateway until the supervisor says stop (or is gone)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=fd)
        with contextlib.suppress(OSError):  # else the kernel's default
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.channel = channel = Channel(self.on_message)
        await loop.create_unix_connection(lambda: channel, sock=sock)

        def resource_feeds(specs: list[FeedSpec]) -> None:
            dumped = [s.model_dump(mode="json") for s in specs]
            channel.send(message("resource_feeds", specs=dumped))

        self.gateway = gw = Gateway(cfg, path, WorkerRole(channel, listen, resource_feeds))
        errors = gw.metrics.errors

        def count_dropped(n: int) -> None:
            errors["events_dropped"] = errors.get("events_dropped", 0) + n

        channel.on_drop = count_dropped
        gw.consumers.append(SendOnDecision(channel))
        try:
            await gw.start()
        except OSError as e:
            channel.send(message("failed", error=str(e)))
            await channel.aclose()
            raise
        gc.freeze()  # what start() loaded lives as long as the process (as in cli._serve)
        channel.send(message("started", pid=os.getpid()))
        reporter = spawn(self._tell_readiness(gw, channel), name="readiness")
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        gone = spawn(self._supervisor_gone(channel), name="channel-watch")
        await self.stop.wait()
        gw.stopping = True  # shutdown() sets it too; now, so that hurry() counts from here
        if self.hurried:
            gw.hurry()
        await gw.shutdown()
        reporter.cancel()
        gone.cancel()

    async def _supervisor_gone(self, channel: Channel) -> None:
        await channel.closed
        if channel.closing:
            return
        log.error("the supervisor is gone: stopping")
        self.on_message({"op": "hurry"})


def _listen(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=ADDRESS, got {text!r}")
    return name, address


def add_parser(sub: Any) -> None:
    """The ``worker`` subcommand (run by the supervisor only)."""
    worker = sub.add_parser("worker")
    worker.add_argument("--config", type=Path, required=True)
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--channel-fd", type=int, required=True)
    worker.add_argument("--listen", type=_listen, action="append", default=[])
    worker.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one worker (``proxy.workers``); its supervisor started it."""
    # The supervisor relays SIGINT (a terminal's ^C reaches the whole group) and SIGHUP.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        cfg = cfgmod.load_config(args.config)
    except ConfigError as e:
        for line in e.errors:
            print(f"egressgw worker {args.index}: {line}", file=sys.stderr)
        return 1
    configure_logging(cfg.log.level, cfg.log.format)
    structlog.contextvars.bind_contextvars(worker=args.index)
    worker = Worker(args.index)
    try:
        uvloop.run(worker.serve(cfg, args.config, args.channel_fd, dict(args.listen)))
    except OSError as e:
        print(f"egressgw worker {args.index}: cannot start: {e}", file=sys.stderr)
        return 1
    return 0
