"""Outbound connections: the one place the gateway opens them.

Rules:

- Only to an address already checked: ``dial`` takes an IP address as text, never a name (no
  resolution here, so what was decided is what is connected to).
- Non-blocking, on the gateway's ``Reactor``: no Task and no Transport per connect. A connect
  that finishes inside ``connect()`` (loopback and local peers) is reported at once, with no
  trip through the loop.
- Exactly one of ``on_done(sock)`` and ``on_failed(exc)`` is called, unless ``cancel`` came
  first: then neither, and the socket is closed. ``exc`` is a ``TimeoutError`` after
  ``connect_timeout`` seconds, else an ``OSError`` with the connect's errno.
- ``source`` binds the local address (the port stays the kernel's choice, picked at connect);
  ``mark`` sets SO_MARK for policy routing. Both are for the listeners that need them: tunnels
  and upstreams take the namespace's ``egress_ips`` source; the transparent listener also marks
  its connections with ``node.exempt_mark`` in node mode.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import socket
from collections.abc import Callable

from egressgw.net.rawstream import Reactor

# Linux constants the socket module may lack.
SO_MARK = getattr(socket, "SO_MARK", 36)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

Done = Callable[[_socket.socket], None]
Failed = Callable[[OSError], None]


class Dial:
    """One connect under way (``dial`` returns it when the connect did not finish at once)."""

    __slots__ = ("address", "on_done", "on_failed", "reactor", "sock", "timer")

    def __init__(
        self,
        reactor: Reactor,
        sock: _socket.socket,
        address: tuple[str, int],
        on_done: Done,
        on_failed: Failed,
        connect_timeout: float,
    ) -> None:
        self.reactor = reactor
        self.sock: _socket.socket | None = sock
        self.address = address
        self.on_done = on_done
        self.on_failed = on_failed
        reactor.add_writer(sock.fileno(), self._ready)
        self.timer = reactor.loop.call_later(connect_timeout, self._timed_out, connect_timeout)

    def cancel(self) -> None:
        """Abandon the connect: close the socket, call neither callback."""
        sock, self.sock = self.sock, None
        self.timer.cancel()
        self._unlink()
        if sock is not None:
            self.reactor.forget(sock.fileno())
            sock.close()

    def _ready(self) -> None:
        sock = self.sock
        if sock is None:
            return
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err and not _connected(sock):
            return  # a wake-up meant for an earlier socket with this descriptor number
        self.sock = None
        self.timer.cancel()
        self.reactor.remove_writer(sock.fileno())
        on_done, on_failed = self.on_done, self.on_failed
        self._unlink()
        if err:
            sock.close()
            on_failed(OSError(err, os.strerror(err)))
        else:
            on_done(sock)

    def _unlink(self) -> None:
        # The callbacks are bound methods of the dialer's owner, which keeps this object:
        # dropping them lets reference counting free both.
        self.on_done = _closed
        self.on_failed = _ignored

    def _timed_out(self, timeout: float) -> None:
        if self.sock is not None:
            on_failed = self.on_failed
            self.cancel()
            on_failed(TimeoutError(errno.ETIMEDOUT, f"no connection within {timeout:g}s"))


def dial(
    reactor: Reactor,
    address: tuple[str, int],
    family: int,
    on_done: Done,
    on_failed: Failed,
    connect_timeout: float,
    source: str | None = None,
    mark: int | None = None,
) -> Dial | None:
    """Connect to ``address`` (an IP as text, a port); None when the outcome was reported."""
    sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if source is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        err = sock.connect_ex(address)
    except OSError as e:
        sock.close()
        on_failed(e)
        return None
    if err == errno.EINPROGRESS:
        if not _connected(sock):
            return Dial(reactor, sock, address, on_done, on_failed, connect_timeout)
        err = 0  # loopback and local peers finish inside connect(): no loop round trip
    if err:
        sock.close()
        on_failed(OSError(err, os.strerror(err)))
    else:
        on_done(sock)
    return None


async def open_socket(
    reactor: Reactor,
    address: tuple[str, int],
    family: int,
    connect_timeout: float,
    source: str | None = None,
    mark: int | None = None,
) -> socket.socket:
    """``dial`` for a coroutine: the connected socket, or the failure raised."""
    done: asyncio.Future[_socket.socket] = reactor.loop.create_future()

    def connected(sock: _socket.socket) -> None:
        if done.done():
            sock.close()
        else:
            done.set_result(sock)

    def failed(exc: OSError) -> None:
        if not done.done():
            done.set_exception(exc)

    pending = dial(reactor, address, family, connected, failed, connect_timeout, source, mark)
    try:
        sock = await done
    except asyncio.CancelledError:
        if pending is not None:
            pending.cancel()
        raise
    # A socket.socket for asyncio's transports (the proxy's own streams take the C type).
    return socket.socket(family, socket.SOCK_STREAM, 0, sock.detach())


def _closed(sock: _socket.socket) -> None:
    sock.close()


def _ignored(exc: OSError) -> None:
    pass


def _connected(sock: _socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
