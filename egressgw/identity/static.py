"""Static identity: source CIDRs from the configuration -> workloads, the most specific first.

It judges by address only (a credential the peer presented is not its business). ``update``
replaces every entry at once and moves ``generation``, so no cached decision outlives it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from egressgw.identity.workload import UNKNOWN, Peer, Workload

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class StaticInventory:
    """CIDR -> workload from the configuration; the most specific CIDR wins."""

    entries: tuple[tuple[IPNetwork, Workload], ...]
    _by_prefix: list[tuple[int, int, dict[int, Workload]]]
    _cache: dict[IPAddress, Workload]

    def __init__(self, entries: Iterable[tuple[IPNetwork, Workload]]) -> None:
        self.generation = 0
        self._load(entries)

    def update(self, entries: Iterable[tuple[IPNetwork, Workload]]) -> None:
        """Replace every entry (a reload's static list; later, a watch's view) and say so."""
        self._load(entries)
        self.generation += 1

    def _load(self, entries: Iterable[tuple[IPNetwork, Workload]]) -> None:
        self.entries = tuple(entries)
        by_prefix: list[tuple[int, int, dict[int, Workload]]] = []
        tables: dict[tuple[int, int], dict[int, Workload]] = {}
        for net, workload in self.entries:
            tables.setdefault((net.version, net.prefixlen), {})[int(net.network_address)] = workload
        for (version, prefixlen), table in sorted(tables.items(), key=lambda kv: -kv[0][1]):
            by_prefix.append((version, prefixlen, table))
        # Both swapped at once: a lookup never mixes the old table with the new cache.
        self._by_prefix, self._cache = by_prefix, {}

    def lookup(self, peer: Peer) -> Workload:
        """Return the workload of the longest CIDR matching the peer's address, or UNKNOWN."""
        ip = peer.ip
        found = self._cache.get(ip)
        if found is not None:
            return found
        value = int(ip)
        bits = 32 if ip.version == 4 else 128
        result = UNKNOWN
        for version, prefixlen, table in self._by_prefix:
            if version != ip.version:
                continue
            key = value >> (bits - prefixlen) << (bits - prefixlen) if prefixlen else 0
            hit = table.get(key)
            if hit is not None:
                result = hit
                break
        if len(self._cache) < 65536:
            self._cache[ip] = result
        return result
