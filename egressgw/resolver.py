"""Resolution of destination names: A and AAAA, the CNAME chain, a TTL-respecting cache.

The proxy connects only to addresses returned here and checked by the guard and policy; it never
resolves a name a second time. The rules:

1. Answers are cached for their DNS TTL, clamped to ``[min_ttl, max_ttl]``.
2. Answers that a name does not exist ("no such name", "no A or AAAA records") are cached for
   ``NEGATIVE_TTL`` seconds; failures to get an answer (timeouts, no nameserver answered) for the
   shorter ``FAILURE_TTL``: long enough that clients retrying a dead name do not reach the
   nameserver, short enough that a blip is not a long outage.
3. The lookup of a name runs in a task of the resolver, shared by every caller of that name. A
   caller that goes away (its client left) never cancels it: the lookup ends by itself within
   ``timeout`` and fills the cache, and the other callers get its result. (Cancelling a dnspython
   query can leak its UDP socket under uvloop.)
4. At most ``max_inflight`` distinct names are looked up at once, and at most
   ``max_inflight_per_source`` started by one client (the one whose request started a lookup
   holds it until it ends; joining a lookup under way is free): a new name beyond either is
   refused at once ("too many lookups in flight", "... from <source>") and the refusal is not
   cached. So one client resolving random names cannot take the lookups every other needs.
8. The cache keeps the most recently used names: a hit makes a name the newest, and the least
   recently used goes first when ``cache_size`` is reached (a flood of new names evicts them
   before it evicts the names in use).
5. ``aclose()`` at shutdown cancels the lookups still running; later calls are refused.
6. DNS only: the hosts file (``/etc/hosts``) is not read. Every workload's names resolve the same
   way, through the cluster's DNS, whichever node or replica the gateway runs on; the gateway's
   own container hosts file (``localhost``, its hostAliases) is not the workloads' business. To
   pin a name, serve it from a nameserver in ``resolver.nameservers``.
7. A failure names its cause: ``REFUSED from 10.96.0.10:53`` when a nameserver answered with an
   error code, ``no nameserver answered`` only when none answered.
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

from egressgw.decision.names import parse_ip_port
from siem.tasks import spawn

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NEGATIVE_TTL = 5.0  # seconds "no such name" and "no A or AAAA records" are cached
FAILURE_TTL = 1.0  # seconds a timeout or a failure of every nameserver is cached
NO_SUCH_NAME = "no such name"
NO_RECORDS = "no A or AAAA records"
NEGATIVE_REASONS = frozenset({NO_SUCH_NAME, NO_RECORDS})  # answers, cached for NEGATIVE_TTL
# Distinct names looked up at once: each holds up to two UDP sockets (A and AAAA) for up to
# `timeout`, also after every caller left, so this bounds the descriptors lookups can take.
DEFAULT_MAX_INFLIGHT = 1_000
DEFAULT_MAX_INFLIGHT_PER_SOURCE = 100


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
    """``1.2.3.4``, ``1.2.3.4:5353``, ``::1``, ``[::1]:53`` -> (address, port)."""
    ip, port = parse_ip_port(text, 53)
    return str(ip), port


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
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_inflight_per_source: int = DEFAULT_MAX_INFLIGHT_PER_SOURCE,
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
        self._inflight: dict[str, asyncio.Task[Resolution | ResolveError]] = {}
        self._max_inflight = max_inflight
        self._max_per_source = max_inflight_per_source
        self._per_source: dict[str, int] = {}  # lookups each client started, still running
        self._closed = False
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
            self._cache.move_to_end(name)
            return value
        del self._cache[name]
        return None

    async def resolve(self, name: str, source: str | None = None) -> Resolution:
        """Resolve a canonical name, from the cache when its TTL allows; ``source`` (the client's
        address) is charged for a lookup it starts.
        """
        value = self.cached(name, asyncio.get_running_loop().time())
        if value is None:
            lookup = self._inflight.get(name)
            if lookup is None:
                lookup = self._start(name, source)
            # Shielded: a caller cancelled here leaves the lookup running for the others.
            value = await asyncio.shield(lookup)
        if isinstance(value, ResolveError):
            # One error object is raised to every caller until it expires; without this, each
            # raise would add its frames to the same traceback and keep them alive.
            raise value.with_traceback(None)
        return value

    async def aclose(self) -> None:
        """Cancel the lookups still running and refuse new ones (shutdown)."""
        self._closed = True
        lookups = list(self._inflight.values())
        for lookup in lookups:
            lookup.cancel()
        await asyncio.gather(*lookups, return_exceptions=True)
        self._inflight.clear()  # a task cancelled before it ran never removed its entry
        self._per_source.clear()

    def _start(self, name: str, source: str | None) -> asyncio.Task[Resolution | ResolveError]:
        if self._closed:
            raise ResolveError(name, "resolver closed")
        if len(self._inflight) >= self._max_inflight:
            raise ResolveError(name, "too many lookups in flight")
        if source is not None:
            started = self._per_source.get(source, 0)
            if started >= self._max_per_source:
                raise ResolveError(name, f"too many lookups in flight from {source}")
            self._per_source[source] = started + 1
        lookup = spawn(self._lookup(name, source), name=f"resolve {name}")
        self._inflight[name] = lookup
        return lookup

    def _release(self, source: str) -> None:
        left = self._per_source[source] - 1
        if left:
            self._per_source[source] = left
        else:
            del self._per_source[source]

    async def _lookup(self, name: str, source: str | None) -> Resolution | ResolveError:
        # Returns its failure rather than raising it: nobody may be left to retrieve it.
        loop = asyncio.get_running_loop()
        try:
            result = await self._query(name)
        except ResolveError as e:
            ttl = NEGATIVE_TTL if e.reason in NEGATIVE_REASONS else FAILURE_TTL
            self._store(name, loop.time() + ttl, e)
            return e
        else:
            self._store(name, loop.time() + result.ttl, result)
            return result
        finally:
            del self._inflight[name]
            if source is not None:
                self._release(source)

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
            raise ResolveError(name, _describe(errors) if errors else NO_RECORDS)
        ttl = min(max(min(ttls), self._min_ttl), self._max_ttl)
        return Resolution(name, tuple(dict.fromkeys(ips)), tuple(chain), ttl)


def _describe(errors: list[BaseException]) -> str:
    for e in errors:
        if isinstance(e, dns.resolver.NXDOMAIN):
            return NO_SUCH_NAME
    for e in errors:
        if isinstance(e, dns.exception.Timeout | dns.resolver.LifetimeTimeout):
            return "timed out"
        if isinstance(e, dns.resolver.NoNameservers):
            # Each entry is (server, tcp, port, error, response); the error is the rcode's text
            # (REFUSED, SERVFAIL) when a server did answer, an exception when none came.
            answered = [
                f"{err} from {_server_text(server, port)}"
                for server, _tcp, port, err, _response in e.kwargs.get("errors") or ()
                if isinstance(err, str)
            ]
            if answered:
                return "; ".join(dict.fromkeys(answered))
            return "no nameserver answered"
    return str(errors[0]) or type(errors[0]).__name__


def _server_text(server: str, port: int) -> str:
    """dnspython's ``Do53:10.96.0.10@53`` as the configuration spells it: ``10.96.0.10:53``."""
    address = server.removeprefix("Do53:").rpartition("@")[0] or server
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
