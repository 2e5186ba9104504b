"""Destination guard: refuse addresses a workload must never reach through the gateway.

Rules, in order:

1. An IPv6 address that embeds an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible
   ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) is judged by the IPv4 address it
   carries, so that no spelling of a guarded IPv4 address gets through.
2. An address inside a ``guard.allow`` range is allowed (the operator said so).
3. An address inside one of the guarded ranges below is denied, with the range's category as the
   reason: cloud metadata endpoints first, so the reason is the most specific one.
4. Everything else is allowed.

The guard is a pure function of an address: the resolver calls it for every IP it returns and the
proxy connects only to an IP that passed it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# (category, networks) in the order they are reported; metadata before the broader ranges.
GUARDED_RANGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cloud-metadata", ("169.254.169.254/32", "169.254.170.2/32", "fd00:ec2::254/128")),
    ("unspecified", ("0.0.0.0/8", "::/128")),
    ("loopback", ("127.0.0.0/8", "::1/128")),
    ("private", ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")),
    ("link-local", ("169.254.0.0/16", "fe80::/10")),
    ("cgnat", ("100.64.0.0/10",)),
    ("multicast", ("224.0.0.0/4", "ff00::/8")),
    ("reserved", ("240.0.0.0/4", "192.0.0.0/24", "198.18.0.0/15")),
)

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")

# Size of the per-guard verdict cache: destinations repeat, and a verdict is a pure function.
DEFAULT_CACHE_SIZE = 65536


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    packed = int(ip)
    if ip in _MAPPED or ip in _NAT64:
        return ipaddress.IPv4Address(packed & 0xFFFFFFFF)
    if ip in _COMPAT and packed > 1:
        return ipaddress.IPv4Address(packed & 0xFFFFFFFF)
    if ip in _SIXTOFOUR:
        return ipaddress.IPv4Address((packed >> 80) & 0xFFFFFFFF)
    return None


def effective_ip(ip: IPAddress) -> IPAddress:
    """The address the guard and policy judge: the embedded IPv4 address if there is one."""
    return embedded_ipv4(ip) or ip


def _compile(ranges: Iterable[tuple[str, Iterable[str]]]) -> tuple[tuple[str, IPNetwork], ...]:
    return tuple((category, ipaddress.ip_network(net)) for category, nets in ranges for net in nets)


_COMPILED = _compile(GUARDED_RANGES)


def classify_ip(ip: IPAddress) -> str | None:
    """Return the guarded category of an address (e.g. ``loopback``), or None if it is public."""
    target = effective_ip(ip)
    for category, net in _COMPILED:
        if target.version == net.version and target in net:
            return category
    return None


class Guard:
    """The guard with the operator's exemptions (``guard.allow``) and an on/off switch.

    ``check(ip)`` returns a denial reason starting with ``guard:`` or None when the address may be
    used. Verdicts are cached per instance: a reload builds a new Guard, so none outlive it.
    """

    check: Callable[[IPAddress], str | None]

    def __init__(self, allow: Iterable[IPNetwork] = (), enabled: bool = True) -> None:
        self.allow = tuple(allow)
        self.enabled = enabled
        self.check = lru_cache(maxsize=DEFAULT_CACHE_SIZE)(self._check)

    def _check(self, ip: IPAddress) -> str | None:
        if not self.enabled:
            return None
        target = effective_ip(ip)
        for net in self.allow:
            if target.version == net.version and target in net:
                return None
        category = classify_ip(target)
        if category is None:
            return None
        shown = str(ip) if target == ip else f"{ip} (IPv4 {target})"
        return f"guard: {shown} is {category}"
