"""Normalisation and hygiene of indicator values: pure functions, no I/O.

Rules (the gateway normalises request host names with the same ``normalise_domain``):

- Domain: lowercase; one trailing dot removed; UTS-46 mapping then IDNA 2008 A-labels
  (``bücher.de`` -> ``xn--bcher-kva.de``); ``_`` is allowed (real feeds carry it); labels are
  1..63 octets, the name at most 253; single-label names and names whose last label is all digits
  (an IP address in disguise) are rejected.
- IP / network: ``ipaddress`` rules (leading-zero octets rejected); an IPv6 zone id (``%lo0``) is
  dropped; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) becomes IPv4; host bits of a network are masked
  and the caller is told (it may be a data error). A host network is written without ``/32``.
- URL: scheme and host lowercased; IDNA host; default port (80/443) removed; userinfo dropped;
  IPv6 hosts bracketed; fragment dropped (never sent); empty path becomes ``/``; path and query
  are kept verbatim (percent-encoding untouched).
- Hygiene: a public suffix (``com``, ``co.uk``, ``pages.dev``: the ICANN and private sections of
  the bundled public-suffix list, no network access) is never an indicator; networks that overlap
  private, loopback, link-local, multicast, documentation or reserved space are dropped from
  blocklists (FireHOL level1 lists ``10.0.0.0/8``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from functools import lru_cache
from urllib.parse import urlsplit

import idna
from publicsuffixlist import PublicSuffixList

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
URL_SCHEMES = frozenset({"http", "https", "ftp", "ws", "wss"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21, "ws": 80, "wss": 443}

_ASCII_LABEL = re.compile(r"[a-z0-9_-]{1,63}\Z")
_ASCII_NAME = re.compile(r"(?:[a-z0-9_-]{1,63}\.)+[a-z0-9_-]{1,63}\Z")
_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")

# Ranges that must never reach a blocklist: blocking them breaks the cluster itself.
_SPECIAL_RANGES: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared-address-space"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/127", "unspecified"),
    ("::ffff:0:0/96", "ipv4-mapped"),
    ("64:ff9b:1::/48", "private"),
    ("100::/64", "discard"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "private"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "reserved"),
    ("ff00::/8", "multicast"),
)


def _range_table(version: int) -> tuple[tuple[int, int, str], ...]:
    rows = []
    for text, reason in _SPECIAL_RANGES:
        net = ipaddress.ip_network(text)
        if net.version == version:
            rows.append((int(net.network_address), int(net.broadcast_address), reason))
    return tuple(rows)


_V4_SPECIAL = _range_table(4)
_V6_SPECIAL = _range_table(6)
# First octets that start some special range: most public addresses skip the range scan.
_V4_SPECIAL_FIRST_OCTETS = bytes(
    int(any(lo >> 24 <= octet <= hi >> 24 for lo, hi, _ in _V4_SPECIAL)) for octet in range(256)
)


def normalise_domain(name: str) -> str:
    """Return the canonical A-label form of a domain name, or raise ValueError saying why."""
    if not name:
        raise ValueError("empty domain name")
    text = name[:-1] if name.endswith(".") else name
    if not text:
        raise ValueError("empty domain name")
    if text.isascii():
        text = text.lower()
        if len(text) <= MAX_NAME_LENGTH and "xn--" not in text and _ASCII_NAME.match(text):
            # The common case in one regex call; anything unusual takes the label-by-label
            # path below, which also words the error.
            if text[text.rfind(".") + 1 :].isdigit():
                raise ValueError(f"numeric top-level label in {name!r} (an IP address?)")
            return text
    else:
        try:
            text = idna.uts46_remap(text, std3_rules=False, transitional=False).lower()
        except idna.IDNAError as e:
            raise ValueError(f"invalid international name {name!r}: {e}") from None
    if len(text) > MAX_NAME_LENGTH:
        raise ValueError(f"name longer than {MAX_NAME_LENGTH} characters")
    labels = text.split(".")
    if len(labels) < 2:
        raise ValueError(f"single-label name {name!r}")
    out = []
    for label in labels:
        out.append(_normalise_label(label, name))
    if out[-1].isdigit():
        raise ValueError(f"numeric top-level label in {name!r} (an IP address?)")
    result = ".".join(out)
    if len(result) > MAX_NAME_LENGTH:
        raise ValueError(f"name longer than {MAX_NAME_LENGTH} characters")
    return result


def _normalise_label(label: str, name: str) -> str:
    if not label:
        raise ValueError(f"empty label in {name!r}")
    if not label.isascii():
        try:
            label = idna.alabel(label).decode("ascii")
        except (idna.IDNAError, UnicodeError) as e:
            raise ValueError(f"invalid international label in {name!r}: {e}") from None
    elif label.startswith("xn--"):
        try:
            idna.ulabel(label)
        except (idna.IDNAError, UnicodeError) as e:
            raise ValueError(f"invalid punycode label {label!r}: {e}") from None
    if not _ASCII_LABEL.match(label):
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"label longer than {MAX_LABEL_LENGTH} characters in {name!r}")
        raise ValueError(f"invalid character in {name!r}")
    return label


def parse_network(value: str) -> tuple[IPNetwork, bool]:
    """Parse an IP or CIDR; return the network and whether host bits were masked."""
    text = value
    if "%" in text:
        # A zone id names a local interface: meaningless in a feed, so it is dropped.
        addr, _, rest = text.partition("%")
        _, slash, plen = rest.partition("/")
        text = addr + slash + plen
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        raise ValueError(f"invalid IP address or network {value!r}: {e}") from None
    masked = "/" in text and int(net.network_address) != int(
        ipaddress.ip_address(text.partition("/")[0])
    )
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED_V4):
        v4 = ipaddress.IPv4Network(
            (int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96), strict=False
        )
        return v4, masked
    return net, masked


def format_network(net: IPNetwork) -> str:
    """The canonical text of a network: a bare address for a single host, else ``addr/len``."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def normalise_ip(value: str) -> str:
    """Return the canonical text of a single IP address (IPv4-mapped IPv6 becomes IPv4)."""
    if "/" in value:
        raise ValueError(f"expected an address, got a network {value!r}")
    net, _ = parse_network(value)
    return str(net.network_address)


def normalise_network(value: str) -> tuple[str, bool]:
    """Return the canonical text of an IP or CIDR and whether host bits were masked."""
    net, masked = parse_network(value)
    return format_network(net), masked


def normalise_url(url: str) -> str:
    """Return the canonical form of a URL, or raise ValueError saying why."""
    if any(c.isspace() for c in url):
        raise ValueError("whitespace in URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"invalid URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}")
    netloc = parts.netloc.rpartition("@")[2]
    if netloc.startswith("["):
        inner = netloc[1 : netloc.find("]")] if "]" in netloc else ""
        host = "[" + normalise_ip(inner) + "]"
        if ":" not in host[1:-1]:
            raise ValueError(f"bracketed host is not IPv6 in {url!r}")
    else:
        raw = netloc.rpartition(":")[0] if port is not None or netloc.endswith(":") else netloc
        if not raw:
            raise ValueError(f"no host in URL {url!r}")
        host = normalise_host(raw)
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    path = parts.path or "/"
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{host}{path}{query}"


def normalise_host(host: str) -> str:
    """Normalise a host that is either an IP address or a domain name."""
    if _looks_like_ipv4(host) or ":" in host:
        return normalise_ip(host)
    return normalise_domain(host)


def _looks_like_ipv4(text: str) -> bool:
    return bool(text) and all(c.isdigit() or c == "." for c in text) and text.count(".") == 3


def ipv4_to_int(text: str) -> int:
    """Fast strict IPv4 dotted-quad to int (no octal, no short forms)."""
    return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def is_public_suffix(name: str) -> bool:
    """True when a normalised domain is itself a public suffix (``com``, ``co.uk``, ``r2.dev``)."""
    return bool(_psl().is_public(name))


def special_range(net: IPNetwork) -> str | None:
    """The category of special-purpose space a network overlaps (``private``...), else None."""
    start = int(net.network_address)
    end = int(net.broadcast_address)
    table = _V4_SPECIAL if net.version == 4 else _V6_SPECIAL
    for lo, hi, reason in table:
        if start <= hi and end >= lo:
            return reason
    return None


def ipv4_special(address: int) -> str | None:
    """The category of special-purpose space an IPv4 address (as an int) is in, else None."""
    if not _V4_SPECIAL_FIRST_OCTETS[address >> 24]:
        return None
    for lo, hi, reason in _V4_SPECIAL:
        if lo <= address <= hi:
            return reason
    return None
