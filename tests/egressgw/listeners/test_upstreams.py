"""Tests of absolute-form upstreams: one relaying its answers to a fake client, then pooled
upstreams through real client connections (fake client streams, a stand-in hub) and a real
upstream on loopback that the test drives by hand: reuse across clients, an upstream closed while
parked, source addresses, the retry rules, a refusal's turn.
"""

from __future__ import annotations

import asyncio
import ipaddress
import select
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from egressgw.identity.static import StaticInventory
from egressgw.identity.workload import Workload
from egressgw.listeners.explicit import ClientConnection
from egressgw.listeners.upstreams import HttpUpstream, UpstreamFailure
from tests.support.hub import FakeHub, FakeStream, LiveHub, loopback_runtime

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
DEADLINE = 10.0


class RelayClient:
    """The client side an upstream relays to: keeps what is written, counted and reported."""

    via_header = b"Via: 1.1 egressgw\r\n"

    def __init__(self) -> None:
        self.out = b""
        self.status = 0
        self.done: list[bool] = []
        self.failed: list[tuple[UpstreamFailure, bool]] = []

    def write(self, data: bytes) -> None:
        """Keep the bytes for the client."""
        self.out += data

    def flow_bytes_in(self, n: int) -> None:
        """Bytes from the upstream (not counted here)."""

    def note_status(self, status: int) -> None:
        """Keep the forwarded status."""
        self.status = status

    def pause_client_reading(self) -> None:
        """Not paused here."""

    def resume_client_reading(self) -> None:
        """Not paused here."""

    def response_done(self, reusable: bool) -> None:
        """Keep the outcome."""
        self.done.append(reusable)

    def upstream_failed(self, failure: UpstreamFailure, answered_nothing: bool) -> None:
        """Keep the failure."""
        self.failed.append((failure, answered_nothing))


class Transport:
    """An upstream stream that only remembers being closed."""

    closed = False

    def close_quietly(self) -> None:
        """Close."""
        self.closed = True


def relaying(http10: bool = False) -> tuple[FakeHub, RelayClient, Transport, HttpUpstream]:
    """An upstream connection carrying a GET of a client."""
    hub, client, transport = FakeHub(), RelayClient(), Transport()
    up = HttpUpstream(hub, hub.upstreams, ("127.0.0.1", 80, None))  # type: ignore[arg-type]
    up.transport = transport  # type: ignore[assignment]
    up.begin(client, head_only=False, http10=http10, keep_alive=True)
    return hub, client, transport, up


def test_an_http10_client_gets_a_chunked_answer_dechunked_and_delimited_by_the_close() -> None:
    """No chunked coding toward HTTP/1.0: the body goes plain and the connection will close."""
    _, client, _, up = relaying(http10=True)
    up.data_received(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    head, _, body = client.out.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 200 OK",
        b"X-A: 1",
        b"Via: 1.1 egressgw",
        b"Connection: close",
    ]
    assert body == b"hello world" and client.status == 200
    assert client.done == [True] and up.client_close


def test_a_keep_alive_answer_is_reported_whole_and_reusable() -> None:
    """A Content-Length answer ends the exchange; the upstream may be parked."""
    _, client, transport, up = relaying()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.out.endswith(b"\r\n\r\nok") and client.done == [True]
    assert not transport.closed and up.client is None


def test_bytes_after_the_answer_in_the_same_read_are_not_the_next_answer() -> None:
    """A second response behind the first is unsolicited: the first is relayed, the upstream
    closed and not reusable, the second never reaches the client.
    """
    hub, client, transport, up = relaying()
    up.data_received(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    )
    assert client.done == [False] and b"evil" not in client.out and transport.closed
    assert hub.errors == ["bad_upstream_response"]


def test_bytes_from_an_upstream_asked_nothing_end_it() -> None:
    """An answer nobody asked for is not relayed: the upstream is closed and the error counted."""
    hub, client, transport = FakeHub(), RelayClient(), Transport()
    up = HttpUpstream(hub, hub.upstreams, ("127.0.0.1", 80, None))  # type: ignore[arg-type]
    up.transport = transport  # type: ignore[assignment]
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert transport.closed and client.out == b""
    assert hub.errors == ["bad_upstream_response"]


def test_a_response_head_late_past_the_response_timeout_is_a_504() -> None:
    """No head by its deadline: the exchange fails with 504, the upstream closes."""
    _, client, transport, up = relaying()
    up.head_deadline = 10.0
    up.expire(9.0)
    assert not client.failed
    up.expire(11.0)
    [(failure, nothing)] = client.failed
    assert (failure.status, failure.kind, nothing) == (504, "response_timeout", True)
    assert transport.closed


def test_an_upstream_closed_before_answering_says_it_answered_nothing() -> None:
    """Closed with no byte of a response: a failure the client may retry on a new upstream."""
    _, client, _, up = relaying()
    up.connection_lost(None)
    [(failure, nothing)] = client.failed
    assert (failure.status, failure.kind, nothing) == (502, "upstream_closed", True)


def test_an_upstream_closed_mid_answer_has_answered() -> None:
    """Closed after part of a length-framed answer: a failure that cannot be retried."""
    _, client, _, up = relaying()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    up.connection_lost(None)
    [(failure, nothing)] = client.failed
    assert failure.kind == "upstream_closed" and not nothing


class ClientStream(FakeStream):
    """A client stream from ``peer`` that keeps what the gateway writes to it."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The client's address."""
        return (self.peer, 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        """Nothing to pause."""

    def resume_reading(self) -> None:
        """Nothing to resume."""

    def close_after_reading(self, seconds: float) -> None:
        """Close once the peer is done (a refusal's way)."""
        self.closed_how = "after reading"

    @property
    def received(self) -> bytes:
        """Everything written to the client."""
        return b"".join(self.written)


class Upstream:
    """A listening socket on 127.0.0.1; the test accepts and answers by hand."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.peers: list[str] = []  # the source address of each accepted connection

    async def accept(self) -> socket.socket:
        """The next connection the gateway made."""
        loop = asyncio.get_running_loop()
        sock, peer = await asyncio.wait_for(loop.sock_accept(self.listener), DEADLINE)
        sock.setblocking(False)
        self.peers.append(peer[0])
        return sock

    def pending(self) -> bool:
        """True when a connection waits to be accepted."""
        return bool(select.select([self.listener], [], [], 0)[0])


async def read_request(sock: socket.socket) -> bytes:
    """One request head (and a Content-Length body) from an accepted connection."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), DEADLINE)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            while len(body) < int(line.split(b":")[1]):
                body += await asyncio.wait_for(loop.sock_recv(sock, 65536), DEADLINE)
    return data


async def until(check: Callable[[], bool], what: str) -> None:
    """Run the loop until ``check()`` holds (DEADLINE at most)."""
    for _ in range(int(DEADLINE / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {DEADLINE}s: {what}")


def closed_by_peer(upstream: HttpUpstream) -> None:
    """Wait (without running the loop) until the peer's close reached the gateway's socket:
    the gateway has not read it yet, as when a request goes out at that very moment.
    """
    assert select.select([upstream.transport.sock], [], [], DEADLINE)[0]


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[LiveHub]:
    """A stand-in gateway on the running loop allowing 127.0.0.1; its pool closed after."""
    live = LiveHub(loopback_runtime(tmp_path))
    yield live
    live.upstreams.close()
    live.reactor.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """The upstream's listening socket."""
    up = Upstream()
    yield up
    up.listener.close()


def client(hub: LiveHub, peer: str = "127.0.0.9") -> tuple[ClientConnection, ClientStream]:
    """A client connection from ``peer``."""
    stream = ClientStream(peer)
    conn = ClientConnection(hub)  # type: ignore[arg-type]
    conn.connection_made(stream)  # type: ignore[arg-type]
    return conn, stream


def request(port: int, path: str, method: str = "GET", body: bytes = b"") -> bytes:
    """An absolute-form request to the upstream."""
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return (
        f"{method} http://127.0.0.1:{port}{path} HTTP/1.1\r\nHost: x\r\n{length}\r\n".encode()
        + body
    )


async def exchange(
    hub: LiveHub, upstream: Upstream, peer: str = "127.0.0.9", path: str = "/one"
) -> tuple[socket.socket, ClientConnection, ClientStream]:
    """One whole request of a new client over a new upstream connection, answered 200."""
    conn, stream = client(hub, peer)
    conn.data_received(request(upstream.port, path))
    sock = await upstream.accept()
    assert (await read_request(sock)).startswith(f"GET {path} ".encode())
    sock.send(OK)
    await until(lambda: stream.received.endswith(b"\r\n\r\nok"), "the answer relayed")
    return sock, conn, stream


async def test_an_idle_upstream_serves_the_next_client(hub: LiveHub, upstream: Upstream) -> None:
    """Two clients, one after the other, to the same place: one upstream connection, two
    requests on it, and each request a flow of its own with its status and bytes.
    """
    sock, _, _ = await exchange(hub, upstream)
    assert len(hub.upstreams) == 1
    conn, stream = client(hub, "127.0.0.10")
    conn.data_received(request(upstream.port, "/two"))
    assert (await read_request(sock)).startswith(b"GET /two ")
    sock.send(OK)
    await until(lambda: stream.received.endswith(b"\r\n\r\nok"), "the second answer relayed")
    assert not upstream.pending() and len(upstream.peers) == 1
    assert [f.url for f in hub.ended] == [
        f"http://127.0.0.1:{upstream.port}/one",
        f"http://127.0.0.1:{upstream.port}/two",
    ]
    assert all(f.status == 200 and f.bytes_in == len(OK) and f.bytes_out for f in hub.ended)
    assert len(hub.decided) == 2
    sock.close()


async def test_an_upstream_closed_while_parked_leaves_the_pool(
    hub: LiveHub, upstream: Upstream
) -> None:
    """Its peer's close takes a parked upstream out of the pool; the next request connects anew."""
    sock, _, _ = await exchange(hub, upstream)
    sock.close()
    await until(lambda: len(hub.upstreams) == 0, "the closed upstream dropped")
    second, _, _ = await exchange(hub, upstream, path="/two")
    assert len(upstream.peers) == 2 and "upstream_reuse_failed" not in hub.errors
    second.close()


async def test_upstreams_are_not_shared_across_source_addresses(
    hub: LiveHub, upstream: Upstream
) -> None:
    """A namespace with an egress address gets upstreams of its own: another client to the same
    destination does not ride them, and the namespace's next request does.
    """
    assert isinstance(hub.runtime.inventory, StaticInventory)
    hub.runtime.inventory.update(
        [(ipaddress.ip_network("127.0.0.9/32"), Workload.make("payments", "api-1"))]
    )
    hub.egress_ips = {"payments": ipaddress.ip_address("127.0.0.55")}
    payments, _, _ = await exchange(hub, upstream, peer="127.0.0.9")
    other, _, _ = await exchange(hub, upstream, peer="127.0.0.10", path="/two")
    assert upstream.peers == ["127.0.0.55", "127.0.0.1"]
    conn, stream = client(hub, "127.0.0.9")
    conn.data_received(request(upstream.port, "/three"))
    assert (await read_request(payments)).startswith(b"GET /three ")
    payments.send(OK)
    await until(lambda: stream.received.endswith(b"\r\n\r\nok"), "the third answer relayed")
    assert len(upstream.peers) == 2
    payments.close()
    other.close()


async def test_an_idempotent_request_on_an_upstream_closed_as_it_went_out_is_retried(
    hub: LiveHub, upstream: Upstream
) -> None:
    """A GET on a parked upstream whose peer closed it (unread yet): sent, failed before any
    answer, sent once more on a new connection; the client sees only the answer.
    """
    sock, _, _ = await exchange(hub, upstream)
    (parked,) = hub.upstreams.parked
    sock.close()
    closed_by_peer(parked)
    conn, stream = client(hub, "127.0.0.10")
    conn.data_received(request(upstream.port, "/two"))
    fresh = await upstream.accept()
    assert (await read_request(fresh)).startswith(b"GET /two ")
    fresh.send(OK)
    await until(lambda: stream.received.endswith(b"\r\n\r\nok"), "the retried answer relayed")
    assert stream.received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert hub.errors == ["upstream_reuse_failed"]
    assert hub.ended[-1].status == 200 and hub.ended[-1].error is None
    fresh.close()


async def test_a_request_with_a_body_never_takes_an_upstream_its_peer_closed(
    hub: LiveHub, upstream: Upstream
) -> None:
    """A POST is not one to send twice: the parked upstream is peeked at first, found closed,
    dropped, and the POST goes out once, on a new connection.
    """
    sock, _, _ = await exchange(hub, upstream)
    (parked,) = hub.upstreams.parked
    sock.close()
    closed_by_peer(parked)
    conn, stream = client(hub, "127.0.0.10")
    conn.data_received(request(upstream.port, "/post", "POST", b"hello"))
    fresh = await upstream.accept()
    assert (await read_request(fresh)).startswith(b"POST /post ")
    fresh.send(OK)
    await until(lambda: stream.received.endswith(b"\r\n\r\nok"), "the answer relayed")
    assert not hub.errors and parked.closed
    fresh.close()


async def test_a_request_with_a_body_that_fails_on_a_reused_upstream_is_not_retried(
    hub: LiveHub, upstream: Upstream
) -> None:
    """A POST sent on a reused upstream that then closes without answering: a 502, and no
    second copy of it anywhere.
    """
    sock, _, _ = await exchange(hub, upstream)
    conn, stream = client(hub, "127.0.0.10")
    conn.data_received(request(upstream.port, "/post", "POST", b"hello"))
    assert (await read_request(sock)).startswith(b"POST /post ")
    sock.close()
    await until(lambda: stream.received.startswith(b"HTTP/1.1 502 "), "the 502")
    await asyncio.sleep(0.1)  # (a retry would have connected by now: the dial is synchronous)
    assert not upstream.pending() and len(upstream.peers) == 1
    assert hub.errors == ["upstream_closed"] and "upstream_reuse_failed" not in hub.errors
    assert hub.ended[-1].status == 502


async def test_a_client_gone_before_its_answer_ends_its_flow_and_closes_the_upstream(
    hub: LiveHub, upstream: Upstream
) -> None:
    """The client closes while its answer is awaited: the flow's end event says so, and the
    upstream (its answer still owed) is closed, not parked.
    """
    conn, _ = client(hub)
    conn.data_received(request(upstream.port, "/slow"))
    sock = await upstream.accept()
    await read_request(sock)
    conn.close()
    assert len(hub.ended) == 1 and hub.ended[0].error == "client closed before the response ended"
    assert len(hub.upstreams) == 0
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(sock, 10), DEADLINE) == b""
    sock.close()


async def test_a_refused_pipelined_request_is_answered_after_the_answers_before_it(
    hub: LiveHub, upstream: Upstream
) -> None:
    """A GET and a TRACE in one read: the TRACE's 405 waits for the GET's answer, then the
    connection closes; the 405 is never written into the middle of the answer before it.
    """
    conn, stream = client(hub)
    conn.data_received(
        request(upstream.port, "/one")
        + f"TRACE http://127.0.0.1:{upstream.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    sock = await upstream.accept()
    await read_request(sock)
    assert stream.received == b""  # nothing before the answer it waits for
    sock.send(OK[:-1])
    await until(lambda: stream.received.endswith(b"o"), "the answer begun")
    assert b"405" not in stream.received
    sock.send(OK[-1:])
    await until(lambda: stream.closed_how == "after reading", "the refusal")
    first, _, rest = stream.received.partition(b"\r\n\r\nok")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and rest.startswith(b"HTTP/1.1 405 ")
    assert len(hub.ended) == 1 and hub.ended[0].status == 200
    sock.close()
