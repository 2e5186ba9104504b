"""2,000 slow clients against one gateway while a normal client keeps making requests.

Three kinds of slow client, spread over 40 source addresses: slowloris (a
partial first request head, one more byte every few seconds), keep-alive
slowloris (one whole request and its answer, then a second head trickled the
same way) and non-readers (a request for a 512 KiB answer, a tiny receive
buffer, nothing ever read). The normal client must keep being answered fast,
the gateway must close every trickling client at its head timeout, stay small,
and give back every descriptor once the slow clients go.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support import Gateway, ScriptedDns, raw_request, write_config
from tests.support.mutation import response_kind
from tests.support.playback import IP_BIND_ADDRESS_NO_PORT
from tests.support.procfs import metric, open_fds, rss_bytes, settle
from tests.support.scripted_upstream import Role, ScriptedUpstream

from .testbed import CONTRACT_DIR, PAYMENTS

pytestmark = pytest.mark.integration

UPSTREAM_IP = "127.0.0.73"
SOURCES = [f"127.0.2.{i}" for i in range(1, 41)]
SLOWLORIS = 800
KEEPALIVE_SLOWLORIS = 600
NON_READERS = 600
HEAD_TIMEOUT = 8.0
# Upstreams the normal client's requests leave parked go after 1 s idle: the descriptors check
# below then sees them given back too.
LIMITS = {
    "head_timeout": f"{HEAD_TIMEOUT:g}s",
    "idle_timeout": "60s",
    "max_connections": 5000,
    "upstream_idle_timeout": "1s",
}
FDS_SETTLE = 10.0
TRICKLE_INTERVAL = (2.0, 4.0)  # seconds between two bytes of a slowloris
CLOSE_SLACK = 3.0  # the sweep interval (1 s) and scheduling on two busy cores
NORMAL_PERIOD = 0.02
NORMAL_TIMEOUT = 5.0
MAX_P99 = 0.2
MAX_RSS = 150 * 1024 * 1024
NOFILE = 16384
SETTLE_TIMEOUT = 10.0
TINY_RCVBUF = 4096
POLICY = f"""\
tiers:
  - name: slow
    rules:
      - name: anyone-to-the-slow-upstream
        action: allow
        to: {{cidrs: ["{UPSTREAM_IP}/32"], protocols: [http]}}
"""


def big_answer_tag() -> str:
    """Return a tag the scripted upstream answers with its 512 KiB body."""
    i = 0
    while response_kind(f"slow-{i}") != "big-body":
        i += 1
    return f"slow-{i}"


@dataclass
class SlowRun:
    """What the run measured."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    peak_connections: float = 0.0
    peak_rss: int = 0
    late_closes: list[float] = field(default_factory=list)  # seconds past the head timeout
    never_closed: int = 0
    opened: int = 0
    fds_before: int = 0
    fds_after: int = 0
    fds_new: dict[int, str] = field(default_factory=dict)  # descriptors not there before
    connections_after: float = -1.0
    seconds: float = 0.0


def raise_nofile() -> None:
    """Raise this process's descriptor limit (the gateway, started later, inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def open_from(source: str, gw: Gateway) -> socket.socket:
    """Return a non-blocking connection to the proxy from `source`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, (gw.proxy_host, gw.proxy_port))
    return sock


async def trickle_until_closed(sock: socket.socket, head: bytes, rng: random.Random) -> float:
    """Send `head` one byte at a time until the proxy closes; return when it closed."""
    loop = asyncio.get_running_loop()

    async def closed() -> float:
        with contextlib.suppress(OSError):
            while await loop.sock_recv(sock, 65536):
                pass
        return time.monotonic()

    waiter = loop.create_task(closed())
    try:
        for byte in head:
            await loop.sock_sendall(sock, bytes([byte]))
            done, _ = await asyncio.wait({waiter}, timeout=rng.uniform(*TRICKLE_INTERVAL))
            if done:
                break
        return await waiter
    except OSError:
        return await waiter


async def read_one_response(sock: socket.socket) -> bytes:
    """Read until one small response head and its Content-Length body are in."""
    loop = asyncio.get_running_loop()
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return head


async def normal_client(gw: Gateway, url: str, stop: asyncio.Event, run: SlowRun) -> None:
    """Make one request after another on fresh connections, timing each."""
    request = f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with asyncio.timeout(NORMAL_TIMEOUT):
                sock = await open_from(PAYMENTS, gw)
                try:
                    await loop.sock_sendall(sock, request)
                    head = await read_one_response(sock)
                finally:
                    sock.close()
            if not head.startswith(b"HTTP/1.1 200"):
                run.failures.append(head.decode("latin-1")[:200])
        except (OSError, TimeoutError) as e:
            run.failures.append(repr(e))
        run.latencies.append(time.monotonic() - started)
        await asyncio.sleep(NORMAL_PERIOD)


async def play(gw: Gateway, port: int, run: SlowRun) -> None:
    """Open the slow clients, measure the normal one, then let the slow clients go."""
    assert gw.pid is not None
    rng = random.Random(7)
    url = f"http://{UPSTREAM_IP}:{port}/plain"
    partial = f"GET {url} HTTP/1.1\r\nHost: x\r\nX-Slow: {'s' * 40}".encode()
    big = f"GET http://{UPSTREAM_IP}:{port}/x/{big_answer_tag()} HTTP/1.1\r\nHost: x\r\n\r\n"
    stop = asyncio.Event()
    normal = asyncio.get_running_loop().create_task(normal_client(gw, url, stop, run))
    socks: list[socket.socket] = []
    trickles: list[asyncio.Task[float]] = []
    started: list[float] = []
    loop = asyncio.get_running_loop()
    for i in range(SLOWLORIS + KEEPALIVE_SLOWLORIS + NON_READERS):
        sock = await open_from(SOURCES[i % len(SOURCES)], gw)
        socks.append(sock)
        if i < SLOWLORIS:
            started.append(time.monotonic())
            trickles.append(loop.create_task(trickle_until_closed(sock, partial, rng)))
        elif i < SLOWLORIS + KEEPALIVE_SLOWLORIS:
            await loop.sock_sendall(sock, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await read_one_response(sock)
            started.append(time.monotonic())
            trickles.append(loop.create_task(trickle_until_closed(sock, partial, rng)))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RCVBUF)
            await loop.sock_sendall(sock, big.encode())
    run.opened = len(socks)
    deadline = max(started) + HEAD_TIMEOUT + CLOSE_SLACK
    while time.monotonic() < deadline:
        run.peak_connections = max(run.peak_connections, await asyncio.to_thread(metric_now, gw))
        run.peak_rss = max(run.peak_rss, rss_bytes(gw.pid))
        await asyncio.sleep(0.5)
    for begun, task in zip(started, trickles, strict=True):
        if task.done():
            run.late_closes.append(task.result() - begun - HEAD_TIMEOUT)
        else:
            run.never_closed += 1
            task.cancel()
    stop.set()
    await normal
    run.peak_rss = max(run.peak_rss, rss_bytes(gw.pid))
    for sock in socks:
        sock.close()


def metric_now(gw: Gateway) -> float:
    """Return the gateway's open connections gauge."""
    return metric(gw.admin_url, "egressgw_active_connections")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlowRun]:
    """Run the slow clients once against a fresh gateway and keep what was measured."""
    raise_nofile()
    with socket.socket() as probe:
        probe.bind((UPSTREAM_IP, 0))
        port = probe.getsockname()[1]
    with ScriptedDns({}) as dns, ScriptedUpstream([Role(UPSTREAM_IP, port, "http")]):
        path = write_config(
            tmp_path_factory.mktemp("gw-slow"),
            CONTRACT_DIR,
            nameserver=dns.nameserver,
            overrides={"proxy": LIMITS, "policy": {"files": ["slow-policy.yaml"]}},
            extra_files={"slow-policy.yaml": POLICY},
        )
        with Gateway(path) as gw:
            assert gw.pid is not None
            # One request first, so descriptors the gateway opens lazily count in the baseline.
            warm_up = f"GET http://{UPSTREAM_IP}:{port}/plain HTTP/1.1\r\nHost: x\r\n\r\n"
            reply, _ = raw_request(gw.proxy_host, gw.proxy_port, warm_up.encode(), source=PAYMENTS)
            assert reply.status == 200
            settle(lambda: metric_now(gw), lambda n: n == 0, SETTLE_TIMEOUT)
            # The file sink opens its file at the first write: wait for the warm-up's events.
            settle(lambda: len(gw.events()), lambda n: n >= 2, SETTLE_TIMEOUT)
            before = open_fds(gw.pid)
            result = SlowRun(fds_before=len(before))
            started = time.monotonic()
            asyncio.run(play(gw, port, result))
            pid = gw.pid
            result.connections_after = settle(
                lambda: metric_now(gw), lambda n: n == 0, SETTLE_TIMEOUT
            )
            after = settle(lambda: open_fds(pid), lambda f: len(f) <= result.fds_before, FDS_SETTLE)
            result.fds_after = len(after)
            result.fds_new = {fd: what for fd, what in after.items() if before.get(fd) != what}
            result.seconds = time.monotonic() - started
            yield result


def test_all_slow_clients_were_held_open(run: SlowRun) -> None:
    """The 2,000 slow connections were all open on the gateway at once (the test is real)."""
    assert run.opened == SLOWLORIS + KEEPALIVE_SLOWLORIS + NON_READERS
    assert run.peak_connections >= run.opened, run.peak_connections


def test_normal_client_keeps_fast_answers(run: SlowRun) -> None:
    """Meanwhile a normal client's requests all succeed, with a p99 latency under 200 ms."""
    assert run.latencies and not run.failures, run.failures[:5]
    ordered = sorted(run.latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    assert p99 < MAX_P99, f"p99 {p99 * 1000:.0f} ms over {len(ordered)} requests"


def test_trickling_clients_are_closed_at_the_head_timeout(run: SlowRun) -> None:
    """Every trickling client, on its first request or a later one, is closed at head_timeout."""
    late = [round(s, 1) for s in run.late_closes if s > CLOSE_SLACK]
    assert run.never_closed == 0 and not late, (
        f"{run.never_closed} never closed, {len(late)} closed late: {late[:10]}"
    )


def test_memory_stays_bounded(run: SlowRun) -> None:
    """The gateway's resident memory stays under 150 MB with 2,000 slow clients."""
    assert run.peak_rss < MAX_RSS, f"peak RSS {run.peak_rss / 2**20:.0f} MiB"


def test_everything_is_given_back(run: SlowRun) -> None:
    """Once the slow clients have gone, no connection is on the books and descriptors are back."""
    assert run.connections_after == 0
    assert run.fds_after <= run.fds_before, (run.fds_before, run.fds_after, run.fds_new)
