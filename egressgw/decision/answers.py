"""Which addresses the DNS proxy gave which client: (client, IP) -> name until the TTL ends. Pure.

The transparent listener asks ``name_of(client, ip, now)``: "did this IP come from an answer the
gateway's DNS proxy served to that same client, within its TTL?" — and if so, for which name.

Rules:

1. ``record(client, name, ip, ttl, now)`` keeps the entry until ``now + ttl`` (at least
   ``min_ttl``, so an answer with TTL 0 still covers the connect that follows it). Recording the
   same (client, IP) again replaces the name and the expiry and makes it the newest entry.
2. ``name_of`` answers only for an entry that has not expired; an expired one is dropped when met.
3. Bounded: at most ``max_entries`` in all and ``max_per_client`` per client. Past either, the
   oldest entry (of everyone, or of that client) goes first, so one client flooding the proxy
   with names evicts its own entries before anyone else's are touched beyond the global bound.
4. The clock is the caller's (``now``): nothing here reads one.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_PER_CLIENT = 2_000
DEFAULT_MIN_TTL = 5.0  # seconds: answers with TTL 0 are followed by a connect within this


class AnswerLog:
    """Bounded (client, IP) -> (name, expiry) records of the answers served."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_per_client: int = DEFAULT_MAX_PER_CLIENT,
        min_ttl: float = DEFAULT_MIN_TTL,
    ) -> None:
        if max_entries < 1 or max_per_client < 1:
            raise ValueError("answer log bounds must be at least 1")
        self.max_entries = max_entries
        self.max_per_client = max_per_client
        self.min_ttl = min_ttl
        # Oldest first, across clients; the per-client dicts keep each client's own order.
        self._all: OrderedDict[tuple[IPAddress, IPAddress], tuple[str, float]] = OrderedDict()
        self._clients: dict[IPAddress, OrderedDict[IPAddress, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def clients(self) -> int:
        """How many clients have entries."""
        return len(self._clients)

    def record(self, client: IPAddress, name: str, ip: IPAddress, ttl: float, now: float) -> None:
        """Remember that ``client`` was told ``name`` has address ``ip`` for ``ttl`` seconds."""
        key = (client, ip)
        mine = self._clients.get(client)
        if mine is None:
            mine = self._clients[client] = OrderedDict()
        if key in self._all:
            self._all.move_to_end(key)
            mine.move_to_end(ip)
        else:
            mine[ip] = None
        self._all[key] = (name, now + max(ttl, self.min_ttl))
        if len(mine) > self.max_per_client:
            self._drop(client, next(iter(mine)))
        if len(self._all) > self.max_entries:
            oldest_client, oldest_ip = next(iter(self._all))
            self._drop(oldest_client, oldest_ip)

    def name_of(self, client: IPAddress, ip: IPAddress, now: float) -> str | None:
        """The name ``client`` resolved to ``ip`` through the proxy, if its TTL has not ended."""
        found = self._all.get((client, ip))
        if found is None:
            return None
        name, expiry = found
        if expiry <= now:
            self._drop(client, ip)
            return None
        return name

    def _drop(self, client: IPAddress, ip: IPAddress) -> None:
        del self._all[(client, ip)]
        mine = self._clients[client]
        del mine[ip]
        if not mine:
            del self._clients[client]
