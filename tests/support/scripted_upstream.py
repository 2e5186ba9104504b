"""A raw TCP upstream that answers from scripts and records every byte and request it receives.

Each listener has a role. `http`: requests are parsed with httptools (the
gateway's own parser) and each is answered with `mutation.response_script` of
the tag in its path, in order; a script that hangs stops all answers on that
connection. `tunnel`: the first bytes' tag picks a `mutation.tunnel_script`,
then the rest is read to EOF. `forbidden`: nothing should ever arrive; every
connection is recorded all the same. The server runs on its own event loop in
a daemon thread, so a test blocking on sockets never starves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

import httptools

from tests.support.service import Service

from .mutation import Close, HalfClose, Hang, Pause, Reset, Send, Step, find_tag, response_script
from .mutation import tunnel_script as default_tunnel_script

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
READ_SIZE = 65536
FIRST_BYTES_TIMEOUT = 3.0
UNTAGGED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nuntagged"


@dataclass(frozen=True)
class Role:
    """One listening address and what it does with what arrives."""

    host: str
    port: int
    role: str  # "http", "tunnel" or "forbidden"


@dataclass(frozen=True)
class ReceivedRequest:
    """One request head the upstream parsed."""

    method: str
    target: str
    host: str | None  # the last Host header, if any
    hosts: int  # how many Host headers
    body_length: int


@dataclass
class UpstreamConnection:
    """Everything one accepted connection brought."""

    host: str
    port: int
    role: str
    received: bytearray = field(default_factory=bytearray)
    requests: list[ReceivedRequest] = field(default_factory=list)
    error: str | None = None  # the bytes were not HTTP the parser accepts


class _RequestParser:
    """httptools callbacks collecting whole requests."""

    def __init__(self, conn: UpstreamConnection, tags: asyncio.Queue[str | None]) -> None:
        self.conn = conn
        self.tags = tags
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_length = 0
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body_length = b"", [], 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body_length += len(body)

    def on_message_complete(self) -> None:
        hosts = [v.decode("latin-1") for n, v in self.headers if n.lower() == b"host"]
        request = ReceivedRequest(
            method=self.parser.get_method().decode("latin-1"),
            target=self.url.decode("latin-1"),
            host=hosts[-1] if hosts else None,
            hosts=len(hosts),
            body_length=self.body_length,
        )
        self.conn.requests.append(request)
        self.tags.put_nowait(find_tag(self.url))


async def run_steps(writer: asyncio.StreamWriter, steps: Sequence[Step]) -> bool:
    """Play `steps` on a stream; return False once it was closed, reset, half-closed or hung."""
    for step in steps:
        if isinstance(step, Send):
            writer.write(step.data)
            await writer.drain()
        elif isinstance(step, Pause):
            await asyncio.sleep(step.seconds)
        elif isinstance(step, HalfClose):
            if writer.can_write_eof():
                writer.write_eof()
            return False
        elif isinstance(step, Close):
            writer.close()
            return False
        elif isinstance(step, Hang):
            return False
        elif isinstance(step, Reset):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
    return True


class ScriptedUpstream(Service):
    """Context manager serving `roles` until it exits; `connections` records what arrived."""

    def __init__(self, roles: Sequence[Role]) -> None:
        self.roles = list(roles)
        self.connections: list[UpstreamConnection] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def snapshot(self) -> list[UpstreamConnection]:
        """Return the connections recorded so far."""
        with self._lock:
            return list(self.connections)

    def clear(self) -> None:
        """Forget the recorded connections."""
        with self._lock:
            self.connections.clear()

    def _record(self, role: Role) -> UpstreamConnection:
        conn = UpstreamConnection(role.host, role.port, role.role)
        with self._lock:
            self.connections.append(conn)
        return conn

    async def _handle(
        self, role: Role, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = self._record(role)
        try:
            if role.role == "http":
                await self._serve_http(conn, reader, writer)
            elif role.role == "tunnel":
                await self._serve_tunnel(conn, reader, writer)
            else:
                await self._drain(conn, reader)
        except (ConnectionError, OSError):
            pass  # the gateway went away: what arrived is recorded
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _drain(self, conn: UpstreamConnection, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(READ_SIZE):
            conn.received += data

    async def _serve_http(
        self, conn: UpstreamConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        tags: asyncio.Queue[str | None] = asyncio.Queue()
        parser = _RequestParser(conn, tags)

        async def answer() -> None:
            while True:
                tag = await tags.get()
                if tag is None:
                    writer.write(UNTAGGED)
                    continue
                if not await run_steps(writer, response_script(tag)):
                    return  # closed, or hung: nothing more is answered on this connection

        responder = asyncio.get_running_loop().create_task(answer())
        try:
            while data := await reader.read(READ_SIZE):
                conn.received += data
                try:
                    parser.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    conn.error = "upgrade request"
                    break
                except httptools.HttpParserError as e:
                    conn.error = f"{type(e).__name__}: {e}"
                    break
            await asyncio.sleep(0.05)  # let the answer to a last request go out
        finally:
            responder.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await responder

    async def _serve_tunnel(
        self, conn: UpstreamConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            first = await asyncio.wait_for(reader.read(READ_SIZE), FIRST_BYTES_TIMEOUT)
        except TimeoutError:
            first = b""
        conn.received += first
        if first:
            await run_steps(writer, default_tunnel_script(find_tag(first)))
        await self._drain(conn, reader)

    async def _serve(self) -> None:
        servers = []
        try:
            for role in self.roles:
                servers.append(
                    await asyncio.start_server(
                        functools.partial(self._handle, role),
                        role.host,
                        role.port,
                        reuse_address=True,
                    )
                )
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
        finally:
            for server in servers:
                server.close()
            for task in list(self._handlers):
                task.cancel()
            for server in servers:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 1.0)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            # Kept for start() to re-raise in the test's thread; never escapes the thread.
            self._error = exc
        finally:
            self._ready.set()
            loop.close()

    def start(self) -> Self:
        """Start listening; raise if a listener cannot bind."""
        self._thread = threading.Thread(target=self._run, name="scripted-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError("scripted upstream did not start")
        if self._error is not None:
            self._thread.join(STOP_TIMEOUT)
            raise RuntimeError(f"scripted upstream failed to start: {self._error!r}")
        return self

    def stop(self) -> None:
        """Stop listening, end every connection and join the thread."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(STOP_TIMEOUT)
        self._thread = None
