"""Tests of the tunnel piece: a checked target dialled, the first bytes peeked, bytes relayed.

The connection runs on the running loop's epoll set with real loopback sockets: the client is
one end of a socket pair, the destination an echo server.
"""

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from egressgw.flow import Flow
from egressgw.listeners.connection import Mode
from egressgw.listeners.explicit import ClientConnection
from egressgw.net.rawstream import RawStream
from egressgw.wire.responses import CONNECT_ESTABLISHED
from tests.support.hub import FakeHub, FakeStream, LiveHub, loopback_runtime

WAIT = 5.0


def client_hello(server_name: str) -> bytes:
    """The first bytes Python's TLS client sends to ``server_name``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class Echo:
    """A loopback TCP server echoing what it reads, keeping a copy."""

    def __init__(self) -> None:
        self.received = b""
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Echo until EOF."""
        while data := await reader.read(65536):
            self.received += data
            writer.write(data)
        writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    """An echo server on a free loopback port."""
    e = Echo()
    server = await asyncio.start_server(e.handle, "127.0.0.1", 0)
    e.port = server.sockets[0].getsockname()[1]
    async with server:
        yield e


async def open_tunnel(tmp_path: Path, port: int) -> tuple[LiveHub, ClientConnection, socket.socket]:
    """A client connection told to tunnel to 127.0.0.1:port; the client's socket."""
    hub = LiveHub(loopback_runtime(tmp_path))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    conn = ClientConnection(hub)  # type: ignore[arg-type]
    stream = RawStream(hub.reactor, ours, conn, ("127.0.0.9", 50000))
    conn.connection_made(stream)
    stream.resume_reading()
    conn._open_tunnel(f"127.0.0.1:{port}".encode(), b"", None)
    return hub, conn, theirs


async def read_until_eof(sock: socket.socket) -> bytes:
    """Everything the socket receives until its peer closes."""
    loop, got = asyncio.get_running_loop(), b""
    while data := await asyncio.wait_for(loop.sock_recv(sock, 65536), WAIT):
        got += data
    return got


async def test_a_tunnel_connects_to_the_checked_address_and_relays_both_ways(
    tmp_path: Path, echo: Echo
) -> None:
    """The 200 comes once connected; plain bytes make a tcp tunnel and are relayed and echoed."""
    hub, conn, client = await open_tunnel(tmp_path, echo.port)
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < len(CONNECT_ESTABLISHED):
        got += await asyncio.wait_for(loop.sock_recv(client, 65536), WAIT)
    assert got == CONNECT_ESTABLISHED and conn.mode is Mode.TUNNEL
    await loop.sock_sendall(client, b"ping")
    assert await asyncio.wait_for(loop.sock_recv(client, 4), WAIT) == b"ping"
    flow = hub.decided[-1]
    assert flow.protocol == "tcp" and flow.verdict is not None and flow.verdict.allowed
    assert str(flow.ip) == "127.0.0.1" and flow.bytes_out == 4
    client.shutdown(socket.SHUT_WR)
    assert await read_until_eof(client) == b""
    assert conn.mode is Mode.CLOSED and hub.ended == [flow] and flow.bytes_in == 4
    client.close()
    hub.reactor.close()


async def test_a_hello_naming_a_refused_host_closes_the_tunnel_before_any_byte_passes(
    tmp_path: Path, echo: Echo
) -> None:
    """An SNI the policy refuses closes the tunnel; the destination never sees the hello."""
    hub, conn, client = await open_tunnel(tmp_path, echo.port)
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < len(CONNECT_ESTABLISHED):
        got += await asyncio.wait_for(loop.sock_recv(client, 65536), WAIT)
    await loop.sock_sendall(client, client_hello("blocked.test"))
    assert await read_until_eof(client) == b""
    flow = hub.decided[-1]
    assert flow.verdict is not None and not flow.verdict.allowed
    assert flow.verdict.reason.startswith("TLS server name blocked.test: denied by t/not-this-name")
    assert flow.sni == "blocked.test" and flow.bytes_out == 0
    await asyncio.sleep(0.05)
    assert echo.received == b"" and conn.mode is Mode.CLOSED
    client.close()
    hub.reactor.close()


@pytest.mark.parametrize(
    ("bytes_in", "unsent", "normal"),
    [(100, 0, True), (0, 0, False), (100, 10, False)],
    ids=["all-delivered", "nothing-from-destination", "bytes-undelivered"],
)
def test_a_client_reset_is_a_normal_close_only_once_everything_was_delivered(
    bytes_in: int, unsent: int, normal: bool
) -> None:
    """A reset after the destination's bytes all reached the client's socket is no failure."""
    conn = ClientConnection(FakeHub())  # type: ignore[arg-type]
    conn.connection_made(FakeStream(unsent))  # type: ignore[arg-type]
    conn.mode = Mode.TUNNEL
    conn.flow = Flow(ipaddress.ip_address("127.0.0.9"), 50000, 0.0, 0.0)
    conn.flow.bytes_in = bytes_in
    assert conn._closed_after_exchange(ConnectionResetError()) is normal
    assert conn._closed_after_exchange(BrokenPipeError()) is False
