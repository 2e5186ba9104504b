"""Non-blocking sockets on one epoll set of their own: the proxy's transports.

Proxy sockets are ``_socket.socket``, the C type ``socket.socket`` extends: its Python layer
(reference-counted ``makefile`` support, enum-typed ``family``; ``accept`` wraps the new socket
through both) costs a dozen Python calls per connection, and the proxy needs none of it.

Why not the event loop's Transports or readers: a short tunnel is mostly system calls, and the
loop adds its own per connection. uvloop's Transport brings an object, call_soon'd callbacks
and getpeername/getsockname calls; its ``add_reader`` on a new descriptor costs an epoll
ADD, DEL, a FIONBIO ioctl and a failing DEL before the real ADD (strace of libuv's poll
handles), twice per tunnel. Here every proxy socket sits in one ``Reactor`` (an epoll set the
loop watches as a single reader): registering a socket is one epoll_ctl, closing it none (the
kernel drops a closed descriptor from the set).

``RawStream`` offers the Transport methods the proxy uses on a plain socket; ``Listener``
accepts connections in batches and gives each a ``RawStream`` and a new protocol. Semantics
follow asyncio's Transport: ``eof_received`` returning true keeps a half-closed stream open,
``close`` sends what is buffered first, ``connection_lost`` comes once, from the loop, after
the socket is closed; after a failure ``get_write_buffer_size`` is what was never sent.
A small write made while the reactor runs its callbacks waits for the batch to end (corking,
see ``CORK_MAX_STREAMS``), so that the sends to a peer come together.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import select
import socket
from collections.abc import Callable
from typing import Any, Protocol

import structlog

log = structlog.get_logger("egressgw.net.rawstream")

# One read takes up to this much; the pause threshold for what a stream buffers toward a peer.
RECV_SIZE = 256 * 1024
# Relayed bytes (a tunnel after its decision) pass through one buffer of this size, shared by
# every stream: the loop runs one callback at a time and each empties it before returning.
# Large reads mean few system calls per gigabyte; reusing one buffer means no allocation and no
# page faults per read (a fresh 256 KiB bytes object per read is an mmap and fresh pages).
RELAY_BUFFER_SIZE = 4 * 1024 * 1024
MIN_RELAY_CHUNK = 64 * 1024
_RELAY_BUFFER = bytearray(RELAY_BUFFER_SIZE)
_RELAY_VIEW = memoryview(_RELAY_BUFFER)
HIGH_WATER = 256 * 1024
LOW_WATER = HIGH_WATER // 4
# Seconds a closed stream may take to hand its last buffered bytes to a peer that stopped reading.
LINGER = 10.0
# Connections accepted per wake-up of the listening socket (more waits for the next round, so
# a burst of new clients cannot starve established ones). Each accepted CONNECT is read,
# decided and connected at once; 64 of them in a row held back the relaying of established
# tunnels for milliseconds. With 8, at 64 concurrent tunnels on loopback: +13% tunnels/s, -8%
# CPU per tunnel; neutral at 8 concurrent (docs/decisions.md).
ACCEPT_BATCH = 8
# After running out of file descriptors, accepting pauses this long instead of spinning.
ACCEPT_RETRY_DELAY = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Events taken from the epoll set per wake-up (the rest stay ready for the next one).
MAX_EVENTS = 512
# Writes made while the reactor runs callbacks are held ("corked") and sent when the batch is
# done, or once this many streams hold some. A send on loopback wakes the peer waiting to read
# (a cross-CPU wake-up, charged to the sender); sends bunched at the end of a batch find a peer
# still awake from the first one. Absolute-form HTTP with 32 keep-alive clients: 10.8k -> 16.1k
# requests/s and 92 -> 63 us of CPU per request (docs/decisions.md). Larger writes go at once:
# holding them means copying them.
CORK_MAX_STREAMS = 64
CORK_MAX_BYTES = 16 * 1024
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class Reactor:
    """An epoll set for the proxy's sockets, watched by the event loop as one reader.

    Level-triggered, like the loop's own readers. A descriptor with no interest left is removed
    from the set (an empty mask would still report hang-ups, over and over).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.masks: dict[int, int] = {}
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.corking = False  # callbacks are running: small writes are held until they end
        self.corked: list[RawStream] = []
        loop.add_reader(self.epoll.fileno(), self._dispatch)

    def _want(self, fd: int, mask: int) -> None:
        old = self.masks.get(fd, 0)
        if mask == old:
            return
        if not old:
            self.epoll.register(fd, mask)
        elif not mask:
            self.epoll.unregister(fd)
        else:
            self.epoll.modify(fd, mask)
        if mask:
            self.masks[fd] = mask
        else:
            del self.masks[fd]

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call back whenever fd is readable (or hung up)."""
        self.readers[fd] = callback
        self._want(fd, self.masks.get(fd, 0) | _IN)

    def remove_reader(self, fd: int) -> None:
        """Stop calling back for reads."""
        if self.readers.pop(fd, None) is not None:
            self._want(fd, self.masks.get(fd, 0) & ~_IN)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call back whenever fd is writable (or failed)."""
        self.writers[fd] = callback
        self._want(fd, self.masks.get(fd, 0) | _OUT)

    def remove_writer(self, fd: int) -> None:
        """Stop calling back for writes."""
        if self.writers.pop(fd, None) is not None:
            self._want(fd, self.masks.get(fd, 0) & ~_OUT)

    def forget(self, fd: int) -> None:
        """fd is about to be closed: drop its callbacks (closing removes it from the set)."""
        if self.masks.pop(fd, None) is not None:
            self.readers.pop(fd, None)
            self.writers.pop(fd, None)

    def close(self) -> None:
        """Stop watching (again is a no-op); the sockets stay open."""
        if not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()

    def uncork(self) -> None:
        """Send what the streams hold since callbacks began (``corking``)."""
        corked = self.corked
        if corked:
            self.corked = []
            for stream in corked:
                stream._uncork()

    def run_corked(self, callbacks: Callable[[], None]) -> None:
        """Run ``callbacks`` with small writes held until they return, then sent."""
        self.corking = True
        try:
            callbacks()
        finally:
            self.corking = False
            self.uncork()

    def _dispatch(self) -> None:
        self.run_corked(self._run_callbacks)

    def _run_callbacks(self) -> None:
        readers, writers = self.readers, self.writers
        for fd, events in self.epoll.poll(0, MAX_EVENTS):
            # A descriptor closed and reused within this batch may see an event meant for its
            # previous owner: every callback treats a spurious wake-up as "nothing yet".
            try:
                if events & _READABLE:
                    callback = readers.get(fd)
                    if callback is not None:
                        callback()
                if events & _WRITABLE:
                    callback = writers.get(fd)
                    if callback is not None:
                        callback()
            except Exception as exc:  # one socket's bug must not stop the others' events
                self.loop.call_exception_handler(
                    {"message": "proxy socket callback failed", "exception": exc}
                )


class StreamProtocol(Protocol):
    """What a RawStream calls (the asyncio.Protocol callbacks the proxy implements)."""

    def data_received(self, data: bytes) -> None:
        """Bytes arrived."""
        ...

    def eof_received(self) -> bool | None:
        """The peer finished sending; true keeps the stream open for writing."""
        ...

    def connection_lost(self, exc: Exception | None) -> None:
        """The stream is closed; exc says why when it was not closed on purpose."""
        ...

    def pause_writing(self) -> None:
        """The stream buffers more than HIGH_WATER: stop feeding it."""
        ...

    def resume_writing(self) -> None:
        """The buffer drained below LOW_WATER."""
        ...


class ServerProtocol(StreamProtocol, Protocol):
    """A protocol a Listener creates: told about its stream first."""

    def connection_made(self, transport: Any) -> None:
        """The stream is ready."""
        ...


def _ignore(n: int) -> None:
    pass


class _Gone:
    """The protocol of a stream whose connection_lost has been delivered: hears nothing."""

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


_GONE = _Gone()


class RawStream:
    """A connected non-blocking socket with the Transport methods the proxy uses."""

    __slots__ = (
        "buffer",
        "closing",
        "corked",
        "eof_pending",
        "fd",
        "loop",
        "peer",
        "protocol",
        "reactor",
        "reading",
        "relay_chunk",
        "relay_count",
        "relay_to",
        "released",
        "sock",
        "write_paused",
        "writing",
    )

    def __init__(
        self,
        reactor: Reactor,
        sock: _socket.socket,
        protocol: StreamProtocol,
        peer: Any = None,
    ) -> None:
        self.reactor = reactor
        self.loop = reactor.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = protocol
        self.peer = peer
        self.buffer = bytearray()
        self.reading = False
        self.writing = False
        self.closing = False
        self.corked = False  # what the buffer holds goes when the reactor's callbacks end
        self.eof_pending = False
        self.write_paused = False
        self.released = False
        self.relay_to: RawStream | None = None
        self.relay_count: Callable[[int], None] = _ignore
        self.relay_chunk = RECV_SIZE

    # -- reading --------------------------------------------------------------------------------
    def relay(self, to: RawStream, count: Callable[[int], None]) -> None:
        """From now on send what arrives straight to ``to`` (through the shared copy buffer),
        calling ``count`` with each amount; EOF and errors still go to the protocol.
        """
        self.relay_to = to
        self.relay_count = count

    def unrelay(self) -> None:
        """Hand what arrives to the protocol again (``relay`` undone)."""
        self.relay_to = None
        self.relay_count = _ignore

    def _on_readable(self) -> None:
        to = self.relay_to
        if to is not None:
            # Relaying: read into the one preallocated buffer and hand a view of it on.
            # ``to.write`` sends at once and copies only what the socket did not take, so the
            # buffer is free again when it returns; no bytes object is allocated per read.
            chunk = self.relay_chunk
            try:
                n = self.sock.recv_into(_RELAY_VIEW, chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._lost(e)
                return
            if n:
                self.relay_count(n)
                to.write(_RELAY_VIEW[:n])
                # Read about what the other side takes at once: a read it cannot take whole is
                # copied aside and pauses this side (system calls, a copy); a read it takes
                # whole lets the next one be larger.
                left = 0 if to.corked else len(to.buffer)
                if left:
                    self.relay_chunk = max(MIN_RELAY_CHUNK, (n - left) & ~0xFFFF)
                elif n == chunk and chunk < RELAY_BUFFER_SIZE:
                    self.relay_chunk = min(RELAY_BUFFER_SIZE, chunk + (chunk >> 1))
                return
        else:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._lost(e)
                return
            if data:
                self.protocol.data_received(data)
                return
        keep_open = self.protocol.eof_received()
        if self.closing:
            return  # the protocol closed both sides: the socket is gone, nothing to unwatch
        if keep_open:
            self.pause_reading()  # EOF stays readable: stop hearing about it
        else:
            self.close()

    def pause_reading(self) -> None:
        """Stop reading (a peer's buffer is full, or the stream reached EOF)."""
        if self.reading:
            self.reading = False
            self.reactor.remove_reader(self.fd)

    def resume_reading(self) -> None:
        """Read again."""
        if not self.reading and not self.closing:
            self.reading = True
            self.reactor.add_reader(self.fd, self._on_readable)

    # -- writing --------------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send now (from a reactor callback: when its batch ends), buffering what the socket
        does not take.
        """
        if self.closing:
            return
        if not self.buffer:
            reactor = self.reactor
            if reactor.corking and len(data) <= CORK_MAX_BYTES:
                self.buffer += data
                self.corked = self.writing = True
                corked = reactor.corked
                corked.append(self)
                if len(corked) >= CORK_MAX_STREAMS:
                    reactor.uncork()
                return
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self.buffer += data  # never sent: get_write_buffer_size says so
                self._lost(e)
                return
            if sent == len(data):
                return
            data = data[sent:]
        self.buffer += data
        if not self.writing:
            self.writing = True
            self.reactor.add_writer(self.fd, self._on_writable)
        if len(self.buffer) > HIGH_WATER and not self.write_paused:
            self.write_paused = True
            self.protocol.pause_writing()

    def _uncork(self) -> None:
        self.corked = self.writing = False
        if self.released:
            return
        buffer = self.buffer
        try:
            sent = self.sock.send(buffer)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self._lost(e)
            return
        del buffer[:sent]
        if buffer:
            self.writing = True
            self.reactor.add_writer(self.fd, self._on_writable)
            if self.closing:
                self.loop.call_later(LINGER, self._release, None)  # as close() would have
            elif len(buffer) > HIGH_WATER and not self.write_paused:
                self.write_paused = True
                self.protocol.pause_writing()
        elif self.closing:
            self._release(None)
        elif self.eof_pending:
            self.write_eof()

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self.buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        del self.buffer[:sent]
        if self.write_paused and len(self.buffer) <= LOW_WATER:
            self.write_paused = False
            self.protocol.resume_writing()
        if self.buffer:
            return
        self.reactor.remove_writer(self.fd)
        self.writing = False
        if self.closing:
            self._release(None)
        elif self.eof_pending:
            self.write_eof()

    def write_eof(self) -> None:
        """Half-close once the buffer is sent."""
        if self.buffer:
            self.eof_pending = True
            return
        self.eof_pending = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self._lost(e)

    def get_write_buffer_size(self) -> int:
        """Bytes waiting to be sent."""
        return len(self.buffer)

    # -- closing --------------------------------------------------------------------------------
    def is_closing(self) -> bool:
        """True once close() was called or the connection failed."""
        return self.closing

    def close(self) -> None:
        """Close after sending what is buffered, within LINGER seconds."""
        if self.closing:
            return
        self.closing = True
        if not self.buffer:
            self._release(None)  # closing the socket unwatches it: no pause_reading first
        else:
            self.pause_reading()
            if not self.corked:  # (a corked stream is released once its bytes are sent)
                # A peer that stopped reading must not hold the socket forever.
                self.loop.call_later(LINGER, self._release, None)

    def close_quietly(self) -> None:
        """Close as ``close`` does, for a protocol that closed it itself and needs no
        ``connection_lost`` (the proxy's own; a loop callback per stream saved).
        """
        self._unlink()
        self.close()

    def close_after_reading(self, seconds: float) -> None:
        """Close without a reset: send what is buffered, half-close, then read and drop what the
        peer still sends until its EOF or ``seconds`` pass. The protocol hears nothing more.

        Closing a socket with unread input makes the kernel send a reset instead of a FIN: the
        peer's next send fails, and it may never read the answer it was just sent.
        """
        if self.closing:
            return
        self._unlink()  # _GONE drops what arrives and closes the stream at EOF
        self.write_eof()
        self.resume_reading()
        self.loop.call_later(seconds, self.close)

    def abort(self) -> None:
        """Close now, dropping what is buffered."""
        self.buffer.clear()
        self.closing = True
        self._release(None)

    def _lost(self, exc: OSError) -> None:
        # What was never sent stays in the buffer: get_write_buffer_size tells the protocol how
        # much its peer missed (none after a reset is a peer that got everything).
        self.closing = True
        self._release(exc)

    def _release(self, exc: Exception | None) -> None:
        if self.released:
            return
        self.released = True
        self.reading = self.writing = False
        self.reactor.forget(self.fd)
        self.sock.close()
        if self.protocol is not _GONE:
            self.loop.call_soon(self._notify_lost, exc)

    def _unlink(self) -> StreamProtocol:
        protocol, self.protocol = self.protocol, _GONE
        # The stream and its protocol point at each other (and a relay at its peer): dropping
        # the links lets reference counting free a finished connection at once, instead of
        # leaving every connection's objects to the cyclic garbage collector.
        self.relay_to = None
        self.relay_count = _ignore
        return protocol

    def _notify_lost(self, exc: Exception | None) -> None:
        self._unlink().connection_lost(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname`` or ``socket``, like a Transport's."""
        if name == "peername":
            return self.peer if self.peer is not None else default
        if name == "socket":
            return self.sock
        if name == "sockname" and not self.released:
            return self.sock.getsockname()
        return default


class Listener:
    """Accepts connections and gives each a RawStream and a protocol from ``factory``."""

    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        factory: Callable[[], ServerProtocol],
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.loop = reactor.loop
        self.sock = sock
        self.factory = factory
        self.on_error = on_error
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self.family = int(sock.family)
        self.accepting = False
        self.closed = False

    def start(self) -> None:
        """Start accepting."""
        if not self.accepting and not self.closed:
            self.accepting = True
            self.loop.add_reader(self.sock.fileno(), self._on_acceptable)

    def close(self) -> None:
        """Stop accepting and close the listening socket (open connections stay)."""
        if self.closed:
            return
        self.closed = True
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _on_acceptable(self) -> None:
        self.reactor.run_corked(self._accept_batch)

    def _accept_batch(self) -> None:
        reactor, factory, family = self.reactor, self.factory, self.family
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = self.sock._accept()  # type: ignore[attr-defined]  # not in typeshed
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                self._accept_failed(e)
                return
            conn = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            # TCP_NODELAY comes from the listening socket (Linux copies it to accepted ones).
            conn.setblocking(False)
            protocol = factory()
            stream = RawStream(reactor, conn, protocol, peer)
            protocol.connection_made(stream)
            stream.resume_reading()
            # A busy gateway accepts clients whose request is already here: read it now rather
            # than after another trip through the loop (when it is not, one recv says so).
            if stream.reading:
                stream._on_readable()

    def _accept_failed(self, e: OSError) -> None:
        if self.on_error is not None:
            self.on_error("accept")
        if e.errno in _OUT_OF_RESOURCES and self.accepting:
            # Nothing to accept with until descriptors are freed: wait instead of spinning.
            log.error("accept failed; pausing", error=e.strerror, retry_in=ACCEPT_RETRY_DELAY)
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(ACCEPT_RETRY_DELAY, self.start)
        else:
            log.warning("accept failed", error=e.strerror or str(e))
