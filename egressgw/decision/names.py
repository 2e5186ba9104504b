"""Destination names: one canonical spelling, so no spelling gets around policy or the guard.

Rules:

1. A bracketed or bare IP literal becomes an address; an IPv4-mapped IPv6 literal stays IPv6 (the
   guard and policy judge it by its IPv4 address).
2. Any other host is a DNS name: trailing dot removed, UTS-46 mapped (case folded, width and
   compatibility forms normalised) and IDNA-encoded to punycode A-labels.
3. A name whose last label is all digits or hex (``2130706433``, ``0x7f.1``, ``0177.0.0.1``) is
   refused: resolvers and clients disagree about such numeric spellings of addresses.
4. Labels are 1-63 octets, names at most 253; ``_`` is accepted (real names carry it), spaces,
   ``/``, ``@``, ``:`` and control characters are not.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")


@dataclass(frozen=True, slots=True)
class Host:
    """A canonical destination host: exactly one of ``name`` and ``ip`` is set."""

    name: str | None
    ip: IPAddress | None

    def __str__(self) -> str:
        return self.name if self.name is not None else str(self.ip)

    def authority(self, port: int, default_port: int) -> str:
        """``host[:port]`` as a URL or Host header writes it (IPv6 in brackets)."""
        host = f"[{self.ip}]" if self.ip is not None and self.ip.version == 6 else str(self)
        return host if port == default_port else f"{host}:{port}"


def parse_ip_literal(text: str) -> IPAddress | None:
    """Return the address a host spells as an IP literal (``[v6]`` or dotted quad), else None."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        if "%" in inner:
            raise ValueError(f"zone id in address {text!r}")
        try:
            return ipaddress.IPv6Address(inner)
        except ValueError as e:
            raise ValueError(f"bad IPv6 literal {text!r}") from e
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def normalise_name(name: str) -> str:
    """Return the canonical A-label spelling of a DNS name, or raise ValueError saying why."""
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("empty host name")
    if name.isascii():
        candidate = name.lower()
    else:
        try:
            candidate = idna.encode(name, uts46=True, std3_rules=False).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"invalid international name {name!r}: {e}") from e
    if len(candidate) > MAX_NAME_LENGTH:
        raise ValueError(f"host name longer than {MAX_NAME_LENGTH} characters")
    labels = candidate.split(".")
    for label in labels:
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"label {label[:20]!r}... longer than {MAX_LABEL_LENGTH} characters")
        if not _LABEL.match(label):
            raise ValueError(f"invalid host name {name!r}")
    if _NUMERIC_LABEL.match(labels[-1]):
        raise ValueError(f"numeric host {name!r} is not a valid address or name")
    return candidate


# Targets repeat: parse each spelling once (the parse is pure, so the cache is exact).
PARSE_CACHE_SIZE = 65536


@lru_cache(maxsize=PARSE_CACHE_SIZE)
def parse_host(text: str) -> Host:
    """Parse the host part of an authority into a canonical Host, or raise ValueError."""
    ip = parse_ip_literal(text)
    if ip is not None:
        return Host(None, ip)
    return Host(normalise_name(text), None)


def split_authority(authority: str) -> tuple[str, str]:
    """``host:port`` -> (host text, port text); the port text is empty when there is none.

    The one place that splits an authority: bracketed IPv6 (``[::1]:53``) keeps its brackets, an
    unbracketed IPv6 address with a port is refused (where would the port start?).
    """
    if "@" in authority:
        raise ValueError("userinfo is not allowed in a proxy target")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {authority!r}")
        host_text, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after address in {authority!r}")
        return host_text, rest[1:]
    host_text, sep, port_text = authority.rpartition(":")
    if not sep:
        return authority, ""
    if ":" in host_text:
        raise ValueError(f"unbracketed IPv6 address in {authority!r}")
    return host_text, port_text


def _port(port_text: str, lowest: int) -> int:
    if not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"bad port {port_text!r}")
    port = int(port_text)
    if not lowest <= port < 65536:
        raise ValueError(f"port {port} out of range")
    return port


@lru_cache(maxsize=PARSE_CACHE_SIZE)
def parse_authority(authority: str, default_port: int | None = None) -> tuple[Host, int]:
    """Parse ``host:port`` (the CONNECT target or a URL authority without userinfo)."""
    host_text, port_text = split_authority(authority)
    if port_text:
        port = _port(port_text, 1)
    elif default_port is not None:
        port = default_port
    else:
        raise ValueError(f"missing port in {authority!r}")
    return parse_host(host_text), port


def parse_ip_port(text: str, default_port: int | None = None) -> tuple[IPAddress, int]:
    """An address to listen on or to query: ``ip:port`` or ``[v6]:port`` -> (address, port).

    Without a port, ``default_port`` applies (a bare IPv6 address is then accepted too); port 0
    is allowed (listen on any free port).
    """
    if default_port is not None and ":" in text and not text.startswith("["):
        bare = parse_ip_literal(text)
        if bare is not None:
            return bare, default_port
    host_text, port_text = split_authority(text)
    ip = parse_ip_literal(host_text)
    if ip is None:
        raise ValueError(f"{host_text!r} is not an IP address")
    if port_text:
        return ip, _port(port_text, 0)
    if default_port is None:
        raise ValueError(f"missing port in {text!r}")
    return ip, default_port
