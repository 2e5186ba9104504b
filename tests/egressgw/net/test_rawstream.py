"""RawStream, Reactor and Listener on real loopback sockets: the proxy's transport semantics."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from egressgw.net.rawstream import (
    CORK_MAX_BYTES,
    CORK_MAX_STREAMS,
    HIGH_WATER,
    Listener,
    RawStream,
    Reactor,
)


class Recorder:
    """A protocol that records every callback; ``on_data`` decides what to do with bytes."""

    def __init__(self, keep_open_on_eof: bool = True) -> None:
        self.stream: RawStream | None = None
        self.data = bytearray()
        self.calls: list[str] = []
        self.lost: list[Exception | None] = []
        self.keep_open_on_eof = keep_open_on_eof
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.stream = transport
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.calls.append("eof")
        return self.keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")
        self.lost.append(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")


@pytest.fixture
async def served() -> AsyncIterator[tuple[Reactor, Listener, list[Recorder]]]:
    """A Listener on a free loopback port; every accepted connection's Recorder is listed."""
    loop = asyncio.get_running_loop()
    reactor = Reactor(loop)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    protocols: list[Recorder] = []

    def factory() -> Recorder:
        protocols.append(Recorder())
        return protocols[-1]

    listener = Listener(reactor, sock, factory)
    listener.start()
    try:
        yield reactor, listener, protocols
    finally:
        for proto in protocols:
            if proto.stream is not None:
                proto.stream.abort()
        await asyncio.sleep(0)
        listener.close()
        reactor.close()


async def _accepted(protocols: list[Recorder], n: int = 1, data: bytes = b"") -> Recorder:
    """The n-th accepted connection's protocol, once it has received ``data``."""
    for _ in range(400):
        if len(protocols) >= n and bytes(protocols[n - 1].data) == data:
            return protocols[n - 1]
        await asyncio.sleep(0.005)
    raise AssertionError("nothing accepted")


async def test_bytes_both_ways_half_close_and_one_connection_lost(
    served: tuple[Reactor, Listener, list[Recorder]],
) -> None:
    """Data arrives, EOF keeps the stream writable, close is reported once with no error."""
    reactor, listener, protocols = served
    reader, writer = await asyncio.open_connection(*listener.address)
    writer.write(b"hello")
    writer.write_eof()
    proto = await _accepted(protocols, data=b"hello")
    for _ in range(200):
        if "eof" in proto.calls:
            break
        await asyncio.sleep(0.005)
    assert bytes(proto.data) == b"hello" and proto.calls[:2] == ["made", "eof"]
    assert proto.stream is not None and proto.stream.get_extra_info("peername")[0] == "127.0.0.1"
    proto.stream.write(b"bye")  # half-closed by the client, still writable by us
    proto.stream.close()
    assert await reader.read() == b"bye"
    await proto.closed
    assert proto.calls.count("lost") == 1 and proto.lost == [None]
    assert reactor.masks == {} and reactor.readers == {} and reactor.writers == {}
    writer.close()


async def _client_not_reading(
    listener: Listener, protocols: list[Recorder]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Recorder]:
    """A client that has sent one byte and stopped reading, and its accepted protocol."""
    reader, writer = await asyncio.open_connection(*listener.address)
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    writer.write(b"x")
    return reader, writer, await _accepted(protocols, data=b"x")


async def test_backpressure_pauses_and_resumes_and_keeps_order(
    served: tuple[Reactor, Listener, list[Recorder]],
) -> None:
    """A peer that does not read makes the stream pause its writer; reading resumes it."""
    _, listener, protocols = served
    reader, writer, proto = await _client_not_reading(listener, protocols)
    stream = proto.stream
    assert stream is not None
    payload = bytes(range(256)) * (16 * HIGH_WATER // 256)
    chunk = 64 * 1024
    for i in range(0, len(payload), chunk):
        stream.write(payload[i : i + chunk])
    assert "pause" in proto.calls and stream.get_write_buffer_size() > HIGH_WATER
    writer.transport.resume_reading()  # type: ignore[attr-defined]
    got = await reader.readexactly(len(payload))
    assert got == payload
    for _ in range(200):
        if "resume" in proto.calls:
            break
        await asyncio.sleep(0.005)
    assert proto.calls.index("pause") < proto.calls.index("resume")
    writer.close()


async def test_close_sends_what_is_buffered_first(
    served: tuple[Reactor, Listener, list[Recorder]],
) -> None:
    """close() with a full buffer still delivers every byte, then the peer sees EOF."""
    _, listener, protocols = served
    reader, writer, proto = await _client_not_reading(listener, protocols)
    assert proto.stream is not None
    payload = b"z" * (4 * HIGH_WATER)
    proto.stream.write(payload)
    proto.stream.close()
    assert proto.stream.is_closing() and "lost" not in proto.calls
    writer.transport.resume_reading()  # type: ignore[attr-defined]
    assert await reader.read() == payload
    await proto.closed
    assert proto.lost == [None]
    writer.close()


async def test_a_reset_reports_the_error_and_a_spurious_wakeup_is_harmless(
    served: tuple[Reactor, Listener, list[Recorder]],
) -> None:
    """RST from the peer ends the stream with an OSError; a wake-up with no data does nothing."""
    _, listener, protocols = served
    client = socket.create_connection(listener.address)
    client.sendall(b"x")
    proto = await _accepted(protocols, data=b"x")
    stream = proto.stream
    assert stream is not None
    stream._on_readable()  # nothing to read: as if the event was meant for a previous socket
    assert proto.calls == ["made"]
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # linger 0: RST
    await asyncio.wait_for(proto.closed, 2)
    assert isinstance(proto.lost[0], ConnectionResetError)


async def test_many_connections_leave_nothing_registered(
    served: tuple[Reactor, Listener, list[Recorder]],
) -> None:
    """Each closed stream drops out of the reactor: its tables do not grow with traffic."""
    reactor, listener, protocols = served
    for i in range(50):
        reader, writer = await asyncio.open_connection(*listener.address)
        writer.write(b"ping")
        proto = await _accepted(protocols, i + 1, data=b"ping")
        assert proto.stream is not None
        proto.stream.write(b"pong")
        proto.stream.close()
        assert await reader.read() == b"pong"
        writer.close()
    await asyncio.sleep(0.01)
    assert reactor.masks == {} and reactor.readers == {}


class Relayed(Recorder):
    """One side of a relay: pauses and resumes the other side's reading like the proxy does."""

    def __init__(self) -> None:
        super().__init__()
        self.other: RawStream | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.other is not None:
            self.other.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.other is not None:
            self.other.resume_reading()


async def test_relay_moves_every_byte_in_order_through_a_slow_reader() -> None:
    """Two relayed streams pass 12 MiB through the shared buffer intact, pausing on the way."""
    loop = asyncio.get_running_loop()
    reactor = Reactor(loop)
    a_outer, a_inner = socket.socketpair()
    b_inner, b_outer = socket.socketpair()
    for s in (a_inner, b_inner, a_outer, b_outer):
        s.setblocking(False)
    pa, pb = Relayed(), Relayed()
    a, b = RawStream(reactor, a_inner, pa), RawStream(reactor, b_inner, pb)
    pb.other = a  # b's buffer full: stop reading a
    counted: list[int] = []
    a.relay(b, counted.append)
    a.resume_reading()
    payload = bytes(range(251)) * (12 * 1024 * 1024 // 251)
    received = bytearray()

    async def produce() -> None:
        await loop.sock_sendall(a_outer, payload)
        a_outer.shutdown(socket.SHUT_WR)

    async def consume() -> None:
        while len(received) < len(payload):
            await asyncio.sleep(0.001)  # a slow reader: b's buffer fills and pauses a
            chunk = await loop.sock_recv(b_outer, 64 * 1024)
            if not chunk:
                break
            received.extend(chunk)

    await asyncio.wait_for(asyncio.gather(produce(), consume()), 60)
    assert bytes(received) == payload
    assert sum(counted) == len(payload)
    assert "pause" in pb.calls and "resume" in pb.calls
    for stream in (a, b):
        stream.abort()
    for s in (a_outer, b_outer):
        s.close()
    await asyncio.sleep(0)
    reactor.close()


async def test_close_after_reading_delivers_the_answer_and_eof_without_a_reset(
    served: tuple[Reactor, Listener, list[Recorder]],
) -> None:
    """The peer still sending after the answer: what it sends is dropped, it reads answer + EOF."""
    reactor, listener, protocols = served
    client = socket.create_connection(listener.address)
    client.sendall(b"x")
    proto = await _accepted(protocols, data=b"x")
    assert proto.stream is not None
    proto.stream.write(b"refused")
    proto.stream.close_after_reading(5.0)
    client.sendall(b"y" * 200_000)  # unread at a plain close: the kernel would reset
    await asyncio.sleep(0.1)
    client.sendall(b"z" * 200_000)
    client.settimeout(2)
    received = b""
    while chunk := await asyncio.to_thread(client.recv, 65536):
        received += chunk
    assert received == b"refused"
    client.close()  # the peer's EOF closes the stream, silently for the protocol
    for _ in range(200):
        if not reactor.masks:
            break
        await asyncio.sleep(0.005)
    assert reactor.masks == {} and proto.calls == ["made"]
    assert bytes(proto.data) == b"x"


async def test_after_a_reset_the_write_buffer_size_is_what_was_never_sent(
    served: tuple[Reactor, Listener, list[Recorder]],
) -> None:
    """A peer resetting with bytes still buffered for it: the stream says how many it missed."""
    _, listener, protocols = served
    client = socket.create_connection(listener.address)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.sendall(b"x")
    proto = await _accepted(protocols, data=b"x")
    stream = proto.stream
    assert stream is not None
    for _ in range(64):  # until the kernel's buffers are full and the stream keeps some
        stream.write(b"z" * HIGH_WATER)
        if stream.get_write_buffer_size():
            break
    assert stream.get_write_buffer_size() > 0
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()
    stream.write(b"more")  # fails on the reset, or joins the buffer waiting for the writer
    await asyncio.wait_for(proto.closed, 2)
    assert isinstance(proto.lost[0], ConnectionResetError | BrokenPipeError)
    assert stream.get_write_buffer_size() >= 4


def _waiting(sock: socket.socket) -> int:
    """Bytes ``sock`` could read now (a peek that does not block)."""
    try:
        return len(sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return 0


class Replier(Recorder):
    """Answers each read from inside the reactor's callback and notes what the client had
    received by the time the callback returned.
    """

    def __init__(self, client: socket.socket, reply: bytes, then: str = "") -> None:
        super().__init__()
        self.client = client
        self.reply = reply
        self.then = then
        self.seen_in_callback: list[int] = []

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert self.stream is not None
        self.stream.write(self.reply)
        if self.then == "close":
            self.stream.close()
        elif self.then == "eof":
            self.stream.write_eof()
        self.seen_in_callback.append(_waiting(self.client))


async def _reply_once(reply: bytes, then: str = "") -> tuple[Replier, bytes, Reactor]:
    """One stream whose protocol replies from its callback; what the client then reads."""
    loop = asyncio.get_running_loop()
    reactor = Reactor(loop)
    client, server = socket.socketpair()
    client.setblocking(False)
    server.setblocking(False)
    proto = Replier(client, reply, then)
    stream = RawStream(reactor, server, proto)
    proto.connection_made(stream)
    stream.resume_reading()
    await loop.sock_sendall(client, b"ask")
    got = bytearray()
    while len(got) < len(reply):
        got += await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 2)
    if then:
        assert await asyncio.wait_for(loop.sock_recv(client, 1), 2) == b""  # the EOF
    if then != "close":
        stream.abort()
    client.close()
    reactor.close()
    return proto, bytes(got), reactor


async def test_a_small_write_from_a_callback_goes_out_when_the_batch_ends() -> None:
    """Corking: the reply is held while the callback runs, then sent whole and in order."""
    proto, got, reactor = await _reply_once(b"pong" * 100)
    assert got == b"pong" * 100
    assert proto.seen_in_callback == [0]  # not sent yet when the callback returned
    assert reactor.corked == [] and not reactor.corking


async def test_a_large_write_from_a_callback_is_sent_at_once() -> None:
    """Holding a large write would mean copying it: it goes out immediately."""
    big = b"b" * (CORK_MAX_BYTES + 1)
    proto, got, _ = await _reply_once(big)
    assert got == big and proto.seen_in_callback[0] > 0


@pytest.mark.parametrize("then", ["close", "eof"])
async def test_close_or_eof_while_corked_sends_the_held_bytes_first(then: str) -> None:
    """close() and write_eof() on a corked stream: the peer gets the reply, then the EOF."""
    proto, got, _ = await _reply_once(b"last words", then)
    assert got == b"last words" and proto.seen_in_callback == [0]
    if then == "close":
        await asyncio.wait_for(proto.closed, 2)
        assert proto.lost == [None]


async def test_corked_streams_are_sent_once_the_limit_of_streams_is_reached() -> None:
    """No more than CORK_MAX_STREAMS streams wait: the next one sends what the others hold."""
    reactor = Reactor(asyncio.get_running_loop())
    pairs = [socket.socketpair() for _ in range(CORK_MAX_STREAMS + 1)]
    streams = []
    for _, server in pairs:
        server.setblocking(False)
        streams.append(RawStream(reactor, server, Recorder()))
    reactor.corking = True
    try:
        for i, stream in enumerate(streams[:-1]):
            stream.write(b"%d" % i)
            if i < CORK_MAX_STREAMS - 1:
                assert _waiting(pairs[0][0]) == 0  # still held
        assert [c.recv(16) for c, _ in pairs[:-1]] == [b"%d" % i for i in range(len(pairs) - 1)]
        streams[-1].write(b"late")
        assert reactor.corked == [streams[-1]]
    finally:
        reactor.corking = False
    reactor.uncork()
    assert pairs[-1][0].recv(16) == b"late"
    for (client, _), stream in zip(pairs, streams, strict=True):
        stream.abort()
        client.close()
    reactor.close()
