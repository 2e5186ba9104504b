"""A listener that never accepts: its accept queue is full, so new connects hang (for 504s)."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Self

from tests.support.service import Service

# Linux admits backlog + 1 connections to the accept queue; a few more make sure it is full.
FILLER_CONNECTIONS = 3
SETTLE_TIME = 0.1


class BlackHole(Service):
    """Context manager: host:port listens with a full accept queue; SYNs to it are dropped."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._sockets: list[socket.socket] = []

    def start(self) -> Self:
        """Listen with backlog 0 and fill the queue with connections nobody accepts."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sockets.append(listener)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(0)
        for _ in range(FILLER_CONNECTIONS):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sockets.append(filler)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((self.host, self.port))
        time.sleep(SETTLE_TIME)
        return self

    def stop(self) -> None:
        """Close the listener and the filler connections."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
