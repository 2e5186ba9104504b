"""Events over a worker's channel: events/s and CPU per event on each side (``proxy.workers``).

A sender process plays a worker: the real ``Channel`` (egressgw.workers.worker) submits gateway
decision events (a real one's shape, ~770 bytes of JSON), ``--per-turn`` of them per turn of
its event loop, written once per turn (``batched``: allowed flows) or after each (``per-event``:
what ``SendOnDecision`` does for a refused flow). The parent plays the supervisor: the real
``Link`` (egressgw.workers.supervisor) reads the frames and hands each event to a real
``Exporter`` spooling to a temporary directory (fsync per batch) with a file sink. Beside them,
one process's cost of the same events: ``Exporter.submit`` into the same spool and sink. Usage:

    .venv/bin/python bench/channel_bench.py [--events 200000] [--per-turn 8]

Each side's CPU is its process time (user + system, all threads) over the run; events/s from
the first frame read to the last event delivered to the file sink.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop
from prometheus_client import CollectorRegistry

from egressgw.workers.supervisor import Link
from egressgw.workers.worker import Channel
from siem.config import FileSinkSpec, SpoolSpec
from siem.exporter import Exporter

EVENT: dict[str, Any] = {
    "@timestamp": "2026-12-04T16:49:12.831837Z",
    "ecs": {"version": "8.11.0"},
    "flow": {"id": "d48333ce879500000001"},
    "source": {"ip": "10.244.1.17", "port": 56240},
    "network": {"transport": "tcp", "protocol": "tls", "direction": "egress"},
    "observer": {
        "vendor": "egressgw",
        "product": "egressgw",
        "type": "proxy",
        "version": "0.1.0",
        "hostname": "node-1",
    },
    "kubernetes": {"namespace": "payments", "pod": {"name": "api-5d8f7c-x2k4q"}},
    "destination": {"port": 443, "domain": "api.partner.example", "ip": "203.0.113.9"},
    "rule": {"ruleset": "platform", "name": "partner-for-all"},
    "event": {
        "id": "d48333ce879500000001.1",
        "kind": "event",
        "category": ["network"],
        "type": ["connection", "allowed"],
        "action": "connection_allowed",
        "outcome": "success",
        "reason": "policy platform/partner-for-all",
        "start": "2026-12-04T16:49:12.831837Z",
    },
}


BACKLOG = 4 * 1024 * 1024  # bytes the sender lets queue before it waits (see send)


def cpu_seconds() -> float:
    """This process's CPU time, every thread."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def send(fd: int, events: int, per_turn: int, per_event: bool) -> None:
    """The worker's side: submit ``events`` through the real Channel, then close it."""
    loop = asyncio.get_running_loop()
    channel = Channel(lambda msg: None)
    await loop.create_unix_connection(lambda: channel, sock=socket.socket(fileno=fd))
    start = cpu_seconds()
    sent = 0
    while sent < events:
        for _ in range(min(per_turn, events - sent)):
            channel.submit(EVENT)
            if per_event:
                channel.flush_now()
        sent += per_turn
        await asyncio.sleep(0)  # one turn of the loop: the batch is written at its end
        # A gateway makes events at a fraction of this rate: wait while the supervisor catches
        # up rather than measure the drop policy (MAX_UNSENT queued, then events dropped).
        transport = channel.transport
        while transport is not None and transport.get_write_buffer_size() > BACKLOG:  # noqa: ASYNC110  (a transport has no event for it)
            await asyncio.sleep(0.001)
    await channel.aclose()
    print(f"{cpu_seconds() - start:.6f}", flush=True)


class _TimedLink(Link):
    """The real Link, noting when the first frame came (the sender's start is not timed)."""

    first: float | None = None

    def data_received(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        super().data_received(data)


class _Handle:
    """What Link needs of a worker slot."""

    def __init__(self, exporter: Exporter) -> None:
        self.supervisor = self
        self.exporter = exporter
        self.index = 0
        self.events = 0

    def message(self, op: str, msg: dict[str, Any]) -> None:
        pass


def spooling_exporter(directory: Path, events: int) -> Exporter:
    """An exporter as the gateway's: a spool (fsync per batch) and a file sink."""
    exporter = Exporter.from_config(
        SpoolSpec(dir=directory / "spool"),
        [FileSinkSpec(type="file", path=str(directory / "events.jsonl"))],
        directory,
        registry=CollectorRegistry(),
    )
    exporter.max_pending = events + 1  # none dropped: the figure is the cost of each
    return exporter


async def receive(events: int, per_turn: int, per_event: bool, directory: Path) -> dict[str, float]:
    """The supervisor's side: read the channel into a spooling exporter; figures of the run."""
    exporter = spooling_exporter(directory, events)
    await exporter.start()
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    handle = _Handle(exporter)
    cmd = [sys.executable, __file__, "--sender", str(theirs.fileno()), "--events", str(events)]
    cmd += ["--per-turn", str(per_turn)] + (["--per-event"] if per_event else [])
    start_cpu = cpu_seconds()
    proc = subprocess.Popen(  # noqa: ASYNC220  (started once; the loop has nothing else to do)
        cmd, pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, text=True
    )
    theirs.close()
    _, link = await loop.create_unix_connection(lambda: _TimedLink(handle), sock=ours)  # type: ignore[arg-type]
    await link.closed
    await exporter.flush()
    await exporter.wait_delivered()
    assert link.first is not None
    wall, cpu = time.perf_counter() - link.first, cpu_seconds() - start_cpu
    out, _ = proc.communicate()
    await exporter.aclose()
    assert handle.events == events, (handle.events, events)
    return {
        "events_per_s": events / wall,
        "sender_us": float(out.strip()) / events * 1e6,
        "receiver_us": cpu / events * 1e6,
    }


async def single(events: int, per_turn: int, directory: Path) -> dict[str, float]:
    """One process: Exporter.submit of the same events into the same spool and sink."""
    exporter = spooling_exporter(directory, events)
    await exporter.start()
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    for i in range(events):
        exporter.submit(EVENT)
        if i % per_turn == 0:
            await asyncio.sleep(0)
    await exporter.flush()
    await exporter.wait_delivered()
    wall, cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu
    await exporter.aclose()
    return {"events_per_s": events / wall, "us": cpu / events * 1e6}


def main() -> None:
    """Run the benchmark (or, with --sender, its sending side)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--per-turn", type=int, default=8, help="events per loop turn")
    parser.add_argument("--sender", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--per-event", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender is not None:
        uvloop.run(send(args.sender, args.events, args.per_turn, args.per_event))
        return
    size = len(orjson.dumps(EVENT))
    print(
        f"{args.events:,} events of {size} bytes, {args.per_turn} per loop turn; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="egw-channel-") as tmp:
        one = uvloop.run(single(args.events, args.per_turn, Path(tmp)))
    print(
        f"one process, submit -> spool -> file sink: {one['events_per_s']:,.0f} events/s, "
        f"{one['us']:.2f} µs CPU/event"
    )
    for per_event in (False, True):
        with tempfile.TemporaryDirectory(prefix="egw-channel-") as tmp:
            r = uvloop.run(receive(args.events, args.per_turn, per_event, Path(tmp)))
        mode = "per-event write" if per_event else "batched per turn"
        print(
            f"channel, {mode}: {r['events_per_s']:,.0f} events/s; CPU/event: worker "
            f"{r['sender_us']:.2f} µs, supervisor {r['receiver_us']:.2f} µs (spool and sink)"
        )


if __name__ == "__main__":
    main()
