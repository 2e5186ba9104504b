"""The dialer on real loopback sockets: connect, source address, mark, failure, timeout, cancel."""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from egressgw.net.dial import SO_MARK, Dial, dial, open_socket
from egressgw.net.rawstream import Reactor

SETTLE = 2.0


class Outcome:
    """Records the one callback a dial makes."""

    def __init__(self) -> None:
        self.done = asyncio.get_running_loop().create_future()
        self.calls = 0

    def connected(self, sock: _socket.socket) -> None:
        self.calls += 1
        self.done.set_result(sock)

    def failed(self, exc: OSError) -> None:
        self.calls += 1
        self.done.set_result(exc)


@pytest.fixture
async def reactor() -> AsyncIterator[Reactor]:
    """The gateway's epoll set on the running loop."""
    r = Reactor(asyncio.get_running_loop())
    yield r
    r.close()


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A loopback listening socket on a free port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


def address(sock: socket.socket) -> tuple[str, int]:
    """The listening socket's address."""
    host, port = sock.getsockname()[:2]
    return host, port


async def test_a_connect_reports_the_connected_socket(
    reactor: Reactor, listening: socket.socket
) -> None:
    """A loopback connect is reported once, with a socket connected to the destination."""
    out = Outcome()
    pending = dial(reactor, address(listening), socket.AF_INET, out.connected, out.failed, 1.0)
    sock = await asyncio.wait_for(out.done, SETTLE)
    assert isinstance(sock, _socket.socket) and sock.getpeername() == address(listening)
    assert out.calls == 1 and (pending is None or pending.sock is None)
    sock.close()


async def test_the_source_address_is_what_the_peer_sees(
    reactor: Reactor, listening: socket.socket
) -> None:
    """`source` binds the local address: the destination accepts a peer at 127.0.0.2."""
    out = Outcome()
    dial(
        reactor,
        address(listening),
        socket.AF_INET,
        out.connected,
        out.failed,
        1.0,
        source="127.0.0.2",
    )
    sock = await asyncio.wait_for(out.done, SETTLE)
    assert isinstance(sock, _socket.socket)
    accepted, peer = listening.accept()
    assert peer[0] == "127.0.0.2" and sock.getsockname()[0] == "127.0.0.2"
    accepted.close()
    sock.close()


async def test_the_mark_is_set_on_the_socket(reactor: Reactor, listening: socket.socket) -> None:
    """`mark` sets SO_MARK (which policy routing matches) on the outbound socket."""
    out = Outcome()
    dial(reactor, address(listening), socket.AF_INET, out.connected, out.failed, 1.0, mark=0x2A)
    result = await asyncio.wait_for(out.done, SETTLE)
    if isinstance(result, PermissionError):
        pytest.skip("setting SO_MARK needs CAP_NET_ADMIN")
    assert isinstance(result, _socket.socket)
    assert result.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x2A
    result.close()


async def test_a_refused_connect_reports_the_error(reactor: Reactor) -> None:
    """Nothing listening: on_failed gets the connect's errno, on_done is never called."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    out = Outcome()
    dial(reactor, ("127.0.0.1", port), socket.AF_INET, out.connected, out.failed, 1.0)
    exc = await asyncio.wait_for(out.done, SETTLE)
    assert isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED
    await asyncio.sleep(0.05)
    assert out.calls == 1


@contextlib.contextmanager
def full_backlog() -> Iterator[tuple[str, int]]:
    """A listener whose accept queue is full: further SYNs are dropped, connects hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(server.getsockname())
            fillers.append(filler)
        yield address(server)
    finally:
        for filler in fillers:
            filler.close()
        server.close()


async def test_a_connect_that_hangs_fails_with_a_timeout(reactor: Reactor) -> None:
    """No answer within the time given: on_failed with TimeoutError, the socket unwatched."""
    with full_backlog() as target:
        out = Outcome()
        pending = dial(reactor, target, socket.AF_INET, out.connected, out.failed, 0.2)
        assert isinstance(pending, Dial)
        exc = await asyncio.wait_for(out.done, SETTLE)
    assert isinstance(exc, TimeoutError) and out.calls == 1
    assert reactor.masks == {} and pending.sock is None


async def test_a_cancelled_connect_calls_nothing(reactor: Reactor) -> None:
    """cancel() closes the socket; neither callback comes, not even at the timeout."""
    with full_backlog() as target:
        out = Outcome()
        pending = dial(reactor, target, socket.AF_INET, out.connected, out.failed, 0.1)
        assert isinstance(pending, Dial)
        pending.cancel()
        await asyncio.sleep(0.3)
    assert out.calls == 0 and reactor.masks == {}


async def test_open_socket_gives_a_socket_for_asyncio(
    reactor: Reactor, listening: socket.socket
) -> None:
    """The coroutine form returns a connected socket.socket asyncio can wrap."""
    sock = await open_socket(reactor, address(listening), socket.AF_INET, 1.0)
    assert isinstance(sock, socket.socket) and sock.getpeername() == address(listening)
    sock.close()
    with full_backlog() as target, pytest.raises(TimeoutError):
        await open_socket(reactor, target, socket.AF_INET, 0.1)
