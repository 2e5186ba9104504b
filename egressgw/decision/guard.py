"""Destination guard: refuse addresses a workload must never reach through the gateway.

Rules, in order:

1. An IPv6 address that embeds an IPv4 one is judged by the IPv4 address it carries, so that no
   spelling of a guarded IPv4 address gets through: IPv4-mapped ``::ffff:a.b.c.d``,
   IPv4-compatible ``::a.b.c.d``, SIIT IPv4-translated ``::ffff:0:a.b.c.d`` (RFC 2765), NAT64
   ``64:ff9b::/96``, 6to4 ``2002::/16`` and Teredo ``2001::/32`` (the client address, stored
   inverted; RFC 4380). Only formats whose address alone says where the IPv4 address sits count:
   local-use NAT64 ``64:ff9b:1::/48`` (RFC 8215) may use any RFC 6052 prefix length, so it is a
   guarded range instead.
2. An address inside a ``guard.allow`` range is allowed (the operator said so).
3. An address inside one of the guarded ranges below is denied, with the range's category as the
   reason: cloud metadata endpoints first, so the reason is the most specific one.
4. Everything else is allowed.

The ranges follow the IANA IPv4 and IPv6 Special-Purpose Address Registries: a block the
registry marks not globally reachable is guarded whole (more specific anycast entries inside it,
such as ``192.0.0.9`` or ``2001:1::1``, included: they are network services, not destinations);
blocks marked globally reachable on their own (AS112, AMT) are not. IPv6 outside ``2000::/3``,
the only space IANA allocates for global unicast, is ``reserved`` unless a more specific category
names it, so a block the IETF carves out of it later is refused until someone looks at it.
The documentation ranges (``192.0.2.0/24``, ``198.51.100.0/24``, ``203.0.113.0/24``,
``2001:db8::/32``, ``3fff::/20``) are left to policy on purpose: nothing answers there on the
internet, and examples and labs use them as stand-ins for public addresses.

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
    (
        "private",
        (
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "fc00::/7",
            # Deprecated site-local (RFC 3879): stacks and old networks still route it locally.
            "fec0::/10",
            # Local-use NAT64 (RFC 8215): reaches whatever IPv4 the operator's translator does.
            "64:ff9b:1::/48",
        ),
    ),
    ("link-local", ("169.254.0.0/16", "fe80::/10")),
    ("cgnat", ("100.64.0.0/10",)),
    ("multicast", ("224.0.0.0/4", "ff00::/8")),
    (
        "reserved",
        (
            "240.0.0.0/4",  # includes 255.255.255.255 (limited broadcast)
            "192.0.0.0/24",  # IETF protocol assignments
            "198.18.0.0/15",  # benchmarking
            "192.88.99.0/24",  # deprecated 6to4 relay anycast (RFC 7526), 6a44 relay
            # IETF protocol assignments (RFC 2928): benchmarking 2001:2::/48, ORCHID, anycast
            # services. Teredo 2001::/32 is judged by its IPv4 address first (rule 1).
            "2001::/23",
            # Everything outside 2000::/3 not named above: discard-only 100::/64 (RFC 6666),
            # dummy 100:0:0:1::/64 (RFC 9780), SRv6 SIDs 5f00::/16 (RFC 9602), unassigned.
            "::/3",
            "4000::/2",
            "8000::/1",
        ),
    ),
)

# Prefixes of the IPv6 formats that carry an IPv4 address, as integers (cheaper than `in`).
_MAPPED = 0xFFFF  # ::ffff:0:0/96, top 96 bits
_TRANSLATED = 0xFFFF0000  # ::ffff:0:0:0/96, top 96 bits
_NAT64 = 0x0064FF9B << 64  # 64:ff9b::/96, top 96 bits
_SIXTOFOUR = 0x2002  # 2002::/16, top 16 bits
_TEREDO = 0x20010000  # 2001::/32, top 32 bits
_LOW32 = 0xFFFFFFFF

# Size of the per-guard verdict cache: destinations repeat, and a verdict is a pure function.
DEFAULT_CACHE_SIZE = 65536


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address an IPv6 address carries (see rule 1 of the module docstring)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    packed = int(ip)
    top96 = packed >> 32
    if top96 in (_MAPPED, _TRANSLATED, _NAT64) or (top96 == 0 and packed > 1):
        return ipaddress.IPv4Address(packed & _LOW32)
    if packed >> 112 == _SIXTOFOUR:
        return ipaddress.IPv4Address((packed >> 80) & _LOW32)
    if packed >> 96 == _TEREDO:
        # The client's (NAT's outside) address, where a relay sends the payload; stored with
        # every bit inverted. The server address in bits 32-63 only ever receives bubbles.
        return ipaddress.IPv4Address(~packed & _LOW32)
    return None


def effective_ip(ip: IPAddress) -> IPAddress:
    """The address the guard and policy judge: the embedded IPv4 address if there is one."""
    return embedded_ipv4(ip) or ip


def _compile(
    ranges: Iterable[tuple[str, Iterable[str]]], version: int
) -> tuple[tuple[str, IPNetwork], ...]:
    nets = ((category, ipaddress.ip_network(net)) for category, nets in ranges for net in nets)
    return tuple((category, net) for category, net in nets if net.version == version)


# One table per address family, so that a lookup scans only the ranges that can match.
_COMPILED: dict[int, tuple[tuple[str, IPNetwork], ...]] = {
    4: _compile(GUARDED_RANGES, 4),
    6: _compile(GUARDED_RANGES, 6),
}


def classify_ip(ip: IPAddress) -> str | None:
    """Return the guarded category of an address (e.g. ``loopback``), or None if it is public."""
    target = effective_ip(ip)
    for category, net in _COMPILED[target.version]:
        if target in net:
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
