"""Who is talking: source address -> workload.

An inventory answers ``lookup(ip) -> Workload``; a source it does not know is ``UNKNOWN`` (a
workload with no namespace), which policy can select with ``from: {unknown: true}``. The static
inventory maps CIDRs to workloads, longest prefix first; the Kubernetes watcher of a later issue
implements the same ``Inventory`` protocol.

An inventory lives as long as the process and changes in place (a reload with other static
entries, a watch event): its ``generation`` changes with every change of what ``lookup`` may
answer, and the decision path's outcome cache holds only while it stays the same.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload as policy and events see it; hashable so decisions can be cached per workload."""

    namespace: str | None = None
    pod: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    serviceaccount: str | None = None
    node: str | None = None
    label_map: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    # The ECS ``kubernetes.*`` object of this workload, built once and shared by every event.
    ecs: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def make(
        cls,
        namespace: str | None,
        pod: str | None = None,
        labels: Mapping[str, str] | None = None,
        serviceaccount: str | None = None,
        node: str | None = None,
    ) -> Workload:
        """Build a workload from plain values (labels as a mapping)."""
        items = tuple(sorted((labels or {}).items()))
        ecs: dict[str, Any] = {"namespace": namespace}
        if pod:
            ecs["pod"] = {"name": pod}
        if items:
            ecs["labels"] = dict(items)
        if serviceaccount:
            ecs["serviceaccount"] = {"name": serviceaccount}
        if node:
            ecs["node"] = {"name": node}
        return cls(namespace, pod, items, serviceaccount, node, dict(items), ecs)

    @property
    def known(self) -> bool:
        """True when the source was attributed to a workload."""
        return self.namespace is not None


UNKNOWN = Workload()


class Inventory(Protocol):
    """What identity sources provide to the proxy."""

    # Changes whenever ``lookup`` may answer differently for some address.
    generation: int

    def lookup(self, ip: IPAddress) -> Workload:
        """Return the workload behind a source address, or UNKNOWN."""
        ...


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

    def lookup(self, ip: IPAddress) -> Workload:
        """Return the workload of the longest matching CIDR, or UNKNOWN."""
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
