"""The matcher: which feeds list an IP, a domain or a URL, and why. Pure and immutable.

Rules:

- IP: an address matches every listed address or network containing it (IPv4 and IPv6; an
  IPv4-mapped IPv6 address is looked up as IPv4); matches come longest prefix first.
- Domain: a listed domain matches itself and (suffix rule) every name below it, unless its feed
  says ``subdomains: false`` (then only the exact name). ``why`` is ``exact`` or
  ``parent domain``.
- URL: only the exact canonical URL (``feeds.normalise.normalise_url``) matches; a URL indicator
  never widens to its host (shared hosting appears in real URL feeds).
- Allowlist feeds suppress: a value covered by an allowlist (same rules; for a URL, the URL or
  its host) yields no match at all.
- Bad input (not an IP, an invalid name) is simply a miss: the matcher never raises on lookups.

Why it is fast: a miss is the common case on every proxied connection. IPv4 entries live in one
dict per prefix length actually present, keyed by the address shifted right, so a lookup is one
``dict.get`` per length. Domains: a set holds every listed name and every parent of one below
the top-level label (a "stem", e.g. ``github.io`` when ``x.github.io`` is listed); the domain
dict maps the same names to their provenance (empty for a stem). A lookup asks the set for the
name's last two labels, which settles most misses in one probe (a set answers "absent" in about
one cache miss, a dict in several), then walks towards the full name, one set probe per label,
and stops at the first suffix the set does not hold: a near miss under a busy parent costs two
or three probes. ``match_canonical_domain`` skips the normalisation for callers whose names are
canonical already (the gateway's). Values are ``Provenance`` objects shared by all entries of a
feed without per-row metadata, so a million entries cost little more than their keys. Build a
new matcher and swap the reference to update.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, NamedTuple

from feeds.indicator import Indicator, IndicatorType, Provenance, ecs_indicator_type
from feeds.normalise import normalise_domain, normalise_url

# What an index key maps to: the provenance of each feed listing it. In the blocklist domain
# dict, the empty tuple marks a parent of listed names that no feed lists itself (a "stem").
Entry = Provenance | tuple[Provenance, ...]
_STEM: Entry = ()
_FILTER_SHIFT = 8  # the IPv4 miss filter has one byte per /24 (16 MiB)
V4_FILTER_MIN_ENTRIES = 4096  # below this (and few prefix lengths), no filter
V4_FILTER_MAX_PROBES = 4
_Tables = tuple[tuple[int, int, dict[int, Entry]], ...]

_AF_INET = socket.AF_INET
_IP = IndicatorType.IP
_CIDR = IndicatorType.CIDR
_DOMAIN = IndicatorType.DOMAIN
_URL = IndicatorType.URL
_inet_pton = socket.inet_pton
_from_bytes = int.from_bytes


class Match(NamedTuple):
    """One feed listing one indicator that covers the looked-up value (immutable)."""

    feed: str
    indicator_type: IndicatorType
    indicator: str
    matched: str
    why: str
    confidence: int | None = None
    severity: str | None = None
    first_seen: datetime | None = None
    reference: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def ecs_type(self) -> str:
        """ECS ``threat.indicator.type``: ipv4-addr, ipv6-addr, domain-name or url."""
        return ecs_indicator_type(self.indicator_type, self.indicator)


@dataclass(frozen=True, slots=True)
class FeedRules:
    """What the matcher needs to know about a feed besides its indicators."""

    name: str
    allowlist: bool = False
    subdomains: bool = True


@dataclass(slots=True)
class _Side:
    v4: dict[int, dict[int, Entry]] = field(default_factory=dict)
    v6: dict[int, dict[int, Entry]] = field(default_factory=dict)
    domains: dict[str, Entry] = field(default_factory=dict)
    urls: dict[str, Entry] = field(default_factory=dict)


def _add(table: dict[Any, Entry], key: object, prov: Provenance) -> None:
    old: Entry | None = table.get(key)
    if old is None:
        table[key] = prov
        return
    if isinstance(old, Provenance):
        if old is not prov:
            table[key] = (old, prov)
        return
    if prov not in old:
        table[key] = (*old, prov)


def _entries(entry: Entry) -> tuple[Provenance, ...]:
    return (entry,) if isinstance(entry, Provenance) else entry


def _ip_key(value: str) -> tuple[int, int, int]:
    """(version, prefix length, address int) of a normalised IP or CIDR."""
    addr, _, plen = value.partition("/")
    if ":" in addr:
        n = int(ipaddress.IPv6Address(addr))
        return 6, int(plen) if plen else 128, n
    return 4, int(plen) if plen else 32, _from_bytes(_inet_pton(_AF_INET, addr), "big")


def _v4_filter(by_len: dict[int, dict[int, Entry]]) -> bytearray | None:
    """One byte per /24: non-zero when some entry covers part of it (a miss costs one read).

    None for small indexes: a few dict probes cost less than 16 MiB.
    """
    entries = sum(len(t) for t in by_len.values())
    if entries < V4_FILTER_MIN_ENTRIES and len(by_len) <= V4_FILTER_MAX_PROBES:
        return None
    bits = bytearray(1 << (32 - _FILTER_SHIFT))
    for plen, table in by_len.items():
        if plen >= 32 - _FILTER_SHIFT:
            drop = plen - (32 - _FILTER_SHIFT)
            for key in table:
                bits[key >> drop] = 1
        else:
            width = 1 << (32 - _FILTER_SHIFT - plen)
            ones = b"\x01" * width
            for key in table:
                start = key * width
                bits[start : start + width] = ones
    return bits


def _tables(by_len: dict[int, dict[int, Entry]], bits: int) -> _Tables:
    return tuple((plen, bits - plen, by_len[plen]) for plen in sorted(by_len, reverse=True))


class Matcher:
    """An immutable index of indicators from many feeds; build once, swap whole."""

    __slots__ = (
        "_allow",
        "_allow_v4",
        "_allow_v6",
        "_block",
        "_counts",
        "_domains",
        "_exact_only",
        "_known",
        "_rules",
        "_v4",
        "_v4_filter",
        "_v6",
    )

    def __init__(self, block: _Side, allow: _Side, rules: Mapping[str, FeedRules]) -> None:
        self._block = block
        self._allow = allow
        self._rules = dict(rules)
        self._v4 = _tables(block.v4, 32)
        self._v4_filter = _v4_filter(block.v4)
        listed_domains = len(block.domains)
        self._known = _add_stems(block.domains)
        self._domains = block.domains
        self._exact_only = frozenset(n for n, r in self._rules.items() if not r.subdomains)
        self._v6 = _tables(block.v6, 128)
        self._allow_v4 = _tables(allow.v4, 32)
        self._allow_v6 = _tables(allow.v6, 128)
        self._counts = {
            "ip": sum(len(t) for t in block.v4.values()) + sum(len(t) for t in block.v6.values()),
            "domain": listed_domains,
            "url": len(block.urls),
            "allow": sum(len(t) for t in allow.v4.values())
            + sum(len(t) for t in allow.v6.values())
            + len(allow.domains)
            + len(allow.urls),
        }

    @classmethod
    def build(cls, feeds: Iterable[tuple[FeedRules, Iterable[Indicator]]]) -> Matcher:
        """Index the indicators of each feed (feed order does not matter)."""
        return cls.build_raw(
            (feed, ((i.type, i.value, i.provenance) for i in indicators))
            for feed, indicators in feeds
        )

    @classmethod
    def build_raw(
        cls, feeds: Iterable[tuple[FeedRules, Iterable[tuple[IndicatorType, str, Provenance]]]]
    ) -> Matcher:
        """``build`` from (type, normalised value, provenance) triples: no Indicator objects."""
        block = _Side()
        allow = _Side()
        rules: dict[str, FeedRules] = {}
        for feed, indicators in feeds:
            rules[feed.name] = feed
            side = allow if feed.allowlist else block
            v4, v6, domains, urls = side.v4, side.v6, side.domains, side.urls
            stamped: dict[Provenance, Provenance] = {}
            name = feed.name
            host32 = v4.setdefault(32, {})
            for itype, value, prov in indicators:
                if prov.feed != name:
                    # Parsers normally stamp the feed name; share one copy per distinct value.
                    fixed = stamped.get(prov)
                    if fixed is None:
                        fixed = stamped[prov] = replace(prov, feed=name)
                    prov = fixed
                if itype is _IP and ":" not in value and "/" not in value:
                    # Fast path for the bulk of IP lists: a bare IPv4 address.
                    n = _from_bytes(_inet_pton(_AF_INET, value), "big")
                    if host32.setdefault(n, prov) is not prov:
                        _add(host32, n, prov)
                elif itype is _DOMAIN:
                    if domains.setdefault(value, prov) is not prov:
                        _add(domains, value, prov)
                elif itype is _URL:
                    _add(urls, value, prov)
                else:
                    version, plen, n = _ip_key(value)
                    bits = 32 if version == 4 else 128
                    by_len = v4 if version == 4 else v6
                    table = by_len.get(plen)
                    if table is None:
                        table = by_len[plen] = {}
                    _add(table, n >> (bits - plen), prov)
            if not host32:
                del v4[32]
        return cls(block, allow, rules)

    @classmethod
    def empty(cls) -> Matcher:
        """A matcher that matches nothing."""
        return cls(_Side(), _Side(), {})

    @property
    def counts(self) -> Mapping[str, int]:
        """Number of distinct blocklist values per kind, and allowlist values."""
        return dict(self._counts)

    # -- IPs ---------------------------------------------------------------------------------

    def match_ip(
        self, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> tuple[Match, ...]:
        """Every blocklist entry covering this address, longest prefix first."""
        if isinstance(ip, str) and ":" not in ip:
            # The hot path: a dotted quad, usually absent from every feed.
            try:
                n = _from_bytes(_inet_pton(_AF_INET, ip), "big")
            except (OSError, ValueError):  # ValueError: embedded NUL
                return ()
            flt = self._v4_filter
            if flt is not None and not flt[n >> _FILTER_SHIFT]:
                return ()
            version = 4
        else:
            version, n = _address(ip)
            if version == 0:
                return ()
            flt = self._v4_filter
            if version == 4 and flt is not None and not flt[n >> _FILTER_SHIFT]:
                return ()
        tables = self._v4 if version == 4 else self._v6
        found: list[tuple[int, Entry]] | None = None
        for plen, shift, table in tables:
            entry = table.get(n >> shift)
            if entry is not None:
                if found is None:
                    found = []
                found.append((plen, entry))
        if found is None:
            return ()
        if self._allowed_address(version, n):
            return ()
        bits = 32 if version == 4 else 128
        text = _format_address(version, n)
        out: list[Match] = []
        for plen, entry in found:
            if plen == bits:
                net, itype, why = text, _IP, "exact"
            else:
                net, itype, why = _format_network(version, n, plen, bits), _CIDR, "in network"
            if isinstance(entry, Provenance):
                out.append(_match(entry, itype, net, text, why))
            else:
                for p in entry:
                    out.append(_match(p, itype, net, text, why))
        return tuple(out)

    def _allowed_address(self, version: int, n: int) -> bool:
        for _, shift, table in self._allow_v4 if version == 4 else self._allow_v6:
            if table.get(n >> shift) is not None:
                return True
        return False

    def ip_allowlisted(self, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True when an allowlist feed covers this address."""
        version, n = _address(ip)
        return version != 0 and self._allowed_address(version, n)

    # -- domains -----------------------------------------------------------------------------

    def match_domain(self, name: str) -> tuple[Match, ...]:
        """Every blocklist entry for this name (any spelling) or (suffix rule) a parent domain."""
        # Normalised first (case, trailing dots, IDNA); a bad name is a miss.
        if name.isascii():
            # lower() is cheaper than asking islower() first (which scans by Unicode tables).
            key = name.lower()
            if key[-1:] == ".":
                key = key.rstrip(".")
        else:
            key = _domain_key(name) or ""
        # The rest is match_canonical_domain, inlined: a call costs as much as the probe.
        start = key.rfind(".", 0, key.rfind(".")) + 1
        tail = key[start:]
        if tail not in self._known:
            return ()
        return self._walk_domain(key, start, tail)

    def match_canonical_domain(self, name: str) -> tuple[Match, ...]:
        """``match_domain`` for a name already canonical: lowercase A-labels, no trailing dot."""
        # For callers that normalised the name already (the gateway's host names): the same
        # answer as match_domain for such names, without its per-lookup work. Another spelling
        # of a listed name may be missed; no input raises.
        # Any listed name covering this one ends with the same last two labels, which are then
        # a known name (listed, or a parent of listed names): one set probe settles most misses.
        start = name.rfind(".", 0, name.rfind(".")) + 1
        tail = name[start:]
        if tail not in self._known:
            return ()
        return self._walk_domain(name, start, tail)

    def _walk_domain(self, key: str, start: int, tail: str) -> tuple[Match, ...]:
        """Matches for ``key``, whose last two labels ``tail`` (from ``start``) are known."""
        # From the last two labels towards the full name: key[start:] for start just after
        # each dot but the last, then the whole name. A suffix that is not known is neither
        # listed nor a parent of a listed name, so no longer one can be listed: stop there.
        # Known suffixes are in the dict (a stem's entry is empty); unknown ones are never
        # asked of it, as a dict miss costs several cache misses and a set miss about one.
        domains = self._domains
        known = self._known
        found: list[tuple[str, Entry]] | None = None
        listed = tail
        while True:
            entry = domains[listed]
            if entry:  # not a stem
                if found is None:
                    found = []
                found.append((listed, entry))
            if not start:
                break
            start = key.rfind(".", 0, start - 1) + 1
            listed = key[start:]
            if listed not in known:
                break
        if found is None:
            return ()
        out: list[Match] = []
        exact_only = self._exact_only
        for listed, entry in reversed(found):  # the name itself first, then nearest parent
            exact = listed == key
            for prov in _entries(entry):
                if exact:
                    out.append(_match(prov, _DOMAIN, listed, key, "exact"))
                elif prov.feed not in exact_only:
                    out.append(_match(prov, _DOMAIN, listed, key, "parent domain"))
        if not out or self._domain_allowed(key):
            return ()
        return tuple(out)

    def _domain_allowed(self, key: str) -> bool:
        allowed = self._allow.domains
        if not allowed:
            return False
        last = key.rfind(".")
        if last < 0:
            return False  # a one-label name is never allowlisted (as before; feeds have none)
        # key, then key[i + 1:] after each dot but the last: the suffixes a listing can cover.
        if allowed.get(key) is not None:
            return True
        i = key.find(".")
        while 0 <= i < last:
            entry = allowed.get(key[i + 1 :])
            if entry is not None and any(self._rules[p.feed].subdomains for p in _entries(entry)):
                return True
            i = key.find(".", i + 1)
        return False

    def domain_allowlisted(self, name: str) -> bool:
        """True when an allowlist feed covers this name (or a parent, per its feed)."""
        key = _domain_key(name)
        return key is not None and self._domain_allowed(key)

    # -- URLs --------------------------------------------------------------------------------

    def match_url(self, url: str) -> tuple[Match, ...]:
        """Blocklist entries for exactly this URL (after canonicalisation); never the host."""
        urls = self._block.urls
        if not urls:
            return ()
        try:
            key = normalise_url(url)
        except ValueError:
            return ()
        entry = urls.get(key)
        if entry is None or self.url_allowlisted(key):
            return ()
        return tuple(_match(p, IndicatorType.URL, key, key, "exact URL") for p in _entries(entry))

    def url_allowlisted(self, url: str) -> bool:
        """True when an allowlist feed lists this URL or covers its host."""
        try:
            key = normalise_url(url)
        except ValueError:
            return False
        if key in self._allow.urls:
            return True
        host = key.split("://", 1)[1].split("/", 1)[0]
        if host.startswith("["):
            return self.ip_allowlisted(host[1 : host.index("]")])
        host = host.rsplit(":", 1)[0] if ":" in host else host
        return self.ip_allowlisted(host) if host[-1].isdigit() else self.domain_allowlisted(host)

    def match(self, value: str) -> tuple[Match, ...]:
        """Look up a value of any kind: a URL (has ``://``), an IP, else a domain."""
        if "://" in value:
            return self.match_url(value)
        version, _ = _address(value)
        if version:
            return self.match_ip(value)
        return self.match_domain(value)


def _address(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int]:
    """(4 or 6, int) for an address, (0, 0) if it is not one."""
    if isinstance(ip, str):
        if ":" not in ip:
            try:
                return 4, _from_bytes(_inet_pton(_AF_INET, ip), "big")
            except (OSError, ValueError):  # ValueError: embedded NUL
                return 0, 0
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(
                ip.split("%", 1)[0].strip("[]")
            )
        except ValueError:
            return 0, 0
    else:
        addr = ip
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return 4, int(mapped)
        return 6, int(addr)
    return 4, int(addr)


def _format_address(version: int, n: int) -> str:
    if version == 4:
        return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
    return str(ipaddress.IPv4Address(n) if version == 4 else ipaddress.IPv6Address(n))


def _format_network(version: int, n: int, plen: int, bits: int) -> str:
    base = (n >> (bits - plen)) << (bits - plen)
    text = _format_address(version, base)
    return text if plen == bits else f"{text}/{plen}"


def _add_stems(domains: dict[str, Entry]) -> frozenset[str]:
    """Add the parents a lookup may probe on its way to a listed name; return all names known.

    A lookup of ``a.b.c.d`` probes ``c.d``, ``b.c.d`` and ``a.b.c.d`` (never the top-level
    label alone), so each listed name's parents but the top-level label become "stems" with an
    empty entry when not listed themselves.
    """
    # Names with parents first (the dict cannot grow while iterated), then each parent: a
    # parent already present drops its copy at once, so no garbage piles up (RSS stays low).
    deep = [name for name in domains if name.count(".") > 1]
    setdefault = domains.setdefault
    for name in deep:
        start = name.rfind(".", 0, name.rfind(".")) + 1
        while start:
            setdefault(name[start:], _STEM)
            start = name.rfind(".", 0, start - 1) + 1
    del deep  # before the set's table is allocated, so its memory can be reused
    # From an iterator, not the dict: a set built from a dict is sized for twice its length
    # up front, which costs 32 MB more for a million names.
    return frozenset(iter(domains))


def _domain_key(name: str) -> str | None:
    if name.isascii():
        key = name.lower()
        if key.endswith("."):
            key = key[:-1]
        return key or None
    try:
        return normalise_domain(name)
    except ValueError:
        return None


def _match(prov: Provenance, itype: IndicatorType, listed: str, matched: str, why: str) -> Match:
    # Positional on purpose: this runs for every hit (field order of Match).
    return Match(
        prov.feed,
        itype,
        listed,
        matched,
        why,
        prov.confidence,
        prov.severity,
        prov.first_seen,
        prov.reference,
        prov.tags,
    )
