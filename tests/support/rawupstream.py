"""A scriptable raw TCP upstream: records every byte it receives and answers what a test says.

Unlike the echo upstream (an HTTP server that would reject or normalise hostile bytes), this one
has no HTTP of its own: each accepted connection is handed to the test's `script(peer)` in a
thread of its own, and `RawPeer` offers what such scripts need (read a request head, send any
bytes, hold the connection open). Everything each connection received is kept in
`RawUpstream.received`, in accept order, so a test sees exactly what the gateway forwarded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Self

from tests.support.service import Service

ACCEPT_POLL = 0.1
PEER_TIMEOUT = 10.0
RECV_SIZE = 65536
JOIN_TIMEOUT = 5.0


class RawPeer:
    """One accepted connection as a script sees it; what it reads is recorded."""

    def __init__(self, sock: socket.socket, record: bytearray, stopping: threading.Event) -> None:
        self.sock = sock
        self.record = record
        self.stopping = stopping
        self._buf = b""

    def recv(self) -> bytes:
        """Read what is there (b"" at EOF, a reset, or the timeout)."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except OSError:
            return b""
        self.record += data
        return data

    def read_head(self) -> bytes:
        """Read up to and including the first blank line not read yet (b"" if it never comes)."""
        while b"\r\n\r\n" not in self._buf:
            data = self.recv()
            if not data:
                return b""
            self._buf += data
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def read_exact(self, n: int) -> bytes:
        """Read `n` more bytes after the heads read so far (fewer if the connection ends)."""
        while len(self._buf) < n:
            data = self.recv()
            if not data:
                break
            self._buf += data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def send(self, data: bytes) -> bool:
        """Send all of `data`; False when the gateway closed the connection meanwhile."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def closed_by_gateway(self, timeout: float) -> bool:
        """Read (and record) until the gateway closes the connection; False after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(RECV_SIZE)
            except TimeoutError:
                continue
            except OSError:
                return True
            if not data:
                return True
            self.record += data
        return False

    def hold(self, seconds: float) -> None:
        """Keep the connection open, reading nothing, for `seconds` (or until stopped)."""
        self.stopping.wait(seconds)


Script = Callable[[RawPeer], None]


class RawUpstream(Service):
    """Context manager: host:port accepts connections and runs `script` on each in a thread."""

    def __init__(self, host: str, port: int, script: Script) -> None:
        self.host = host
        self.port = port
        self.script = script
        self.received: list[bytearray] = []
        self.finished: list[threading.Event] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    @property
    def authority(self) -> str:
        """Return `host:port`."""
        return f"{self.host}:{self.port}"

    def set_script(self, script: Script) -> None:
        """Answer later connections with `script`."""
        self.script = script

    def clear(self) -> None:
        """Forget what earlier connections received."""
        self.received.clear()
        self.finished.clear()

    def start(self) -> Self:
        """Listen and accept in a daemon thread."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(ACCEPT_POLL)
        self._listener = listener
        thread = threading.Thread(target=self._accept, name="raw-upstream", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record, done = bytearray(), threading.Event()
            self.received.append(record)
            self.finished.append(done)
            thread = threading.Thread(
                target=self._serve, args=(sock, record, done), name="raw-peer", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket, record: bytearray, done: threading.Event) -> None:
        sock.settimeout(PEER_TIMEOUT)
        try:
            self.script(RawPeer(sock, record, self._stopping))
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            done.set()

    def wait_finished(self, index: int, timeout: float) -> bool:
        """Wait until the script of connection `index` returned."""
        deadline = time.monotonic() + timeout
        while index >= len(self.finished):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return self.finished[index].wait(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """Stop accepting, end the scripts that wait, and join the threads."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT)
        self._threads.clear()
