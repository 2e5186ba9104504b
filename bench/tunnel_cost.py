"""The gateway's own Python work per CONNECT tunnel (or absolute-form request), with the
sockets taken away.

Run: ``.venv/bin/python bench/tunnel_cost.py [--tunnels 5000] [--repeat 7] [--tls | --http]``

The loopback benchmark (``proxy_bench.py``) measures what users get, but on a shared 2-core VM
its rates move by tens of percent from run to run, so it cannot tell a 3% change in the
gateway's code from noise. This script can: it drives the real ``Listener``, ``RawStream``,
``ClientConnection`` and ``Gateway`` (decision path, metrics, both ECS events, the exporter's
serialisation) through whole tunnels, with sockets and the epoll set replaced by in-memory
stand-ins, and prints

- Python bytecode instructions and Python-level calls per tunnel, counted with a tracer: the
  same on every run to within one instruction (an event timestamp's date part is formatted
  once a second), the figure to compare two commits by;
- the wall time per tunnel (best of ``--repeat``), which still moves with the machine.

A tunnel is: accept, ``CONNECT http.bench.test:8080`` (the name's answer cached, as in a busy
gateway), 200, the client's first bytes through (a plain HTTP request, or with ``--tls`` the
ClientHello Python's TLS client sends, whose SNI the gateway reads), one response back, the
client's EOF, the destination's EOF. What it leaves out, the kernel's side of every system
call and the event loop's wake-ups, is about half of the gateway's CPU per tunnel in
``proxy_bench.py``.

With ``--http`` the unit is one absolute-form request on a kept-alive client connection, as
``proxy_bench.py``'s requests/s figure sends them: ``GET http://http.bench.test:8080/`` read,
decided (the name's answer cached), written to the upstream kept from the previous request,
its response read and relayed, both ECS events built.
"""

from __future__ import annotations

import argparse
import collections
import errno
import ipaddress
import sys
import tempfile
import time
import timeit
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import proxy_bench  # beside this script: the same policy and configuration as the loopback bench

import egressgw.listeners.explicit as proxy_module
import egressgw.net.dial as dial_module
import egressgw.net.rawstream as rawstream_module
from egressgw.app import Gateway
from egressgw.config import model as cfgmod
from egressgw.resolver import Resolution

TARGET = "http.bench.test:8080"
UPSTREAM = ipaddress.ip_address(proxy_bench.UPSTREAM_IP)
CONNECT = f"CONNECT {TARGET} HTTP/1.1\r\nHost: {TARGET}\r\n\r\n".encode()
REQUEST = f"GET / HTTP/1.1\r\nHost: {TARGET}\r\n\r\n".encode()
ABSOLUTE_REQUEST = f"GET http://{TARGET}/ HTTP/1.1\r\nHost: {TARGET}\r\n\r\n".encode()
CLIENT = (proxy_bench.CLIENT_SOURCES[0], 40000)
TOP = 12  # functions listed by their instructions


class FakeSocket:
    """A connected socket whose peer's bytes are queued in ``incoming`` (b"" is EOF)."""

    last_fd = 100

    def __init__(self, family: int = 2, kind: int = 1, proto: int = 0, fd: int | None = None):
        if fd is None:
            FakeSocket.last_fd += 1
            fd = FakeSocket.last_fd
        self.fd = fd
        self.family = family
        self.incoming: collections.deque[bytes] = collections.deque()
        SOCKETS[fd] = self

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, *args: Any) -> None:
        pass

    def connect_ex(self, address: Any) -> int:
        return errno.EINPROGRESS

    def getpeername(self) -> tuple[str, int]:
        return (proxy_bench.UPSTREAM_IP, proxy_bench.HTTP_PORT)

    def getsockname(self) -> tuple[str, int]:
        return proxy_bench.EGRESSGW_LISTEN

    def recv(self, size: int) -> bytes:
        if not self.incoming:
            raise BlockingIOError
        return self.incoming.popleft()

    def recv_into(self, view: memoryview, size: int = 0) -> int:
        if not self.incoming:
            raise BlockingIOError
        data = self.incoming.popleft()
        view[: len(data)] = data
        return len(data)

    def send(self, data: Any) -> int:
        return len(data)

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        SOCKETS.pop(self.fd, None)


SOCKETS: dict[int, FakeSocket] = {}


class FakeListeningSocket(FakeSocket):
    """Hands out one waiting client per accept."""

    waiting: collections.deque[int] = collections.deque()

    def _accept(self) -> tuple[int, tuple[str, int]]:
        if not self.waiting:
            raise BlockingIOError
        return self.waiting.popleft(), CLIENT


class FakeEpoll:
    """The Reactor's epoll set: registrations are kept by the Reactor's own tables anyway."""

    closed = False

    def register(self, fd: int, mask: int) -> None:
        pass

    def unregister(self, fd: int) -> None:
        pass

    def modify(self, fd: int, mask: int) -> None:
        pass

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        return []

    def fileno(self) -> int:
        return 99


class FakeLoop:
    """The few loop methods the proxy calls; call_soon callbacks run at the end of a tunnel."""

    def __init__(self) -> None:
        self.soon: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        pass

    def remove_reader(self, fd: int) -> None:
        pass

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.soon.append((callback, args))

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Any:
        return types.SimpleNamespace(cancel=lambda: None)

    def time(self) -> float:
        return time.monotonic()

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        raise context["exception"]

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for callback, args in soon:
            callback(*args)


def build(first_bytes: bytes, egress_map: bool = True) -> Callable[[], None]:
    """A gateway on fake sockets, and a function that runs one tunnel through it."""
    gateway, loop, reactor, listener = build_gateway(egress_map)
    pending = gateway.exporter._pending

    def tunnel() -> None:
        client = accept(listener, CONNECT)
        upstream = SOCKETS[FakeSocket.last_fd]
        client.incoming.append(first_bytes)
        reactor.readers[client.fd]()
        upstream.incoming.append(proxy_bench.RESPONSE)
        reactor.readers[upstream.fd]()
        client.incoming.append(b"")
        reactor.readers[client.fd]()
        upstream.incoming.append(b"")
        reactor.readers[upstream.fd]()
        loop.run_soon()
        pending.clear()  # the exporter's writer would take them; here nobody does

    for _ in range(100):
        tunnel()
    if gateway.connections:
        raise SystemExit(f"tunnels left open: {gateway.connections}")
    return tunnel


def build_http(egress_map: bool = True) -> Callable[[], None]:
    """A gateway on fake sockets with one kept-alive client, and a function that sends one
    absolute-form request through it and relays its response.
    """
    gateway, loop, reactor, listener = build_gateway(egress_map)
    pending = gateway.exporter._pending
    client = accept(listener, b"")

    def request() -> None:
        client.incoming.append(ABSOLUTE_REQUEST)
        reactor.readers[client.fd]()
        (conn,) = gateway.connections
        upstream = conn.upstream
        assert upstream is not None, "the request did not reach an upstream"
        fake = upstream.transport.sock
        fake.incoming.append(proxy_bench.RESPONSE)
        reactor.readers[fake.fd]()
        loop.run_soon()
        pending.clear()  # the exporter's writer would take them; here nobody does

    for _ in range(100):
        request()
    if len(gateway.upstreams) != 1:
        raise SystemExit(f"upstreams not kept: {len(gateway.upstreams)} parked")
    return request


def accept(listener: Any, first: bytes) -> FakeSocket:
    """Accept one client whose first bytes are ``first`` (none when empty)."""
    client = FakeSocket()
    if first:
        client.incoming.append(first)
    FakeListeningSocket.waiting.append(client.fd)
    # The Listener wraps the accepted descriptor in a socket of its own: queue on that one.
    socket_module = rawstream_module._socket
    rawstream_module._socket = types.SimpleNamespace(  # type: ignore[assignment]
        socket=lambda family, kind, proto, fd: client
    )
    listener._on_acceptable()
    rawstream_module._socket = socket_module
    return client


def build_gateway(egress_map: bool) -> tuple[Gateway, FakeLoop, Any, Any]:
    """A gateway, its loop, reactor and listener, all on fake sockets."""
    socket_module = types.SimpleNamespace(socket=FakeSocket)
    rawstream_module._socket = socket_module  # type: ignore[assignment]
    dial_module._socket = socket_module  # type: ignore[assignment]
    workdir = Path(tempfile.mkdtemp(prefix="tunnel-cost-"))
    (workdir / "policy.yaml").write_text(proxy_bench.policy_yaml())
    (workdir / "egressgw.yaml").write_text(proxy_bench.config_yaml())
    (workdir / "feed-ips.txt").write_text("203.0.113.1\n")
    (workdir / "feed-domains.txt").write_text("bad1.evil.test\n")
    cfg = cfgmod.load_config(workdir / "egressgw.yaml")
    if not egress_map:
        cfg = cfg.model_copy(
            update={
                "admin": cfg.admin.model_copy(update={"map": cfgmod.EgressMapConfig(enabled=False)})
            }
        )
    gateway = Gateway(cfg, workdir / "egressgw.yaml")
    loop = FakeLoop()
    gateway.loop = loop  # type: ignore[assignment]
    reactor = rawstream_module.Reactor(loop)  # type: ignore[arg-type]
    reactor.epoll = FakeEpoll()  # type: ignore[assignment]
    gateway.reactor = reactor
    answer = Resolution(TARGET.split(":")[0], (UPSTREAM,), (), 300.0)
    gateway.runtime.resolver._cache[answer.name] = (float("inf"), answer)
    listener = rawstream_module.Listener(
        reactor,
        FakeListeningSocket(),  # type: ignore[arg-type]
        lambda: proxy_module.ClientConnection(gateway),
    )
    return gateway, loop, reactor, listener


def count(tunnel: Callable[[], None], n: int) -> tuple[float, float, list[tuple[str, float]]]:
    """Bytecode instructions and calls per tunnel, and the functions with the most."""
    ops: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    here = Path(__file__).name

    def trace(frame: types.FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if Path(code.co_filename).name == here:
            return None  # the stand-ins are not the gateway's work
        name = f"{Path(code.co_filename).name}:{code.co_name}"
        if event == "call":
            calls[name] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            ops[name] += 1
        return trace

    sys.settrace(trace)
    try:
        for _ in range(n):
            tunnel()
    finally:
        sys.settrace(None)
    top = [(name, ops[name] / n) for name, _ in ops.most_common(TOP)]
    return sum(ops.values()) / n, sum(calls.values()) / n, top


def main() -> None:
    """Parse arguments, run, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tunnels", type=int, default=5000, help="tunnels per timed run")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs; the best is printed")
    ap.add_argument("--counted", type=int, default=200, help="tunnels traced for the counts")
    ap.add_argument("--tls", action="store_true", help="the client's first bytes are a ClientHello")
    ap.add_argument(
        "--http", action="store_true", help="count absolute-form requests on a kept connection"
    )
    ap.add_argument(
        "--no-map", action="store_true", help="without the egress map (admin.map.enabled: false)"
    )
    args = ap.parse_args()
    if args.http:
        unit, tunnel = "request", build_http(egress_map=not args.no_map)
    else:
        first = proxy_bench.client_hello(TARGET.split(":")[0]) if args.tls else REQUEST
        unit, tunnel = "tunnel", build(first, egress_map=not args.no_map)
    ops, calls, top = count(tunnel, args.counted)
    best = min(timeit.repeat(tunnel, number=args.tunnels, repeat=args.repeat))
    print(f"per {unit}: {ops:,.0f} bytecode instructions, {calls:.0f} Python calls (counted)")
    print(f"per {unit}: {best / args.tunnels * 1e6:.1f} us of Python (best of {args.repeat})")
    print("most instructions:")
    for name, n in top:
        print(f"  {n:6.0f}  {name}")


if __name__ == "__main__":
    main()
