#!/usr/bin/env python3
"""Loopback benchmark: egressgw against Squid 5.7 and a direct connection.

Run as root from the repository: ``.venv/bin/python bench/proxy_bench.py`` (``--help``
for longer runs). Needs ``squid``, ``dnsmasq``, ``wrk``, ``ip`` (iproute2) and, for the
transparent rows, ``nft`` (nftables). The default run takes about a minute.

Rules of the measurement:

- Everything runs in a network namespace this script creates (``ip netns add``) and
  deletes at the end, also on failure: a fresh TIME_WAIT table, its own sysctls, and a
  dnsmasq on 127.0.0.1:53 that answers Squid's per-connection reverse lookups and both
  proxies' name lookups at once.
- Four paths: egressgw (contract-like policy with feeds, static identity, file sink of
  ECS events), transparent (the same gateway's transparent listener: the client connects to
  the upstream's address as if direct and an nftables ``redirect`` sends it to the gateway),
  Squid (no caching, CONNECT to any port, access log on) and direct (the client connects to
  the upstream itself).
- Transparent capture: one nft table of the script's own in its namespace. Its ``output``
  nat chain redirects TCP from the transparent client's sources (127.0.1.64/26) to the
  listener, after returning packets that carry the gateway's ``node.exempt_mark`` (the
  gateway runs in node mode, so its outbound sockets carry it, as on a node). A redirect needs
  connection tracking: a ``raw`` chain leaves every other packet untracked, so the other paths
  run as they did before transparent was measured and only the redirected client leg pays for
  conntrack and NAT (on a node every leg would be tracked). Without ``nft``, or when the rule
  cannot be loaded, the transparent rows are skipped with the reason. Transparent has no
  absolute-form HTTP row: there is no proxy request to send.
- The load generator and the upstream servers are separate processes (uvloop, asyncio
  Protocols); HTTP requests/s come from wrk with a Lua script that sends absolute-form
  requests through the proxy, keep-alive on.
- Figures: CONNECT tunnels/s with setup latency (connect until the proxy's 200; for
  transparent and direct, the TCP connect) p50/p99, each tunnel doing one small
  request/response with the upstream and closing
  (with ``--tls-concurrency``, also tunnels whose first bytes are a real TLS ClientHello, as
  most real egress is: egressgw reads its SNI, Squid without ssl_bump relays it unread);
  absolute-form requests/s; bulk MB/s through one and several tunnels. Each figure is
  repeated, the paths alternate in rotating order, and the median is reported; a ratio
  between paths is the median of the per-round ratios (measured back to back), which
  holds up better than a ratio of medians when other processes share the CPUs.
- Proxy CPU is read from /proc/<pid>/stat (the proxy and its children) around each
  measurement and divided by the tunnels, requests or bytes the client completed; its
  system time is shown as the share "in the kernel" (system calls, and the TCP work of the
  peers a send wakes), the rest being the proxy's own code.
- Targets checked (one process each): tunnels/s and requests/s >= 1.2x Squid's, bulk >= 0.6x
  of direct; with ``--workers``, tunnels/s of N workers >= 1.2x of one.
- ``--workers 1,2``: also egressgw with ``proxy.workers: 2`` and Squid with ``workers 2``
  (SMP: run with ``--foreground`` instead of ``-N``, under a service name of its own for its
  shared memory and IPC sockets), each on a port of its own, measured in the same rounds; a
  table of their own compares them with one worker each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import http.client
import json
import math
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

# --- addresses and names inside the benchmark's namespace --------------------------------

UPSTREAM_IP = "127.0.0.20"
HTTP_PORT = 8080
BULK_PORT = 9000
TLS_PORT = 8443  # answers a tunnel's first bytes (a ClientHello) with RESPONSE
HTTP_NAME = "http.bench.test"
BULK_NAME = "bulk.bench.test"
DNS_IP = "127.0.0.1"
SQUID_LISTEN = ("127.0.0.1", 3129)
EGRESSGW_LISTEN = ("127.0.0.1", 3130)
EGRESSGW_ADMIN = ("127.0.0.1", 9091)
CLIENT_SOURCES = [f"127.0.0.{64 + i}" for i in range(64)]
# transparent mode's client: connects to the upstream itself, from sources the redirect catches
TRANSPARENT_SOURCES = [f"127.0.1.{64 + i}" for i in range(64)]
TRANSPARENT_CIDR = "127.0.1.64/26"
TRANSPARENT_LISTEN = ("127.0.0.1", 15001)  # an output-chain redirect goes to 127.0.0.1
EXEMPT_MARK = 0x539  # node.exempt_mark: the gateway's own sockets are not redirected
NFT_TABLE = "egressgw_bench"
CLIENT_CIDR = "127.0.0.64/26"
WRK_SOURCE_CIDR = "127.0.0.1/32"  # wrk cannot pick a source address

# --- defaults (each has a flag) ------------------------------------------------------------

DEFAULT_REPEAT = 3
DEFAULT_DURATION = 0.8
DEFAULT_WARMUP = 0.2
DEFAULT_CONCURRENCY = (8, 64)
DEFAULT_STREAMS = (1, 8)
DEFAULT_WRK_CONNECTIONS = 32
DEFAULT_WRK_THREADS = 1
DEFAULT_READY_TIMEOUT = 60.0
DEFAULT_FEED_ENTRIES = 1000
BUSY_LOAD = 0.5  # 1-minute load average above which the figures are flagged as noisy

# --- wire constants shared by the client and the upstream processes ----------------------

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
# longer than a TLS record header: the gateway peeks at the first bytes of a tunnel
BULK_GO = b"START-BULK-STREAM\n"
BULK_CHUNK = bytes(1 << 20)
BULK_WRITE_HIGH = 4 << 20
BULK_READ_BUFFER = 256 << 10
MAX_HEADER_BYTES = 16 << 10
ERROR_BACKOFF = 0.01
CLONE_NEWNET = 0x40000000
STOP_TIMEOUT = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

PATHS = ("egressgw", "transparent", "squid", "direct")


# ===========================================================================================
# Upstream servers (role "upstream")
# ===========================================================================================


class HttpUpstream(asyncio.Protocol):
    """Answers every request (headers only, no body) with RESPONSE, keep-alive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        count = buf.count(b"\r\n\r\n")
        if count and self.transport is not None:
            self.transport.write(RESPONSE * count)
            buf = buf[buf.rfind(b"\r\n\r\n") + 4 :]
        # keep only what could still complete a header end
        self.tail = buf[-3:]


class BulkUpstream(asyncio.Protocol):
    """Streams zeros as fast as the peer reads, once the peer sent BULK_GO."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=BULK_WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            self._fill()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._fill()

    def _fill(self) -> None:
        transport = self.transport
        while transport is not None and not self.paused and not transport.is_closing():
            transport.write(BULK_CHUNK)


class HelloUpstream(asyncio.Protocol):
    """Answers a connection's first bytes with RESPONSE: a stand-in for a TLS server's reply,
    so a tunnel that starts with a ClientHello completes one exchange (no TLS is spoken).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.answered and self.transport is not None:
            self.answered = True
            self.transport.write(RESPONSE)


async def serve_upstream() -> None:
    """Run the HTTP, bulk and ClientHello upstream servers until stdin closes."""
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(factory, UPSTREAM_IP, port, backlog=4096)
        for factory, port in (
            (HttpUpstream, HTTP_PORT),
            (BulkUpstream, BULK_PORT),
            (HelloUpstream, TLS_PORT),
        )
    ]
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    for server in servers:
        server.close()


# ===========================================================================================
# Load generator (role "client")
# ===========================================================================================


class TunnelError(Exception):
    """A tunnel or request failed: unexpected answer or early close."""


def connect_request(target: str) -> bytes:
    """Return a CONNECT request for host:port."""
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def origin_request(host: str) -> bytes:
    """Return the small request sent through each tunnel."""
    return f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def client_hello(server_name: str) -> bytes:
    """Return the first bytes Python's TLS client sends to server_name (a ClientHello)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def split_connect_reply(buf: bytes) -> tuple[bool, bytes] | None:
    """Return (ok, rest) once the proxy's CONNECT reply is complete, None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEADER_BYTES:
            raise TunnelError("CONNECT reply header too long")
        return None
    status = buf[: buf.find(b"\r\n")].split(b" ", 2)
    return len(status) >= 2 and status[1] == b"200", buf[end + 4 :]


class TunnelClient(asyncio.Protocol):
    """One tunnel: CONNECT (unless direct), 200, one request/response, close."""

    def __init__(
        self,
        done: asyncio.Future[tuple[float, float]],
        connect: bytes | None,
        request: bytes,
        t0: float,
    ) -> None:
        self.done = done
        self.connect = connect
        self.request = request
        self.t0 = t0  # before connect(): the factory runs once the TCP connection is up
        self.t_setup = 0.0
        self.buf = b""
        self.tunnelled = connect is None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.connect is not None:
            self.transport.write(self.connect)
        else:
            self.t_setup = time.perf_counter()
            self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        if not self.tunnelled:
            try:
                reply = split_connect_reply(self.buf)
            except TunnelError as e:
                self._fail(str(e))
                return
            if reply is None:
                return
            ok, self.buf = reply
            if not ok:
                self._fail(f"CONNECT refused: {data[:80]!r}")
                return
            self.tunnelled = True
            self.t_setup = time.perf_counter()
            self.transport.write(self.request)
        if len(self.buf) >= len(RESPONSE) and not self.done.done():
            if not self.buf.startswith(RESPONSE):
                self._fail(f"unexpected response {self.buf[:80]!r}")
                return
            now = time.perf_counter()
            self.transport.close()
            self.done.set_result((self.t_setup - self.t0, now - self.t0))

    def _fail(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        if not self.done.done():
            self.done.set_exception(TunnelError(reason))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(TunnelError(f"closed early: {exc or 'EOF'}"))


@dataclass
class Window:
    """The measurement window inside one client command."""

    start: float
    measure: float
    end: float

    @classmethod
    def starting_now(cls, warmup: float, duration: float) -> Window:
        """Return a window opening after warmup and lasting duration."""
        now = time.perf_counter()
        return cls(now, now + warmup, now + warmup + duration)


@dataclass
class Tally:
    """Counters one client command fills."""

    total: int = 0
    in_window: int = 0
    errors: int = 0
    last_error: str = ""
    setup: list[float] = field(default_factory=list)
    whole: list[float] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    """Return the q-quantile (0..1) of values by nearest rank, 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run_tunnels(spec: dict[str, Any]) -> dict[str, Any]:
    """Open tunnels at fixed concurrency for the window and report rate and latency."""
    loop = asyncio.get_running_loop()
    proxy: list[Any] | None = spec["proxy"]
    port = int(spec["target"].rpartition(":")[2])
    addr = (proxy[0], proxy[1]) if proxy else (UPSTREAM_IP, port)
    connect = connect_request(spec["target"]) if proxy else None
    if spec.get("first") == "tls":
        request = client_hello(spec["target"].rpartition(":")[0])
    else:
        request = origin_request(spec["target"])
    window = Window.starting_now(spec["warmup"], spec["duration"])
    tally = Tally()

    sources = TRANSPARENT_SOURCES if spec.get("transparent") else CLIENT_SOURCES

    async def worker(index: int) -> None:
        source = sources[index % len(sources)]
        while time.perf_counter() < window.end:
            done: asyncio.Future[tuple[float, float]] = loop.create_future()
            try:
                started = time.perf_counter()
                # uvloop's create_connection(host, port) is much faster than sock=...
                await loop.create_connection(
                    functools.partial(TunnelClient, done, connect, request, started),
                    *addr,
                    local_addr=(source, 0),
                )
                setup, whole = await done
            except (OSError, TunnelError) as e:
                tally.errors += 1
                tally.last_error = f"{type(e).__name__}: {e}"
                await asyncio.sleep(ERROR_BACKOFF)
                continue
            tally.total += 1
            finished = time.perf_counter()
            if window.measure <= finished <= window.end:
                tally.in_window += 1
                tally.setup.append(setup)
                tally.whole.append(whole)

    await asyncio.gather(*(worker(i) for i in range(spec["concurrency"])))
    duration = window.end - window.measure
    return {
        "rate": tally.in_window / duration,
        "total": tally.total,
        "errors": tally.errors,
        "last_error": tally.last_error,
        "setup_p50_ms": percentile(tally.setup, 0.50) * 1e3,
        "setup_p99_ms": percentile(tally.setup, 0.99) * 1e3,
        "whole_p50_ms": percentile(tally.whole, 0.50) * 1e3,
        "whole_p99_ms": percentile(tally.whole, 0.99) * 1e3,
    }


class BulkClient(asyncio.BufferedProtocol):
    """Reads a bulk stream through a tunnel (or directly) into a reused buffer."""

    def __init__(self, ready: asyncio.Future[None], connect: bytes | None, counter: list[int]):
        self.ready = ready
        self.connect = connect
        self.counter = counter
        self.buffer = memoryview(bytearray(BULK_READ_BUFFER))
        self.header = b""
        self.streaming = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.connect is not None:
            self.transport.write(self.connect)
        else:
            self._start()

    def _start(self) -> None:
        assert self.transport is not None
        self.streaming = True
        self.transport.write(BULK_GO)
        if not self.ready.done():
            self.ready.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.streaming:
            self.counter[0] += nbytes
            return
        self.header += bytes(self.buffer[:nbytes])
        try:
            reply = split_connect_reply(self.header)
        except TunnelError as e:
            self._fail(str(e))
            return
        if reply is None:
            return
        ok, rest = reply
        if not ok:
            self._fail(f"CONNECT refused: {self.header[:80]!r}")
            return
        self.counter[0] += len(rest)
        self._start()

    def _fail(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        if not self.ready.done():
            self.ready.set_exception(TunnelError(reason))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(TunnelError(f"closed early: {exc or 'EOF'}"))


async def run_bulk(spec: dict[str, Any]) -> dict[str, Any]:
    """Stream through N tunnels for the window and report MB/s (10**6 bytes)."""
    loop = asyncio.get_running_loop()
    proxy: list[Any] | None = spec["proxy"]
    addr = (proxy[0], proxy[1]) if proxy else (UPSTREAM_IP, BULK_PORT)
    connect = connect_request(spec["target"]) if proxy else None
    counter = [0]
    sources = TRANSPARENT_SOURCES if spec.get("transparent") else CLIENT_SOURCES
    transports: list[asyncio.Transport] = []
    readies: list[asyncio.Future[None]] = []
    for index in range(spec["streams"]):
        ready: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_connection(
            functools.partial(BulkClient, ready, connect, counter),
            *addr,
            local_addr=(sources[index % len(sources)], 0),
        )
        transports.append(transport)
        readies.append(ready)
    try:
        await asyncio.gather(*readies)
        window = Window.starting_now(spec["warmup"], spec["duration"])
        await asyncio.sleep(window.measure - time.perf_counter())
        at_start = counter[0]
        await asyncio.sleep(window.end - time.perf_counter())
        measured = counter[0] - at_start
        elapsed = time.perf_counter() - window.measure
    finally:
        for transport in transports:
            transport.abort()
    return {"rate": measured / elapsed / 1e6, "total": counter[0], "errors": 0, "last_error": ""}


class HttpClient(asyncio.Protocol):
    """Keep-alive absolute-form GET loop, one request in flight (used without wrk)."""

    def __init__(self, request: bytes, window: Window, tally: Tally) -> None:
        self.request = request
        self.window = window
        self.tally = tally
        self.buf = b""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        # the proxy may add headers: find the end of the header, then the 2-byte body
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or len(self.buf) < end + 4 + 2:
            return
        ok = self.buf.startswith(b"HTTP/1.1 200")
        self.buf = self.buf[end + 6 :]
        if not ok:
            self.tally.errors += 1
        now = time.perf_counter()
        self.tally.total += 1
        if self.window.measure <= now <= self.window.end:
            self.tally.in_window += 1
        if now < self.window.end:
            self.transport.write(self.request)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def run_http(spec: dict[str, Any]) -> dict[str, Any]:
    """Send keep-alive absolute-form requests for the window and report requests/s."""
    loop = asyncio.get_running_loop()
    proxy: list[Any] | None = spec["proxy"]
    if proxy:
        addr = (proxy[0], proxy[1])
        url = f"http://{spec['target']}/"
    else:
        addr = (UPSTREAM_IP, HTTP_PORT)
        url = "/"
    request = f"GET {url} HTTP/1.1\r\nHost: {spec['target']}\r\n\r\n".encode()
    window = Window.starting_now(spec["warmup"], spec["duration"])
    tally = Tally()
    protocols: list[HttpClient] = []
    for index in range(spec["connections"]):
        _, protocol = await loop.create_connection(
            functools.partial(HttpClient, request, window, tally),
            *addr,
            local_addr=(CLIENT_SOURCES[index % len(CLIENT_SOURCES)], 0),
        )
        protocols.append(protocol)
    await asyncio.wait([p.closed for p in protocols], timeout=window.end - time.perf_counter() + 5)
    for protocol in protocols:
        if protocol.transport is not None:
            protocol.transport.abort()
    return {
        "rate": tally.in_window / (window.end - window.measure),
        "total": tally.total,
        "errors": tally.errors,
        "last_error": "non-200 responses" if tally.errors else "",
    }


COMMANDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "tunnels": run_tunnels,
    "bulk": run_bulk,
    "http": run_http,
}


def serve_client() -> None:
    """Read one JSON command per stdin line, answer one JSON line per command."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        try:
            result = loop.run_until_complete(COMMANDS[spec["cmd"]](spec))
        except (OSError, TunnelError) as e:
            result = {"rate": 0.0, "total": 0, "errors": 1, "last_error": f"{e!r}"}
        print(json.dumps(result), flush=True)
    loop.close()


# ===========================================================================================
# Orchestration (role "main")
# ===========================================================================================


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


def which(name: str) -> str:
    """Return the path of a system program (sbin included) or raise BenchError."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=search)
    if found is None:
        raise BenchError(f"{name} not found: apt-get install {name}")
    return found


def run(*argv: str) -> None:
    """Run a short system command, raising BenchError with its stderr on failure."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {done.stderr.strip()}")


def enter_netns(name: str) -> None:
    """Create network namespace name, move this process into it and set it up."""
    run(which("ip"), "netns", "add", name)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise BenchError(f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)
    run(which("ip"), "link", "set", "lo", "up")
    # per-namespace sysctls: deep accept queues, wide port range, reuse TIME_WAIT ports
    for key, value in (
        ("net/core/somaxconn", "8192"),
        ("net/ipv4/tcp_max_syn_backlog", "8192"),
        ("net/ipv4/ip_local_port_range", "1024 65000"),
        ("net/ipv4/tcp_tw_reuse", "1"),
    ):
        Path("/proc/sys", key).write_text(value)


def delete_netns(name: str) -> None:
    """Kill whatever still runs in namespace name (all started by us) and delete it."""
    ip = which("ip")
    pids = subprocess.run([ip, "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        if int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    subprocess.run([ip, "netns", "del", name], capture_output=True, check=False)


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: Daemon) -> None:
    """Poll check until it is true; raise BenchError on timeout or if proc exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(f"{what} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.05)
    raise BenchError(f"{what} not ready after {timeout:.0f}s:\n{proc.tail()}")


@dataclass
class Daemon:
    """A child process with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    def tail(self, lines: int = 20) -> str:
        """Return the last lines of the log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate, then kill after STOP_TIMEOUT."""
        if self.popen.poll() is None:
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def clean_env() -> dict[str, str]:
    """Return the environment without proxy variables."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def start(name: str, argv: list[str], workdir: Path) -> Daemon:
    """Start argv with stdout and stderr into workdir/name.log."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean_env()
        )
    return Daemon(name, popen, log)


def tcp_open(addr: tuple[str, int]) -> bool:
    """Return True when a TCP connect to addr succeeds."""
    with socket.create_connection(addr, timeout=0.5):
        return True


def connect_works(proxy: tuple[str, int], source: str, target: str) -> bool:
    """Return True when a CONNECT through proxy reaches the HTTP upstream."""
    with socket.create_connection(proxy, timeout=2, source_address=(source, 0)) as sock:
        sock.sendall(connect_request(target))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                return False
            buf += chunk
        reply = split_connect_reply(buf)
        if reply is None or not reply[0]:
            raise BenchError(f"CONNECT {target} via {proxy} refused: {buf[:200]!r}")
        sock.sendall(origin_request(target))
        buf = reply[1]
        while len(buf) < len(RESPONSE):
            chunk = sock.recv(4096)
            if not chunk:
                return False
            buf += chunk
        return buf.startswith(RESPONSE)


def start_dnsmasq(workdir: Path) -> Daemon:
    """Serve the bench names and client PTR records on 127.0.0.1:53."""
    argv = [
        which("dnsmasq"),
        "-k",
        "--conf-file=/dev/null",
        "--port=53",
        f"--listen-address={DNS_IP}",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--bogus-priv",
        "--local-ttl=300",
        "--user=root",
        f"--host-record=localhost,{DNS_IP}",
        f"--host-record={HTTP_NAME},{UPSTREAM_IP}",
        f"--host-record={BULK_NAME},{UPSTREAM_IP}",
        f"--pid-file={workdir / 'dnsmasq.pid'}",
    ]
    argv += [f"--host-record=client{i}.bench.test,{ip}" for i, ip in enumerate(CLIENT_SOURCES)]
    daemon = start("dnsmasq", argv, workdir)

    def answers() -> bool:
        query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        query += b"".join(bytes([len(p)]) + p.encode() for p in HTTP_NAME.split("."))
        query += b"\x00\x00\x01\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            sock.sendto(query, (DNS_IP, 53))
            reply = sock.recv(512)
        return reply[:2] == b"\x12\x34" and reply[6:8] != b"\x00\x00"

    wait_for(answers, 10, "dnsmasq", daemon)
    return daemon


def start_upstream(workdir: Path) -> Daemon:
    """Start the upstream servers in their own process."""
    log = workdir / "upstream.log"
    with log.open("wb") as err:
        popen = subprocess.Popen(
            [sys.executable, __file__, "--role", "upstream"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    daemon = Daemon("upstream", popen, log)
    assert popen.stdout is not None
    if popen.stdout.readline().strip() != b"ready":
        raise BenchError(f"upstream servers failed:\n{daemon.tail()}")
    return daemon


SQUID_CONF = """\
# Equivalent of the egressgw bench config: no cache, CONNECT to any port, access log.
http_port {listen}
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log daemon:{dir}/access.log squid
coredump_dir {dir}
cache_effective_user proxy
cache deny all
dns_nameservers {dns}
visible_hostname egressgw-bench
pinger_enable off
icp_port 0
htcp_port 0
shutdown_lifetime 0 seconds
max_filedescriptors 65536
acl bench_clients src 127.0.0.0/8
http_access allow bench_clients
http_access deny all
"""


def start_squid(
    workdir: Path, name: str = "squid", listen: tuple[str, int] = SQUID_LISTEN, workers: int = 1
) -> Daemon:
    """Start Squid 5.7 in the foreground with the equivalent configuration (SMP with workers)."""
    squid_dir = workdir / name
    squid_dir.mkdir()
    shutil.chown(squid_dir, "proxy", "proxy")
    conf = squid_dir / "squid.conf"
    text = SQUID_CONF.format(listen=f"{listen[0]}:{listen[1]}", dir=squid_dir, dns=DNS_IP)
    argv = [which("squid"), "-N", "-f", str(conf)]
    if workers > 1:
        # -N is one process: SMP needs the master, whose --foreground keeps it our child. The
        # service name keeps its /dev/shm segments and IPC sockets apart from any other Squid.
        text += f"workers {workers}\n"
        argv = [which("squid"), "--foreground", "-n", squid_service(name), "-f", str(conf)]
    conf.write_text(text)
    daemon = start(name, argv, workdir)
    wait_for(lambda: tcp_open(listen), 30, name, daemon)
    return daemon


def squid_service(name: str) -> str:
    """The SMP Squid's service name (names its shared memory and IPC sockets)."""
    return f"egwbench{os.getpid()}{name.replace('-', '')}"


def remove_squid_ipc(name: str) -> None:
    """Remove what an SMP Squid may leave behind: its IPC sockets and shared memory."""
    service = squid_service(name)
    for pattern in (f"/run/squid/{service}-*", f"/dev/shm/{service}-*"):
        for leftover in Path("/").glob(pattern.lstrip("/")):
            with contextlib.suppress(OSError):
                leftover.unlink()


def policy_yaml() -> str:
    """Return the contract policy plus one rule that allows the bench workload."""
    return f"""\
default: deny
tiers:
  - name: security
    rules:
      - name: block-threat-feeds
        action: deny
        to: {{feeds: ["*"]}}
      - name: batch-audit-partner
        action: deny
        audit: true
        from: {{namespace: batch}}
        to: {{domains: ["*.partner.test"]}}
  - name: platform
    rules:
      - name: payments-to-psp
        action: allow
        from: {{namespace: payments, labels: {{app: api}}}}
        to: {{domains: ["allowed.test", "*.allowed.test"], ports: [8443, 8080]}}
      - name: partner-for-all
        action: allow
        to: {{domains: ["*.partner.test"], ports: [8443]}}
      - name: batch-to-reports
        action: pass
        from: {{namespace: batch}}
  - name: apps
    rules:
      - name: batch-to-storage
        action: allow
        from: {{namespace: batch, labels: {{app: report}}}}
        to: {{cidrs: ["127.0.0.20/32"], ports: [9000]}}
      - name: bench-loadgen-by-name
        action: allow
        from: {{namespace: bench, labels: {{app: loadgen}}}}
        to: {{domains: ["*.bench.test"], ports: [{HTTP_PORT}, {BULK_PORT}, {TLS_PORT}]}}
      - name: bench-loadgen-by-ip
        action: allow
        from: {{namespace: bench, labels: {{app: loadgen}}}}
        to: {{cidrs: ["{UPSTREAM_IP}/32"], ports: [{HTTP_PORT}, {BULK_PORT}, {TLS_PORT}]}}
"""


def config_yaml(
    egress_map: bool = True,
    listen: tuple[str, int] = EGRESSGW_LISTEN,
    admin: tuple[str, int] = EGRESSGW_ADMIN,
    workers: int = 1,
    transparent: bool = True,
) -> str:
    """Return the contract-shaped gateway configuration used by the benchmark (the transparent
    listener and node mode only where ``transparent``: one gateway owns its port)."""
    node = f"""\
transparent:
  listen: "{TRANSPARENT_LISTEN[0]}:{TRANSPARENT_LISTEN[1]}"
node:
  pod_cidrs: ["{TRANSPARENT_CIDR}"]
  exempt_mark: {EXEMPT_MARK:#x}
  firewall: false
"""
    return f"""\
proxy:
  listen: "{listen[0]}:{listen[1]}"
  workers: {workers}
admin:
  listen: "{admin[0]}:{admin[1]}"
  map: {{enabled: {"true" if egress_map else "false"}}}
resolver:
  nameservers: ["{DNS_IP}:53"]
guard:
  allow: ["127.0.0.0/8"]
identity:
  static:
    - cidr: "127.0.0.5/32"
      namespace: payments
      pod: api-5d8f7c-x2k4q
      serviceaccount: api
      labels: {{app: api, team: payments}}
    - cidr: "127.0.0.6/32"
      namespace: batch
      pod: report-28391-abcde
      labels: {{app: report}}
    - cidr: "{CLIENT_CIDR}"
      namespace: bench
      pod: loadgen-0
      serviceaccount: loadgen
      labels: {{app: loadgen}}
    - cidr: "{WRK_SOURCE_CIDR}"
      namespace: bench
      pod: wrk-0
      labels: {{app: loadgen}}
    - cidr: "{TRANSPARENT_CIDR}"
      namespace: bench
      pod: loadgen-transparent-0
      labels: {{app: loadgen}}
{node if transparent else ""}feeds:
  - name: local-ips
    url: "feed-ips.txt"
    format: lines
    period: 10m
  - name: local-domains
    url: "feed-domains.txt"
    format: lines
    period: 10m
policy:
  files: ["policy.yaml"]
sinks:
  - type: file
    path: "events.jsonl"
"""


def start_egressgw(
    workdir: Path,
    ready_timeout: float,
    feed_entries: int,
    egress_map: bool = True,
    workers: int = 1,
) -> Daemon:
    """Write the gateway's config, policy and feeds, start it and wait for /readyz."""
    name, listen, admin = worker_instance("egressgw", EGRESSGW_LISTEN, workers, EGRESSGW_ADMIN)
    gw_dir = workdir / name
    gw_dir.mkdir()
    (gw_dir / "policy.yaml").write_text(policy_yaml())
    # The workers' instance is measured beside the single process, which owns the transparent
    # port: it serves the explicit proxy only.
    config = config_yaml(egress_map, listen, admin, workers, transparent=workers == 1)
    (gw_dir / "egressgw.yaml").write_text(config)
    # documentation ranges and names: in the feeds, never contacted
    ips = [
        f"203.0.113.{i % 256}" if i < 256 else f"198.51.{i // 256}.{i % 256}"
        for i in range(feed_entries)
    ]
    (gw_dir / "feed-ips.txt").write_text("\n".join(ips) + "\n")
    names = [f"bad{i}.evil.test" for i in range(feed_entries)]
    (gw_dir / "feed-domains.txt").write_text("\n".join(names) + "\n")
    egressgw = Path(sys.executable).parent / "egressgw"
    if not egressgw.exists():
        raise BenchError(f"{egressgw} not found: pip install -e . into this interpreter")
    daemon = start(name, [str(egressgw), "run", "--config", str(gw_dir / "egressgw.yaml")], workdir)

    def ready() -> bool:
        conn = http.client.HTTPConnection(*admin, timeout=1)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    wait_for(ready, ready_timeout, name, daemon)
    return daemon


def transparent_script(table: str = NFT_TABLE) -> str:
    """Return the nft script of the transparent path's capture (see the module doc)."""
    port = TRANSPARENT_LISTEN[1]
    untracked = "ip saddr != 127.0.1.0/24 ip daddr != 127.0.1.0/24 notrack"
    return f"""\
add table inet {table}
delete table inet {table}
table inet {table} {{
  chain raw_output {{
    type filter hook output priority raw; policy accept;
    {untracked}
  }}
  chain raw_prerouting {{
    type filter hook prerouting priority raw; policy accept;
    {untracked}
  }}
  chain capture {{
    type nat hook output priority -100; policy accept;  # dstnat
    meta mark {EXEMPT_MARK:#x} return
    ip saddr {TRANSPARENT_CIDR} meta l4proto tcp counter redirect to :{port}
  }}
}}
"""


def load_transparent_rules() -> str | None:
    """Load the redirect of the transparent path; return why it cannot be, None when loaded."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    nft = shutil.which("nft", path=search)
    if nft is None:
        return "nft not found (apt-get install nftables)"
    done = subprocess.run(
        [nft, "-f", "-"], input=transparent_script(), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return f"nft could not load the redirect: {done.stderr.strip()}"
    return None


def redirected_packets() -> int:
    """Return the packets the redirect rule counted (0 when it is not there)."""
    listing = subprocess.run(
        [which("nft"), "list", "chain", "inet", NFT_TABLE, "capture"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for line in listing.splitlines():
        words = line.split()
        if "redirect" in words and "packets" in words:
            return int(words[words.index("packets") + 1])
    return 0


def transparent_works(target: str) -> bool:
    """Return True when a connection to the upstream from a transparent source is answered by
    way of the gateway (the redirect counted it)."""
    before = redirected_packets()
    with socket.create_connection(
        (UPSTREAM_IP, HTTP_PORT), timeout=2, source_address=(TRANSPARENT_SOURCES[0], 0)
    ) as sock:
        sock.sendall(origin_request(target))
        buf = b""
        while len(buf) < len(RESPONSE):
            chunk = sock.recv(4096)
            if not chunk:
                return False
            buf += chunk
    if redirected_packets() <= before:
        raise BenchError("a transparent connection was answered without the redirect")
    return buf.startswith(RESPONSE)


def worker_instance(
    path: str, listen: tuple[str, int], workers: int, admin: tuple[str, int] = ("", 0)
) -> tuple[str, tuple[str, int], tuple[str, int]]:
    """The path name, proxy and admin address of a proxy run with workers (ports + 10 each)."""
    if workers == 1:
        return path, listen, admin
    step = 10 * (workers - 1)
    return f"{path}-w{workers}", (listen[0], listen[1] + step), (admin[0], admin[1] + step)


def start_py_spy(target: Daemon, svg: Path, workdir: Path) -> Daemon:
    """Sample target with py-spy until stopped (SIGINT makes py-spy write the graph)."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        raise BenchError(f"{py_spy} not found: pip install py-spy into this interpreter")
    pid = str(target.popen.pid)
    argv = [str(py_spy), "record", "-p", pid, "-o", str(svg.resolve()), "-r", "200"]
    daemon = start("py-spy", [*argv, "-f", "flamegraph"], workdir)
    daemon.stop_signal = signal.SIGINT
    return daemon


def cpu_seconds(pid: int) -> float:
    """Return user+system CPU seconds of pid and all its descendants."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """Return (user, system) CPU seconds of pid and all its descendants."""
    user = system = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                stack.extend(int(c) for c in task.read_text().split())
    return user, system


class Client:
    """The load-generator process, driven by JSON lines (``script --role client``: this one's,
    or a sibling benchmark's)."""

    def __init__(self, workdir: Path, script: str = __file__) -> None:
        self.log = workdir / "client.log"
        with self.log.open("wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, script, "--role", "client"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.daemon = Daemon("client", cast("subprocess.Popen[bytes]", self.popen), self.log)
        if not self._readline():
            raise BenchError(f"client failed to start:\n{self.daemon.tail()}")

    def _readline(self) -> str:
        assert self.popen.stdout is not None
        return self.popen.stdout.readline()

    def call(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Run one command in the client and return its result."""
        stdin = cast(TextIO, self.popen.stdin)
        stdin.write(json.dumps(spec) + "\n")
        stdin.flush()
        line = self._readline()
        if not line:
            raise BenchError(f"client died:\n{self.daemon.tail()}")
        return cast(dict[str, Any], json.loads(line))


@dataclass
class Sample:
    """One measurement of one figure on one path."""

    rate: float
    cpu: float
    work: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Bench:
    """What the measurement loop needs: processes, targets and options."""

    args: argparse.Namespace
    client: Client
    workdir: Path
    proxies: dict[str, tuple[tuple[str, int], Daemon]]
    results: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def target(self, name: str, port: int) -> str:
        """Return the CONNECT / Host target for the upstream at port."""
        return f"{UPSTREAM_IP if self.args.by_ip else name}:{port}"

    def proxy_of(self, path: str) -> tuple[tuple[str, int] | None, int | None]:
        """Return (proxy address, proxy pid) of path, (None, None) for direct."""
        if path == "direct":
            return None, None
        if path == "transparent":  # the client connects as if direct; the redirect does the rest
            return None, self.proxies["egressgw"][1].popen.pid
        addr, daemon = self.proxies[path]
        return addr, daemon.popen.pid

    def measure(self, figure: str, path: str, spec: dict[str, Any]) -> None:
        """Run one client command on path and record the sample."""
        proxy, pid = self.proxy_of(path)
        spec = {
            **spec,
            "proxy": list(proxy) if proxy else None,
            "transparent": path == "transparent",
            "warmup": self.args.warmup,
            "duration": self.args.duration,
        }
        before = cpu_split(pid) if pid else (0.0, 0.0)
        if spec["cmd"] == "http" and self.args.http_client == "wrk":
            result = self.run_wrk(proxy, spec["target"])
        else:
            result = self.client.call(spec)
        after = cpu_split(pid) if pid else (0.0, 0.0)
        cpu = sum(after) - sum(before)
        kernel = after[1] - before[1]
        if result["errors"]:
            print(
                f"  ! {figure} {path}: {result['errors']} errors ({result['last_error']})",
                file=sys.stderr,
            )
        extra = {k: float(v) for k, v in result.items() if k.endswith("_ms")}
        extra["kernel_cpu"] = kernel  # the system-call side of ``cpu``
        work = float(result["total"])
        self.results.setdefault((figure, path), []).append(
            Sample(float(result["rate"]), cpu, work, extra)
        )
        if self.args.verbose:
            print(f"  {figure:<16} {path:<9} {result['rate']:>10.1f}  cpu {cpu:.2f}s", flush=True)

    def run_wrk(self, proxy: tuple[str, int] | None, target: str) -> dict[str, Any]:
        """Run wrk (through proxy with absolute-form requests) and parse requests/s."""
        duration = self.args.warmup + self.args.duration
        argv = [
            which("wrk"),
            f"-t{self.args.wrk_threads}",
            f"-c{self.args.wrk_connections}",
            f"-d{math.ceil(duration)}s",
        ]
        if proxy is None:
            argv.append(f"http://{UPSTREAM_IP}:{HTTP_PORT}/")
        else:
            script = self.workdir / "proxy.lua"
            script.write_text(f'wrk.path = "http://{target}/"\nwrk.headers["Host"] = "{target}"\n')
            argv += ["-s", str(script), f"http://{proxy[0]}:{proxy[1]}/"]
        done = subprocess.run(argv, capture_output=True, text=True, env=clean_env())
        rate = total = errors = 0.0
        last_error = ""
        for line in done.stdout.splitlines():
            words = line.split()
            if line.startswith("Requests/sec:"):
                rate = float(words[1])
            elif "requests in" in line:
                total = float(words[0])
            elif line.strip().startswith(("Non-2xx", "Socket errors")):
                errors += 1
                last_error = line.strip()
        if done.returncode != 0 or rate == 0.0:
            raise BenchError(f"wrk failed: {done.stdout}{done.stderr}")
        return {"rate": rate, "total": total, "errors": errors, "last_error": last_error}


def figure_plan(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """Return (figure name, client command) for every figure, in run order."""
    plan: list[tuple[str, dict[str, Any]]] = []
    for conc in args.concurrency:
        plan.append((f"tunnels@{conc}", {"cmd": "tunnels", "concurrency": conc}))
    for conc in args.tls_concurrency:
        plan.append((f"tls@{conc}", {"cmd": "tunnels", "concurrency": conc, "first": "tls"}))
    plan.append(("http", {"cmd": "http", "connections": args.wrk_connections}))
    for streams in args.streams:
        plan.append((f"bulk@{streams}", {"cmd": "bulk", "streams": streams}))
    return plan


def run_all(bench: Bench, paths: list[str]) -> None:
    """Measure every figure repeat times, rotating the order of the paths each time."""
    plan = figure_plan(bench.args)
    for rep in range(bench.args.repeat):
        print(f"round {rep + 1}/{bench.args.repeat}", file=sys.stderr, flush=True)
        for index, (figure, spec) in enumerate(plan):
            shift = (rep + index) % len(paths)
            for path in paths[shift:] + paths[:shift]:
                if path == "transparent" and spec["cmd"] == "http":
                    continue  # no proxy request to send: the plain tunnels row is its HTTP
                name = BULK_NAME if spec["cmd"] == "bulk" else HTTP_NAME
                port = BULK_PORT if spec["cmd"] == "bulk" else HTTP_PORT
                if spec.get("first") == "tls":
                    port = TLS_PORT
                bench.measure(figure, path, {**spec, "target": bench.target(name, port)})


def median(values: Sequence[float]) -> float:
    """Return the median, 0.0 when empty."""
    return statistics.median(values) if values else 0.0


def fmt(value: float | None, digits: int = 0) -> str:
    """Format a figure for the table; '-' when absent."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def paired_ratio(mine: list[Sample], theirs: list[Sample]) -> float | None:
    """Return the median of per-round rate ratios (paths measured back to back), None if none."""
    ratios = [m.rate / t.rate for m, t in zip(mine, theirs, strict=False) if t.rate > 0]
    return median(ratios) if ratios else None


def report(bench: Bench) -> list[str]:
    """Return the result table and the target checks as lines."""
    res = bench.results
    cols = ["egressgw", "transparent", "squid", "direct"]

    def med(figure: str, path: str, key: str = "rate") -> float | None:
        samples = res.get((figure, path))
        if not samples:
            return None
        return median([s.rate if key == "rate" else s.extra.get(key, 0.0) for s in samples])

    def cpu_per(figure: str, path: str, scale: float) -> float | None:
        samples = res.get((figure, path))
        if not samples or path == "direct":
            return None
        return median([s.cpu / s.work * scale for s in samples if s.work])

    def kernel_share(figure: str, path: str) -> float | None:
        # How much of the proxy's CPU was its system calls (the rest: its own code)
        samples = res.get((figure, path))
        if not samples or path == "direct":
            return None
        return median([100 * s.extra.get("kernel_cpu", 0.0) / s.cpu for s in samples if s.cpu])

    def rate_ratio(figure: str, other: str, mine: str = "egressgw") -> float | None:
        return paired_ratio(res.get((figure, mine), []), res.get((figure, other), []))

    def spread(figure: str) -> str:
        # the largest (max - min) / median over the paths: how noisy the rounds were
        worst = 0.0
        for path in cols:
            rates = [s.rate for s in res.get((figure, path), [])]
            if len(rates) > 1 and median(rates) > 0:
                worst = max(worst, (max(rates) - min(rates)) / median(rates))
        return f"{worst * 100:.0f}%"

    def times(value: float | None) -> str:
        return f"{value:.2f}x" if value else "-"

    ratio_heads = ["egw/squid", "egw/direct", "tp/direct", "tp/egw"]
    head = f"{'figure':<30}" + "".join(f"{c:>12}" for c in cols)
    head += "".join(f"{r:>11}" for r in ratio_heads) + f"{'spread':>8}"
    lines = [head, "-" * len(head)]

    def rate_row(label: str, figure: str) -> None:
        values = [med(figure, p) for p in cols]
        ratios = [
            rate_ratio(figure, "squid"),
            rate_ratio(figure, "direct"),
            rate_ratio(figure, "direct", "transparent"),
            rate_ratio(figure, "egressgw", "transparent"),
        ]
        line = f"{label:<30}" + "".join(f"{fmt(v):>12}" for v in values)
        line += "".join(f"{times(r):>11}" for r in ratios)
        lines.append(line + f"{spread(figure):>8}")

    def detail_row(label: str, values: list[float | None], digits: int, ratios: bool) -> None:
        # CPU rows: egressgw's against Squid's, transparent's against explicit's
        egw, tp, squid = values[0], values[1], values[2]
        line = f"{label:<30}" + "".join(f"{fmt(v, digits):>12}" for v in values)
        vs_squid = egw / squid if ratios and egw and squid else None
        tp_egw = tp / egw if ratios and tp and egw else None
        lines.append(line + f"{times(vs_squid):>11}{'-':>11}{'-':>11}{times(tp_egw):>11}")

    tunnel_figures = [
        (f"tunnels@{c}", f"tunnels/s, {c} concurrent") for c in bench.args.concurrency
    ]
    tunnel_figures += [
        (f"tls@{c}", f"TLS tunnels/s, {c} concurrent") for c in bench.args.tls_concurrency
    ]
    for fig, label in tunnel_figures:
        rate_row(label, fig)
        detail_row("  setup p50 ms", [med(fig, p, "setup_p50_ms") for p in cols], 2, False)
        detail_row("  setup p99 ms", [med(fig, p, "setup_p99_ms") for p in cols], 2, False)
        detail_row("  tunnel p50 ms (whole)", [med(fig, p, "whole_p50_ms") for p in cols], 2, False)
        detail_row("  proxy CPU us/tunnel", [cpu_per(fig, p, 1e6) for p in cols], 0, True)
        detail_row("  of it in the kernel, %", [kernel_share(fig, p) for p in cols], 0, False)
    rate_row(f"http req/s ({bench.args.http_client}, c{bench.args.wrk_connections})", "http")
    detail_row("  proxy CPU us/request", [cpu_per("http", p, 1e6) for p in cols], 0, True)
    detail_row("  of it in the kernel, %", [kernel_share("http", p) for p in cols], 0, False)
    for streams in bench.args.streams:
        fig = f"bulk@{streams}"
        rate_row(f"bulk MB/s, {streams} stream(s)", fig)
        per_gb = 1e12  # CPU seconds per byte -> ms per 10**9 bytes
        detail_row("  proxy CPU ms/GB", [cpu_per(fig, p, per_gb) for p in cols], 0, True)
        detail_row("  of it in the kernel, %", [kernel_share(fig, p) for p in cols], 0, False)

    lines.append("")
    # The performance targets (one process each): tunnels and requests 1.2x Squid's rate,
    # bulk 0.6x of direct. Two workers against one: in ``workers_report``.
    checks = [
        (f"tunnels/s, {conc} concurrent >= 1.2x squid", rate_ratio(f"tunnels@{conc}", "squid"), 1.2)
        for conc in bench.args.concurrency
    ]
    checks.append(("http req/s >= 1.2x squid", rate_ratio("http", "squid"), 1.2))
    checks += [
        (f"bulk, {n} stream(s) >= 0.6x direct", rate_ratio(f"bulk@{n}", "direct"), 0.6)
        for n in bench.args.streams
    ]
    for label, value, floor in checks:
        if value is not None:
            verdict = "PASS" if value >= floor else "FAIL"
            lines.append(f"target {label:<38} {value:.2f}x  {verdict}")
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

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--role", choices=["main", "upstream", "client"], default="main", help=argparse.SUPPRESS
    )
    p.add_argument(
        "--paths",
        default=",".join(PATHS),
        help="comma-separated subset of egressgw,transparent,squid,direct (default: all)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        help=f"rounds per figure; medians are reported (default {DEFAULT_REPEAT})",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        help=f"seconds measured per figure and path (default {DEFAULT_DURATION})",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=DEFAULT_WARMUP,
        help=f"seconds of load before measuring (default {DEFAULT_WARMUP})",
    )
    p.add_argument(
        "--concurrency",
        type=ints,
        default=list(DEFAULT_CONCURRENCY),
        help="tunnel concurrencies (default 8,64)",
    )
    p.add_argument(
        "--tls-concurrency",
        type=ints,
        default=[],
        help="also measure tunnels whose first bytes are a TLS ClientHello, at these"
        " concurrencies (default: none; e.g. 8)",
    )
    p.add_argument(
        "--streams",
        type=ints,
        default=list(DEFAULT_STREAMS),
        help="bulk stream counts (default 1,8)",
    )
    p.add_argument(
        "--wrk-connections",
        type=int,
        default=DEFAULT_WRK_CONNECTIONS,
        help=f"keep-alive connections for requests/s (default {DEFAULT_WRK_CONNECTIONS})",
    )
    p.add_argument(
        "--wrk-threads",
        type=int,
        default=DEFAULT_WRK_THREADS,
        help=f"wrk threads (default {DEFAULT_WRK_THREADS})",
    )
    p.add_argument(
        "--http-client",
        choices=["wrk", "own"],
        default="wrk",
        help="wrk, or this script's uvloop client, for requests/s (default wrk)",
    )
    p.add_argument(
        "--by-ip", action="store_true", help="CONNECT to the upstream's IP instead of its name"
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
    p.add_argument(
        "--no-map",
        action="store_true",
        help="run egressgw with the egress map off (admin.map.enabled: false), to measure its cost",
    )
    p.add_argument(
        "--workers",
        type=ints,
        default=[1],
        help="also run egressgw with proxy.workers and Squid with workers at these counts"
        " above 1, in the same rounds (e.g. 1,2; default 1: one process each)",
    )
    p.add_argument("--json", type=Path, help="also write the raw samples to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, events)")
    p.add_argument("--verbose", "-v", action="store_true", help="print every sample")
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="SVG",
        help="record a py-spy flame graph of egressgw over the whole run (py-spy must be"
        " installed next to this interpreter; sampling costs the gateway some speed)",
    )
    args = p.parse_args(argv)
    args.path_list = [x for x in args.paths.split(",") if x]
    unknown = set(args.path_list) - set(PATHS)
    if unknown or not args.path_list:
        p.error(f"--paths: unknown {sorted(unknown)}; choose from {','.join(PATHS)}")
    return args


@contextlib.contextmanager
def stopping(daemons: list[Daemon]) -> Iterator[None]:
    """Stop every daemon in reverse start order on exit."""
    try:
        yield
    finally:
        for daemon in reversed(daemons):
            with contextlib.suppress(OSError):
                daemon.stop()


def bench_main(args: argparse.Namespace) -> int:
    """Set up the namespace and the processes, measure, print, tear down."""
    if os.geteuid() != 0:
        raise BenchError("run as root: the benchmark creates a network namespace")
    try:
        import uvloop  # noqa: F401  (the client and upstream processes need it)
    except ImportError as e:
        raise BenchError(f"{e}: run with the project's interpreter, .venv/bin/python") from e
    for program in ("ip", "dnsmasq") + (("squid",) if "squid" in args.path_list else ()):
        which(program)
    if args.http_client == "wrk":
        which("wrk")
    workdir = Path(tempfile.mkdtemp(prefix="egressgw-bench-"))
    workdir.chmod(0o755)
    netns = f"egressgw-bench-{os.getpid()}"
    daemons: list[Daemon] = []
    skipped = ""
    started = time.monotonic()
    load = os.getloadavg()[0]
    if load > BUSY_LOAD:
        print(
            f"warning: load average {load:.2f} before starting: other processes share the CPUs,"
            " expect noisy figures",
            file=sys.stderr,
        )
    try:
        enter_netns(netns)
        if "transparent" in args.path_list:
            why = load_transparent_rules()
            if why:
                skipped = f"transparent rows skipped: {why}"
                print(skipped, file=sys.stderr)
                args.path_list.remove("transparent")
        gateway = bool({"egressgw", "transparent"} & set(args.path_list))
        with stopping(daemons):
            daemons.append(start_dnsmasq(workdir))
            daemons.append(start_upstream(workdir))
            client = Client(workdir)
            daemons.append(client.daemon)
            proxies: dict[str, tuple[tuple[str, int], Daemon]] = {}
            if "squid" in args.path_list:
                squid = start_squid(workdir)
                daemons.append(squid)
                proxies["squid"] = (SQUID_LISTEN, squid)
            if gateway:
                gw = start_egressgw(
                    workdir, args.ready_timeout, args.feed_entries, egress_map=not args.no_map
                )
                daemons.append(gw)
                proxies["egressgw"] = (EGRESSGW_LISTEN, gw)
            start_worker_paths(args, workdir, daemons, proxies)
            for path, (addr, daemon) in proxies.items():
                for source in (CLIENT_SOURCES[0], "127.0.0.1"):
                    target = f"{UPSTREAM_IP if args.by_ip else HTTP_NAME}:{HTTP_PORT}"
                    wait_for(
                        functools.partial(connect_works, addr, source, target),
                        10,
                        f"{path} CONNECT check",
                        daemon,
                    )
            if "transparent" in args.path_list:
                target = f"{UPSTREAM_IP if args.by_ip else HTTP_NAME}:{HTTP_PORT}"
                wait_for(
                    functools.partial(transparent_works, target),
                    10,
                    "transparent check",
                    proxies["egressgw"][1],
                )
            if args.py_spy and "egressgw" in proxies:
                daemons.append(start_py_spy(proxies["egressgw"][1], args.py_spy, workdir))
            bench = Bench(args, client, workdir, proxies)
            run_all(bench, args.path_list + [p for p in proxies if p not in args.path_list])
            lines = report(bench) + workers_report(bench)
            # the file sink rotates (events.jsonl.1, ...): count every file it wrote
            events = sum(count_lines(f) for f in workdir.glob("egressgw*/events.jsonl*"))
            access = count_lines(workdir / "squid" / "access.log")
        print()
        print(
            f"egressgw bench: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{os.cpu_count()} CPUs, {platform_line()}, load average {load:.2f} at start"
        )
        print(
            f"median of {args.repeat} rounds (ratios: median of per-round ratios),"
            f" {args.duration}s each after {args.warmup}s warm-up;"
            f" targets by {'IP' if args.by_ip else 'name'}; total {time.monotonic() - started:.0f}s"
        )
        print()
        for line in lines:
            print(line)
        print()
        if skipped:
            print(skipped)
        if gateway:
            print(f"ECS events written by egressgw: {events:,}")
        if "squid" in args.path_list:
            print(f"squid access.log lines: {access:,}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        f"{fig} {path}": [vars(s) for s in samples]
                        for (fig, path), samples in bench.results.items()
                    },
                    indent=1,
                )
            )
    finally:
        delete_netns(netns)
        for count in args.workers:
            remove_squid_ipc(f"squid-w{count}")
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def start_worker_paths(
    args: argparse.Namespace,
    workdir: Path,
    daemons: list[Daemon],
    proxies: dict[str, tuple[tuple[str, int], Daemon]],
) -> None:
    """Start egressgw and Squid with each worker count above 1 (``--workers``)."""
    for count in sorted(c for c in set(args.workers) if c > 1):
        if "squid" in args.path_list:
            name, listen, _ = worker_instance("squid", SQUID_LISTEN, count)
            daemon = start_squid(workdir, name, listen, count)
            daemons.append(daemon)
            proxies[name] = (listen, daemon)
        if "egressgw" in args.path_list:
            name, listen, _ = worker_instance("egressgw", EGRESSGW_LISTEN, count)
            daemon = start_egressgw(
                workdir, args.ready_timeout, args.feed_entries, not args.no_map, count
            )
            daemons.append(daemon)
            proxies[name] = (listen, daemon)


def workers_report(bench: Bench) -> list[str]:
    """The table of worker counts: rates, ratios to one worker and to Squid's, CPU per unit."""
    counts = sorted(c for c in set(bench.args.workers) if c > 1)
    if not counts:
        return []
    res = bench.results
    figures = [
        (f"tunnels@{c}", f"tunnels/s, {c} concurrent", 1e6, "us/tunnel")
        for c in bench.args.concurrency
    ]
    figures.append(("http", "http req/s", 1e6, "us/request"))
    lines = ["", "workers (median rate; CPU of the proxy and its children per unit of work)"]
    checks = [""]
    for count in counts:
        egw, squid = f"egressgw-w{count}", f"squid-w{count}"
        head = f"{'figure':<26}{'egw w1':>10}{f'egw w{count}':>10}{'squid w1':>10}"
        head += f"{f'squid w{count}':>10}{f'egw w{count}/w1':>13}{f'vs squid w{count}':>14}"
        lines += [head, "-" * len(head)]
        for fig, label, scale, unit in figures:
            paths = ["egressgw", egw, "squid", squid]
            rates = [median([s.rate for s in res.get((fig, p), [])]) or None for p in paths]
            cpu = [
                median([s.cpu / s.work * scale for s in res.get((fig, p), []) if s.work]) or None
                for p in paths
            ]
            self_ratio = paired_ratio(res.get((fig, egw), []), res.get((fig, "egressgw"), []))
            squid_ratio = paired_ratio(res.get((fig, egw), []), res.get((fig, squid), []))
            line = f"{label:<26}" + "".join(f"{fmt(v):>10}" for v in rates)
            line += f"{f'{self_ratio:.2f}x' if self_ratio else '-':>13}"
            line += f"{f'{squid_ratio:.2f}x' if squid_ratio else '-':>14}"
            lines.append(line)
            lines.append(f"{'  CPU ' + unit:<26}" + "".join(f"{fmt(v):>10}" for v in cpu))
            if fig.startswith("tunnels@") and self_ratio:
                verdict = "PASS" if self_ratio >= 1.2 else "FAIL"
                checks.append(f"target {label} w{count}/w1 >= 1.2x  {self_ratio:.2f}x  {verdict}")
    return lines + checks


def platform_line() -> str:
    """Return the CPU model and kernel, for the record."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model or 'unknown CPU'}, Linux {os.uname().release}, Python {sys.version.split()[0]}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: dispatch on --role."""
    args = parse_args(argv)
    if args.role == "upstream":
        import uvloop

        uvloop.run(serve_upstream())
        return 0
    if args.role == "client":
        serve_client()
        return 0

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return bench_main(args)
    except BenchError as e:
        print(f"proxy_bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("proxy_bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
