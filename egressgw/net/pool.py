"""Idle connections kept for reuse, by key: bounded, oldest out first, closed past a timeout.

The gateway keeps absolute-form HTTP upstreams here between requests, keyed by (destination
address, port, source address), so keep-alive upstreams are shared by every client connection
that goes to the same place from the same address.

Rules:

- ``take(key)`` gives the connection of that key parked last (the one whose peer most likely
  still holds it open), or None. A taken connection is the taker's: it parks it again or closes
  it itself.
- ``park(key, conn, now)`` keeps it until it is taken or the pool closes it: past
  ``max_idle_per_key`` of one key or ``max_idle`` in all, the oldest goes (closed) to make room;
  ``expire(now)`` closes those parked longer than ``idle_timeout`` ago (``now`` on one clock).
- ``discard(conn)``: a parked connection that closed by itself (its peer closed it) leaves the
  pool; it is not closed again.
- ``close()`` closes every parked connection (the gateway stops).

Pure apart from calling ``close()`` on the connections it drops: no clock of its own.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

DEFAULT_MAX_IDLE = 512
DEFAULT_MAX_IDLE_PER_KEY = 64
DEFAULT_IDLE_TIMEOUT = 30.0


class Closable(Protocol):
    """What the pool needs of a connection: a way to close it."""

    def close(self) -> None:
        """Close the connection."""
        ...


C = TypeVar("C", bound=Closable)


class IdlePool(Generic[C]):
    """Idle connections by key (see the module docstring)."""

    def __init__(
        self,
        max_idle: int = DEFAULT_MAX_IDLE,
        max_idle_per_key: int = DEFAULT_MAX_IDLE_PER_KEY,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.max_idle = max_idle
        self.max_idle_per_key = max_idle_per_key
        self.idle_timeout = idle_timeout
        self.by_key: dict[Hashable, list[C]] = {}
        # Every parked connection with its key and when it was parked, oldest first (a dict
        # keeps insertion order, and parking again re-inserts at the end).
        self.parked: dict[C, tuple[Hashable, float]] = {}

    def __len__(self) -> int:
        return len(self.parked)

    def take(self, key: Hashable) -> C | None:
        """The connection of ``key`` parked last, now the caller's; None when there is none."""
        conns = self.by_key.get(key)
        if not conns:
            return None
        conn = conns.pop()
        if not conns:
            del self.by_key[key]
        del self.parked[conn]
        return conn

    def park(self, key: Hashable, conn: C, now: float) -> None:
        """Keep ``conn`` for a later ``take(key)``, making room by closing the oldest."""
        if self.max_idle <= 0 or self.max_idle_per_key <= 0:
            conn.close()  # pooling is off
            return
        conns = self.by_key.get(key)
        if conns is None:
            conns = self.by_key[key] = []
        elif len(conns) >= self.max_idle_per_key:
            self._drop(conns[0], key).close()
            conns = self.by_key.setdefault(key, [])
        if len(self.parked) >= self.max_idle:
            oldest, (oldest_key, _) = next(iter(self.parked.items()))
            self._drop(oldest, oldest_key).close()
            conns = self.by_key.setdefault(key, [])
        conns.append(conn)
        self.parked[conn] = (key, now)

    def discard(self, conn: C) -> None:
        """Forget a parked connection that closed by itself (nothing when it is not parked)."""
        entry = self.parked.get(conn)
        if entry is not None:
            self._drop(conn, entry[0])

    def expire(self, now: float) -> int:
        """Close the connections parked at or before ``now - idle_timeout``; how many."""
        limit = now - self.idle_timeout
        expired = []
        for conn, (key, since) in self.parked.items():
            if since > limit:
                break  # the rest were parked later
            expired.append((conn, key))
        for conn, key in expired:
            self._drop(conn, key).close()
        return len(expired)

    def close(self) -> None:
        """Close every parked connection."""
        parked = list(self.parked)
        self.parked.clear()
        self.by_key.clear()
        for conn in parked:
            conn.close()

    def _drop(self, conn: C, key: Hashable) -> C:
        del self.parked[conn]
        conns = self.by_key[key]
        conns.remove(conn)
        if not conns:
            del self.by_key[key]
        return conn
