"""Resolution of destination names: A and AAAA, the CNAME chain, a TTL-respecting cache.

The proxy connects only to addresses returned here and checked by the guard and policy; it never
resolves a name a second time. Concurrent lookups of one name share one query. Answers are cached
for their DNS TTL, clamped to ``[min_ttl, max_ttl]``; "no such name" is cached for
``NEGATIVE_TTL`` seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from egressgw.decision.names import parse_ip_literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NEGATIVE_TTL = 5.0


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a name resolved to: the addresses and every name met on the way (CNAME chain)."""

    name: str
    ips: tuple[IPAddress, ...]
    chain: tuple[str, ...]  # CNAME targets after `name`, in order
    ttl: float


class ResolveError(Exception):
    """A name could not be resolved; ``reason`` is for the client and the event."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"dns: {name}: {reason}")


def parse_nameserver(text: str) -> tuple[str, int]:
    """``1.2.3.4``, ``1.2.3.4:5353``, ``[::1]:53`` -> (address, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return host.rstrip("]"), int(port) if port else 53
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    if parse_ip_literal(text) is None:
        raise ValueError(f"bad nameserver {text!r}")
    return text, 53


class Resolver:
    """An async, caching resolver over dnspython."""

    def __init__(
        self,
        nameservers: tuple[str, ...] = (),
        timeout: float = 5.0,
        cache_size: int = 10_000,
        min_ttl: float = 0.0,
        max_ttl: float = 3600.0,
        ipv6: bool = True,
    ) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout
        self._resolver.cache = None  # our own cache: it also remembers the CNAME chain
        self._cache: OrderedDict[str, tuple[float, Resolution | ResolveError]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Resolution]] = {}
        self._cache_size = cache_size
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._ipv6 = ipv6

    def cached(self, name: str, now: float) -> Resolution | ResolveError | None:
        """The cached answer for a name (or its cached failure), None when it must be asked."""
        cached = self._cache.get(name)
        if cached is None:
            return None
        expiry, value = cached
        if expiry > now:
            return value
        del self._cache[name]
        return None

    async def resolve(self, name: str) -> Resolution:
        """Resolve a canonical name, from the cache when its TTL allows."""
        loop = asyncio.get_running_loop()
        value = self.cached(name, loop.time())
        if isinstance(value, ResolveError):
            raise value
        if value is not None:
            return value
        pending = self._inflight.get(name)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Resolution] = loop.create_future()
        self._inflight[name] = future
        try:
            result = await self._query(name)
        except ResolveError as e:
            self._store(name, loop.time() + NEGATIVE_TTL, e)
            future.set_exception(e)
            future.exception()  # retrieved: waiters get it through shield
            raise
        finally:
            del self._inflight[name]
        self._store(name, loop.time() + result.ttl, result)
        future.set_result(result)
        return result

    def _store(self, name: str, expiry: float, value: Resolution | ResolveError) -> None:
        if self._cache_size <= 0:
            return
        self._cache[name] = (expiry, value)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _query(self, name: str) -> Resolution:
        kinds = [dns.rdatatype.A] + ([dns.rdatatype.AAAA] if self._ipv6 else [])
        results = await asyncio.gather(
            *(self._resolver.resolve(name, k, raise_on_no_answer=False) for k in kinds),
            return_exceptions=True,
        )
        ips: list[IPAddress] = []
        chain: list[str] = []
        ttls: list[float] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                errors.append(result)
                continue
            chaining = result.response.resolve_chaining()
            for rrset in chaining.cnames:
                for rdata in rrset:
                    target = rdata.target.to_text(omit_final_dot=True).lower()
                    if target not in chain:
                        chain.append(target)
            if result.rrset is not None:
                ttls.append(float(chaining.minimum_ttl))
                ips.extend(ipaddress.ip_address(r.address) for r in result.rrset)
        if not ips:
            raise ResolveError(name, _describe(errors) if errors else "no A or AAAA records")
        ttl = min(max(min(ttls), self._min_ttl), self._max_ttl)
        return Resolution(name, tuple(dict.fromkeys(ips)), tuple(chain), ttl)


def _describe(errors: list[BaseException]) -> str:
    for e in errors:
        if isinstance(e, dns.resolver.NXDOMAIN):
            return "no such name"
    for e in errors:
        if isinstance(e, dns.exception.Timeout | dns.resolver.LifetimeTimeout):
            return "timed out"
        if isinstance(e, dns.resolver.NoNameservers):
            return "no nameserver answered"
    return str(errors[0]) or type(errors[0]).__name__
