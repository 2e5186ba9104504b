#!/usr/bin/env python3
"""DNS benchmark: queries/s through egressgw's DNS proxy against dnsmasq answering directly.

Run as root from the repository: ``.venv/bin/python bench/dns_bench.py`` (``--help`` for
longer runs). Needs ``dnsmasq`` and ``ip`` (iproute2); shares its namespace, process and CPU
helpers with ``proxy_bench.py``.

Rules of the measurement:

- Everything runs in a network namespace this script creates and deletes at the end.
- dnsmasq on 127.0.0.1:53 answers ``--names`` A records (``nameN.bench.test`` ->
  198.18.x.y, the benchmarking range) from ``--host-record``: no recursion, no cache misses.
- egressgw's DNS proxy on 127.0.0.1:5300 forwards to that dnsmasq. It judges every question
  and every answer as in production: static identity of the client, a policy with a feeds tier
  (two local feeds of 1,000 entries), the guard on the answers, the per-client answer record,
  an ECS event per query to a file sink.
- The load generator is its own process (uvloop, asyncio datagram endpoints): queries built
  once with dnspython, ``--inflight`` of them in flight over 8 sockets from 8 source
  addresses (one workload each), a new one sent as each answer arrives; an answer is matched
  by its id, and the first answers of every run are parsed in full (dnspython) and checked to
  be the A record dnsmasq was given. A query unanswered after 1 s is counted lost and sent
  again.
- Both paths (direct: the client asks dnsmasq; egressgw: the client asks the proxy) run in
  every round, in alternating order; each figure is the median of the rounds, the ratio the
  median of the per-round ratios. CPU of egressgw and of dnsmasq is read from /proc around each
  measurement and divided by the queries answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import (  # the sibling script, found by the line above
    BUSY_LOAD,
    BenchError,
    Client,
    Daemon,
    cpu_seconds,
    delete_netns,
    enter_netns,
    percentile,
    platform_line,
    start,
    stopping,
    wait_for,
    which,
)

DNSMASQ = ("127.0.0.1", 53)
PROXY = ("127.0.0.1", 5300)
ADMIN = ("127.0.0.1", 9092)
SOURCES = [f"127.0.0.{64 + i}" for i in range(8)]
SOURCE_CIDR = "127.0.0.64/29"
ZONE = "bench.test"
LOST_AFTER = 1.0  # seconds without an answer: counted lost, sent again
CHECKED_ANSWERS = 16  # answers parsed in full at the start of every run

DEFAULT_REPEAT = 3
DEFAULT_DURATION = 2.0
DEFAULT_WARMUP = 0.5
DEFAULT_INFLIGHT = 64
DEFAULT_NAMES = 1000
DEFAULT_FEED_ENTRIES = 1000
DEFAULT_READY_TIMEOUT = 60.0

PATHS = ("egressgw", "direct")


def name_of(index: int) -> str:
    """Return the index-th bench name."""
    return f"name{index}.{ZONE}"


def address_of(index: int) -> str:
    """Return the address dnsmasq answers for the index-th name (198.18.0.0/15)."""
    return f"198.{18 + index // 65536 % 2}.{index // 256 % 256}.{index % 256}"


# ===========================================================================================
# Load generator (role "client")
# ===========================================================================================


@dataclass
class Tally:
    """What one run counted."""

    answered: int = 0
    in_window: int = 0
    lost: int = 0
    failed: int = 0  # answers that were not NOERROR
    checked: int = 0
    last_error: str = ""
    latency: list[float] = field(default_factory=list)


class Asker(asyncio.DatagramProtocol):
    """One socket with its share of the queries in flight, matched by id."""

    def __init__(
        self, queries: list[bytes], start: int, tally: Tally, window: tuple[float, float, float]
    ) -> None:
        self.queries = queries
        self.next = start
        self.tally = tally
        self.measure, self.end = window[1], window[2]
        self.ids = start % 65536
        self.pending: dict[int, tuple[float, int]] = {}  # id -> (sent at, query index)
        self.transport: asyncio.DatagramTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def send(self, index: int | None = None) -> None:
        """Send the next query (or the index-th again) under a fresh id."""
        assert self.transport is not None
        if index is None:
            index = self.next % len(self.queries)
            self.next += 1
        self.ids = (self.ids + 1) % 65536
        while self.ids in self.pending:
            self.ids = (self.ids + 1) % 65536
        wire = self.queries[index]
        self.pending[self.ids] = (time.perf_counter(), index)
        self.transport.sendto(self.ids.to_bytes(2, "big") + wire[2:])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        sent = self.pending.pop(int.from_bytes(data[:2], "big"), None)
        if sent is None:
            return  # an answer to a query already counted lost
        now = time.perf_counter()
        tally = self.tally
        if data[3] & 0x0F:
            tally.failed += 1
            tally.last_error = f"rcode {data[3] & 0x0F}"
        elif tally.checked < CHECKED_ANSWERS:
            tally.checked += 1
            self.check(data, sent[1])
        tally.answered += 1
        if self.measure <= now <= self.end:
            tally.in_window += 1
            tally.latency.append(now - sent[0])
        if now < self.end:
            self.send()
        elif not self.pending and not self.done.done():
            self.done.set_result(None)

    def check(self, data: bytes, index: int) -> None:
        """Parse an answer in full: the A record dnsmasq was given for the name."""
        import dns.message

        message = dns.message.from_wire(data)
        got = {item.address for rrset in message.answer for item in rrset if rrset.rdtype == 1}
        if got != {address_of(index)}:
            self.tally.failed += 1
            self.tally.last_error = f"{name_of(index)}: answered {sorted(got)}"

    def expire(self) -> None:
        """Count the queries unanswered for LOST_AFTER as lost and send them again."""
        now = time.perf_counter()
        for qid, (sent, index) in list(self.pending.items()):
            if now - sent > LOST_AFTER:
                del self.pending[qid]
                self.tally.lost += 1
                if now < self.end:
                    self.send(index)
        if now >= self.end and not self.pending and not self.done.done():
            self.done.set_result(None)


async def run_queries(spec: dict[str, Any]) -> dict[str, Any]:
    """Keep spec['inflight'] queries in flight for the window; report answers/s and latency."""
    import dns.message

    loop = asyncio.get_running_loop()
    queries = [
        dns.message.make_query(name_of(i), "A", want_dnssec=False).to_wire()
        for i in range(spec["names"])
    ]
    now = time.perf_counter()
    window = (now, now + spec["warmup"], now + spec["warmup"] + spec["duration"])
    tally = Tally()
    askers: list[Asker] = []
    share = max(1, spec["inflight"] // len(SOURCES))
    for slot, source in enumerate(SOURCES):
        _, asker = await loop.create_datagram_endpoint(
            lambda slot=slot: Asker(queries, slot * 7919, tally, window),  # type: ignore[misc]
            local_addr=(source, 0),
            remote_addr=tuple(spec["server"]),
        )
        askers.append(asker)
    for asker in askers:
        for _ in range(share):
            asker.send()
    while not all(a.done.done() for a in askers):
        await asyncio.sleep(0.1)
        for asker in askers:
            asker.expire()
    for asker in askers:
        if asker.transport is not None:
            asker.transport.close()
    return {
        "rate": tally.in_window / spec["duration"],
        "answered": tally.answered,
        "lost": tally.lost,
        "failed": tally.failed,
        "last_error": tally.last_error,
        "p50_ms": percentile(tally.latency, 0.50) * 1e3,
        "p99_ms": percentile(tally.latency, 0.99) * 1e3,
    }


def serve_client() -> None:
    """Read one JSON command per stdin line, answer one JSON line per command."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        result = loop.run_until_complete(run_queries(json.loads(line)))
        print(json.dumps(result), flush=True)
    loop.close()


# ===========================================================================================
# Orchestration (role "main")
# ===========================================================================================


def start_dnsmasq(workdir: Path, names: int) -> Daemon:
    """Serve the bench names on 127.0.0.1:53: one host-record each, from a file of its own."""
    conf = workdir / "dnsmasq.conf"
    conf.write_text("".join(f"host-record={name_of(i)},{address_of(i)}\n" for i in range(names)))
    argv = [
        which("dnsmasq"),
        "-k",
        f"--conf-file={conf}",
        f"--port={DNSMASQ[1]}",
        f"--listen-address={DNSMASQ[0]}",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--local-ttl=300",
        "--user=root",
        f"--local=/{ZONE}/",
        f"--pid-file={workdir / 'dnsmasq.pid'}",
    ]
    daemon = start("dnsmasq", argv, workdir)
    wait_for(lambda: answers(DNSMASQ), 10, "dnsmasq", daemon)
    return daemon


def answers(server: tuple[str, int]) -> bool:
    """Return True when server answers name0 with its address."""
    import dns.exception
    import dns.message
    import dns.query

    try:
        reply = dns.query.udp(
            dns.message.make_query(name_of(0), "A"), server[0], port=server[1], timeout=0.5
        )
    except dns.exception.Timeout:
        return False  # not answering yet: asked again until the deadline
    got = {item.address for rrset in reply.answer for item in rrset if rrset.rdtype == 1}
    return got == {address_of(0)}


def config_yaml() -> str:
    """Return the gateway's configuration: the DNS proxy in front of dnsmasq."""
    return f"""\
proxy: {{listen: "127.0.0.1:3131"}}
admin: {{listen: "{ADMIN[0]}:{ADMIN[1]}"}}
resolver: {{nameservers: ["{DNSMASQ[0]}:{DNSMASQ[1]}"]}}
dns:
  listen: "{PROXY[0]}:{PROXY[1]}"
  upstreams: ["{DNSMASQ[0]}:{DNSMASQ[1]}"]
  blocked_answer: nxdomain
guard: {{allow: ["198.18.0.0/15"]}}
identity:
  static:
    - cidr: "{SOURCE_CIDR}"
      namespace: bench
      pod: dns-loadgen-0
      labels: {{app: loadgen}}
feeds:
  - {{name: local-ips, url: "feed-ips.txt", format: lines, period: 10m}}
  - {{name: local-domains, url: "feed-domains.txt", format: lines, period: 10m}}
policy: {{files: ["policy.yaml"]}}
sinks: [{{type: file, path: "events.jsonl"}}]
reload: {{watch: false}}
"""


POLICY = """\
default: deny
tiers:
  - name: security
    rules:
      - name: block-threat-feeds
        action: deny
        to: {feeds: ["*"]}
  - name: apps
    rules:
      - name: bench-names
        action: allow
        from: {namespace: bench, labels: {app: loadgen}}
        to: {domains: ["*.bench.test"]}
"""


def start_egressgw(workdir: Path, ready_timeout: float, feed_entries: int) -> Daemon:
    """Write the gateway's files, start it and wait for /readyz and a proxied answer."""
    gw_dir = workdir / "egressgw"
    gw_dir.mkdir()
    (gw_dir / "policy.yaml").write_text(POLICY)
    (gw_dir / "egressgw.yaml").write_text(config_yaml())
    ips = [
        f"203.0.113.{i % 256}" if i < 256 else f"198.51.{i // 256}.{i % 256}"
        for i in range(feed_entries)
    ]
    (gw_dir / "feed-ips.txt").write_text("\n".join(ips) + "\n")
    (gw_dir / "feed-domains.txt").write_text(
        "\n".join(f"bad{i}.evil.test" for i in range(feed_entries)) + "\n"
    )
    egressgw = Path(sys.executable).parent / "egressgw"
    if not egressgw.exists():
        raise BenchError(f"{egressgw} not found: pip install -e . into this interpreter")
    argv = [str(egressgw), "run", "--config", str(gw_dir / "egressgw.yaml")]
    daemon = start("egressgw", argv, workdir)

    def ready() -> bool:
        conn = http.client.HTTPConnection(*ADMIN, timeout=1)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    wait_for(ready, ready_timeout, "egressgw", daemon)
    wait_for(lambda: answers(PROXY), 10, "egressgw DNS proxy", daemon)
    return daemon


@dataclass
class Sample:
    """One run of one path."""

    rate: float
    answered: float
    gw_cpu: float
    dnsmasq_cpu: float
    p50_ms: float
    p99_ms: float


def measure(
    args: argparse.Namespace, client: Client, path: str, gw: Daemon | None, dnsmasq: Daemon
) -> Sample:
    """Run the load against one path and return the sample."""
    server = PROXY if path == "egressgw" else DNSMASQ
    spec = {
        "server": list(server),
        "inflight": args.inflight,
        "names": args.names,
        "warmup": args.warmup,
        "duration": args.duration,
    }
    gw_before = cpu_seconds(gw.popen.pid) if gw else 0.0
    dm_before = cpu_seconds(dnsmasq.popen.pid)
    result = client.call(spec)
    gw_cpu = cpu_seconds(gw.popen.pid) - gw_before if gw else 0.0
    dm_cpu = cpu_seconds(dnsmasq.popen.pid) - dm_before
    if result["lost"] or result["failed"]:
        print(
            f"  ! {path}: {result['lost']} lost, {result['failed']} failed"
            f" ({result['last_error']})",
            file=sys.stderr,
        )
    if args.verbose:
        print(f"  {path:<9} {result['rate']:>10.0f} q/s", file=sys.stderr)
    return Sample(
        float(result["rate"]),
        float(result["answered"]),
        gw_cpu if path == "egressgw" else 0.0,
        dm_cpu,
        float(result["p50_ms"]),
        float(result["p99_ms"]),
    )


def median(values: Sequence[float]) -> float:
    """Return the median, 0.0 when empty."""
    return statistics.median(values) if values else 0.0


def report(results: dict[str, list[Sample]]) -> list[str]:
    """Return the result table as lines."""
    gw, direct = results.get("egressgw", []), results.get("direct", [])

    def col(samples: list[Sample], value: Callable[[Sample], float], digits: int = 0) -> str:
        values = [value(s) for s in samples if s.answered]
        return f"{median(values):,.{digits}f}" if values else "-"

    def row(label: str, mine: str, theirs: str = "-", ratio: str = "") -> str:
        return f"{label:<34}{mine:>12}{theirs:>12}{ratio:>12}".rstrip()

    ratios = [g.rate / d.rate for g, d in zip(gw, direct, strict=False) if d.rate > 0]
    spreads = [
        (max(r) - min(r)) / median(r)
        for r in ([s.rate for s in gw], [s.rate for s in direct])
        if len(r) > 1 and median(r) > 0
    ]
    lines = [row("figure", "egressgw", "direct", "egw/direct")]
    lines.append("-" * len(lines[0]))
    lines += [
        row(
            "queries/s",
            col(gw, lambda s: s.rate),
            col(direct, lambda s: s.rate),
            f"{median(ratios):.2f}x" if ratios else "-",
        ),
        row("  latency p50 ms", col(gw, lambda s: s.p50_ms, 2), col(direct, lambda s: s.p50_ms, 2)),
        row("  latency p99 ms", col(gw, lambda s: s.p99_ms, 2), col(direct, lambda s: s.p99_ms, 2)),
        row("  egressgw CPU us/query", col(gw, lambda s: s.gw_cpu / s.answered * 1e6)),
        row(
            "  dnsmasq CPU us/query",
            col(gw, lambda s: s.dnsmasq_cpu / s.answered * 1e6),
            col(direct, lambda s: s.dnsmasq_cpu / s.answered * 1e6),
        ),
        row("spread of the rounds", f"{max(spreads, default=0.0) * 100:.0f}%"),
    ]
    return lines


def count_lines(path: Path) -> int:
    """Return the number of lines in path, 0 when missing."""
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--role", choices=["main", "client"], default="main", help=argparse.SUPPRESS)
    p.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        help=f"rounds; medians are reported (default {DEFAULT_REPEAT})",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        help=f"seconds measured per path and round (default {DEFAULT_DURATION})",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=DEFAULT_WARMUP,
        help=f"seconds of load before measuring (default {DEFAULT_WARMUP})",
    )
    p.add_argument(
        "--inflight",
        type=int,
        default=DEFAULT_INFLIGHT,
        help=f"queries in flight, over {len(SOURCES)} sockets (default {DEFAULT_INFLIGHT})",
    )
    p.add_argument(
        "--names",
        type=int,
        default=DEFAULT_NAMES,
        help=f"distinct names asked in turn (default {DEFAULT_NAMES})",
    )
    p.add_argument(
        "--feed-entries",
        type=int,
        default=DEFAULT_FEED_ENTRIES,
        help=f"entries in each local feed (default {DEFAULT_FEED_ENTRIES})",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT,
        help=f"seconds to wait for egressgw /readyz (default {DEFAULT_READY_TIMEOUT:.0f})",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, events)")
    p.add_argument("--verbose", "-v", action="store_true", help="print every sample")
    return p.parse_args(argv)


def bench_main(args: argparse.Namespace) -> int:
    """Set up the namespace and the processes, measure, print, tear down."""
    if os.geteuid() != 0:
        raise BenchError("run as root: the benchmark creates a network namespace")
    try:
        import dns.message  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError as e:
        raise BenchError(f"{e}: run with the project's interpreter, .venv/bin/python") from e
    which("ip")
    which("dnsmasq")
    workdir = Path(tempfile.mkdtemp(prefix="egressgw-dns-bench-"))
    netns = f"egressgw-dns-bench-{os.getpid()}"
    daemons: list[Daemon] = []
    started = time.monotonic()
    load = os.getloadavg()[0]
    if load > BUSY_LOAD:
        print(
            f"warning: load average {load:.2f} before starting: other processes share the"
            " CPUs, expect noisy figures",
            file=sys.stderr,
        )
    results: dict[str, list[Sample]] = {}
    try:
        enter_netns(netns)
        with stopping(daemons):
            dnsmasq = start_dnsmasq(workdir, args.names)
            daemons.append(dnsmasq)
            gw = start_egressgw(workdir, args.ready_timeout, args.feed_entries)
            daemons.append(gw)
            client = Client(workdir, __file__)
            daemons.append(client.daemon)
            for rep in range(args.repeat):
                print(f"round {rep + 1}/{args.repeat}", file=sys.stderr, flush=True)
                order = PATHS if rep % 2 == 0 else PATHS[::-1]
                for path in order:
                    sample = measure(
                        args, client, path, gw if path == "egressgw" else None, dnsmasq
                    )
                    results.setdefault(path, []).append(sample)
            events = sum(count_lines(f) for f in workdir.glob("egressgw/events.jsonl*"))
        print()
        print(
            f"egressgw DNS bench: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{os.cpu_count()} CPUs, {platform_line()}, load average {load:.2f} at start"
        )
        print(
            f"median of {args.repeat} rounds, {args.duration}s each after {args.warmup}s"
            f" warm-up; {args.inflight} queries in flight, {args.names} names;"
            f" total {time.monotonic() - started:.0f}s"
        )
        print()
        for line in report(results):
            print(line)
        print()
        print(f"ECS events written by egressgw: {events:,}")
    finally:
        delete_netns(netns)
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: dispatch on --role."""
    args = parse_args(argv)
    if args.role == "client":
        serve_client()
        return 0

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return bench_main(args)
    except BenchError as e:
        print(f"dns_bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dns_bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
